"""Running the sandbox provider: in a background thread for tests and the demo, or blocking.

The socket is bound here rather than by uvicorn so that port 0 works and the real port is known
before the first request; uvicorn's access log and logging config stay off so that a test run or
a demo is not flooded.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from routing.sandbox.app import create_app
from routing.sandbox.knobs import Knobs
from routing.sandbox.state import SandboxState

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_GRACEFUL_SHUTDOWN_S = 2


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    reach = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


def _config(state: SandboxState, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(state=state),
        access_log=False,
        log_level="warning",
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        **options,
    )


class SandboxServer:
    """The sandbox on loopback in a daemon thread; usable as a context manager.

    ``knobs`` is the live object the server reads on every call, so changing a field (or calling
    :meth:`configure`) affects the next call.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, knobs: Knobs | None = None) -> None:
        self._host = host
        self._port = port
        self.state = SandboxState(knobs)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def knobs(self) -> Knobs:
        return self.state.knobs

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the sandbox server is not started, its port is not chosen yet")
        return self._port

    @property
    def url(self) -> str:
        return _url(self._host, self.port)

    @property
    def openai_base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` expects: the root of the /v1 API."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What ``ANTHROPIC_BASE_URL`` expects: the host root, the SDK adds /v1 itself."""
        return self.url

    def configure(self, **changes: Any) -> Knobs:
        """Change some knobs at once, all validated before any is applied."""
        return self.state.update_knobs(changes)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def reset(self) -> None:
        self.state.reset()

    def start(self) -> SandboxServer:
        """Serve in a daemon thread; returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already started")
        sock = _bind(self._host, self._port)
        self._sock = sock
        self._port = sock.getsockname()[1]
        server = uvicorn.Server(_config(self.state, log_config=None))
        self.state.is_closing = lambda: server.should_exit
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"mixbatch-sandbox-{self._port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the sandbox server did not start on {self.url}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving; requests still hanging or delayed are answered at once."""
        server, thread, sock = self._server, self._thread, self._sock
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                server.force_exit = True
                thread.join(_STOP_TIMEOUT_S)
        if sock is not None:
            sock.close()
        self._server, self._thread, self._sock = None, None, None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(host: str, port: int, knobs: Knobs) -> None:
    """Serve the sandbox in the foreground until interrupted (``mixbatch sandbox``).

    Returns normally on Ctrl+C, after uvicorn's graceful shutdown, so the CLI needs no handler.
    """
    state = SandboxState(knobs)
    sock = _bind(host, port)
    server = uvicorn.Server(_config(state))
    state.is_closing = lambda: server.should_exit
    url = _url(host, sock.getsockname()[1])
    print(
        f"mixbatch SANDBOX provider (not a real provider) on {url}\n"
        f"  OPENAI_BASE_URL={url}/v1  ANTHROPIC_BASE_URL={url}  any API key works\n"
        f"  knobs: {knobs.model_dump_json()}",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
