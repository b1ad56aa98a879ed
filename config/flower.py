"""Flower, started safely: ``mixbatch flower`` (the Procfile's ``flower`` line) runs it.

Flower can revoke tasks and shut workers down, and its task pages show every task's
arguments, so it must never listen on a public address without a password. The launcher
checks that before anything starts, then runs ``celery flower`` on the service's app:

* a non-loopback ``MIXBATCH_FLOWER_ADDRESS`` without ``MIXBATCH_FLOWER_BASIC_AUTH`` is refused;
* the credentials travel in Flower's own ``FLOWER_BASIC_AUTH`` variable, never on the command
  line, so ``ps`` and shell history do not show them;
* stray ``FLOWER_*`` variables that would reopen what we closed (an unauthenticated API) are
  dropped;
* a port already in use is one clear sentence, not a Tornado traceback;
* Flower logs through ``config.logging`` (JSON lines when not a terminal) like every other
  process, instead of Tornado's own format.

Flower reads the workers' task events (``worker_send_task_events``, ``task_send_sent_event``
in ``config.celeryconfig``); what it shows of a task's arguments is the ``argsrepr`` each
mixbatch task is sent with (ids, counts, lanes, batch ids; never bodies, answers or keys).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from config.ops import OpsSettings, check_port, is_loopback
from routing.errors import ConfigError

__all__ = ["flower_command", "run_flower"]

#: Flower reads these from the environment; only the launcher decides their values.
_CONTROLLED = ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API", "FLOWER_ADDRESS", "FLOWER_PORT")


def flower_command(
    ops: OpsSettings, *, address: str | None = None, port: int | None = None
) -> tuple[list[str], dict[str, str | None]]:
    """Flower's arguments and the ``FLOWER_*`` variables to set (None: unset), or
    ``ConfigError`` saying what to set."""
    address = ops.flower_address if address is None else address
    port = ops.flower_port if port is None else port
    auth = ops.flower_basic_auth
    if auth is None and not is_loopback(address):
        raise ConfigError(
            f"MIXBATCH_FLOWER_ADDRESS={address or '(all interfaces)'} is not a loopback address "
            "and MIXBATCH_FLOWER_BASIC_AUTH is unset: Flower would let anyone who reaches it "
            "see task arguments and stop workers; set MIXBATCH_FLOWER_BASIC_AUTH=user:password "
            "or bind 127.0.0.1"
        )
    check_port(address or "0.0.0.0", port, "MIXBATCH_FLOWER_PORT")
    env: dict[str, str | None] = dict.fromkeys(_CONTROLLED)
    if auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
    if ops.flower_read_only:
        env["FLOWER_READ_ONLY"] = "true"
    args = ["flower", f"--address={address}", f"--port={port}", "--logging=none"]
    return args, env


def apply_env(env: dict[str, str | None], target: MutableMapping[str, str]) -> None:
    for name, value in env.items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value


def run_flower(
    ops: OpsSettings,
    *,
    address: str | None = None,
    port: int | None = None,
    log_level: str = "INFO",
    log_format: str = "auto",
) -> int:
    """Check, then serve Flower in this process until SIGTERM or Ctrl-C; the exit code."""
    from config.celery_app import app
    from config.logging import setup_logging

    args, env = flower_command(ops, address=address, port=port)
    apply_env(env, os.environ)
    setup_logging(log_level, log_format)
    sys.stdout.flush()
    code = app.start(args)
    return int(code or 0)
