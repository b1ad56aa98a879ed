"""Metrics and the Django and Flask integrations on every form of ``MIXBATCH_REDIS_URL``.

``tests/test_cluster.py`` and ``tests/test_sentinel.py`` cover the client, workers and
``mixbatch health`` on a cluster and a Sentinel URL; this module covers the rest of the
surface a deployment points at the same URL: ``mixbatch metrics --once``, the endpoint a worker
serves (``MIXBATCH_WORKER_METRICS_PORT``: the same ``build_registry()`` over ``tasks.runtime``),
and the client the Django app and the Flask extension build from their settings. One cluster
and one Sentinel group serve the whole module.
"""

from __future__ import annotations

import contextlib
import runpy
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from config.ops import reset_ops_settings
from config.settings import get_settings, reset_settings
from routing.client import Client
from routing.states import State
from routing.store.lanes import LaneStore
from tasks import runtime
from tasks.cli.main import cli
from tasks.cli.metrics import build_registry, serve
from tests.servers import RedisCluster, SentinelGroup
from tests.test_cluster import broker, cluster  # noqa: F401  (the module-scoped servers)
from tests.test_e2e import _config
from tests.test_metrics import samples, value
from tests.test_sentinel import group  # noqa: F401

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

ITEM = {
    "lane": "bulk",
    "endpoint": "/v1/embeddings",
    "body": {"model": "text-embedding-3-small", "input": "hello"},
}


@dataclass
class Form:
    """One URL form with a namespace of its own, the service's config published there."""

    name: str
    url: str
    namespace: str
    broker: str | None

    def env(self) -> dict[str, str]:
        env = {"MIXBATCH_REDIS_URL": self.url, "MIXBATCH_NAMESPACE": self.namespace}
        return env | ({"MIXBATCH_BROKER_URL": self.broker} if self.broker else {})


@pytest.fixture(params=["cluster", "sentinel"])
def form(request: pytest.FixtureRequest) -> Iterator[Form]:
    """A cluster with a broker of its own; a Sentinel group lending its sentinels to Celery."""
    fixture = "cluster" if request.param == "cluster" else "group"
    server: RedisCluster | SentinelGroup = request.getfixturevalue(fixture)
    own = request.getfixturevalue("broker").url if request.param == "cluster" else None
    made = Form(request.param, server.url, f"f{uuid.uuid4().hex[:8]}", own)
    store = LaneStore.from_url(made.url, namespace=made.namespace)
    try:
        store.publish_config(_config())
    finally:
        store.close()
    yield made


@pytest.fixture
def fresh_settings(form: Form, monkeypatch: pytest.MonkeyPatch) -> Iterator[Form]:
    """The process's settings and handles read from ``form``'s environment, forgotten after."""
    for name, value_ in form.env().items():
        monkeypatch.setenv(name, value_)
    reset_settings()
    reset_ops_settings()
    runtime.reset()
    yield form
    runtime.reset()
    reset_settings()
    reset_ops_settings()


def _queued(form: Form) -> str:
    """Submit one request through a client on ``form``; its id."""
    with Client(form.url, namespace=form.namespace) as client:
        return client.submit(dict(ITEM)).id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_metrics_once_reads_the_lanes(fresh_settings: Form) -> None:
    """``mixbatch metrics --once`` on the form's URL: Redis up, the queued request counted."""
    _queued(fresh_settings)
    result = CliRunner().invoke(cli, ["metrics", "--once"], env=fresh_settings.env())
    assert result.exit_code == 0, result.output
    found = samples(result.stdout)
    assert value(found, "mixbatch_redis_up") == 1
    assert value(found, "mixbatch_lane_depth", lane="bulk") == 1
    assert value(found, "mixbatch_requests_submitted_total", lane="bulk") == 1


def test_worker_metrics_endpoint_scrapes_the_lanes(fresh_settings: Form) -> None:
    """The endpoint a worker serves (``build_registry()`` over ``tasks.runtime``), over HTTP."""
    _queued(fresh_settings)
    _queued(fresh_settings)
    port = _free_port()
    server = serve("127.0.0.1", port, build_registry(), "MIXBATCH_WORKER_METRICS_PORT")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
    found = samples(text)
    assert value(found, "mixbatch_redis_up") == 1
    assert value(found, "mixbatch_lane_depth", lane="bulk") == 2


def test_flask_extension_submits_and_reads(form: Form) -> None:
    """The extension's client from ``app.config``: a submit, then its status, on the form."""
    flask = pytest.importorskip("flask")
    from routing.contrib.flask import Mixbatch

    app = flask.Flask("forms")
    app.config.update(MIXBATCH_REDIS_URL=form.url, MIXBATCH_NAMESPACE=form.namespace)
    mixbatch = Mixbatch(app)
    with app.app_context():
        try:
            ticket = mixbatch.submit({**ITEM, "custom_id": "flask-1"})
            assert mixbatch.submit({**ITEM, "custom_id": "flask-1"}).duplicate
            assert mixbatch.client.status(ticket.id).state is State.QUEUED
            assert mixbatch.client.redis_url == form.url
        finally:
            mixbatch.client.close()


@contextlib.contextmanager
def _django_settings(form: Form) -> Iterator[None]:
    """``settings.MIXBATCH`` for ``form``, Django configured once for the process."""
    pytest.importorskip("django")
    import django
    from django.conf import settings
    from django.test import override_settings

    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["django.contrib.contenttypes", "routing.contrib.django"],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            USE_TZ=True,
        )
        django.setup()
    with override_settings(MIXBATCH={"REDIS_URL": form.url, "NAMESPACE": form.namespace}):
        yield


def test_django_client_submits_and_reads(form: Form) -> None:
    """``get_client()`` from ``settings.MIXBATCH``: a submit, then its status, on the form."""
    with _django_settings(form):
        from routing.contrib.django import get_client
        from routing.contrib.django.core import reset

        try:
            client = get_client()
            assert client.redis_url == form.url
            ticket = client.submit({**ITEM, "custom_id": "django-1"})
            assert client.submit({**ITEM, "custom_id": "django-1"}).id == ticket.id
            assert client.status(ticket.id).state is State.QUEUED
        finally:
            reset()


# -- the examples' Celery apps: the broker the service sends results on ----------------------


def _service_broker() -> tuple[str, dict[str, object]]:
    settings = get_settings()
    return settings.broker_url(), settings.broker_transport_options()


def test_flask_example_celery_connects_to_the_service_broker(
    fresh_settings: Form, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's callback worker must consume where the service sends: the service's own
    broker (a cluster store's ``MIXBATCH_BROKER_URL``, a Sentinel store's sentinels), never
    the store URL itself, which Celery cannot open."""
    pytest.importorskip("flask")
    from celery import _state

    monkeypatch.syspath_prepend(str(EXAMPLES / "flask_app"))
    from flask_docs import create_app

    default = _state.default_app
    try:
        app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"})
        celery_app = app.extensions["celery"]
        conf = celery_app.conf
        assert (conf.broker_url, dict(conf.broker_transport_options)) == _service_broker()
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2)
    finally:
        _state.default_app = default


def test_django_example_settings_name_the_service_broker(fresh_settings: Form) -> None:
    """The example project's ``CELERY_BROKER_*`` settings: the service's broker on each form."""
    found = runpy.run_path(str(EXAMPLES / "django_app" / "project" / "settings.py"))
    named = (found["CELERY_BROKER_URL"], found["CELERY_BROKER_TRANSPORT_OPTIONS"])
    assert named == _service_broker()
