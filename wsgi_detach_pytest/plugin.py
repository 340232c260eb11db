"""pytest fixtures for :mod:`wsgi_detach.testing`.

Enable it with ``wsgi_detach_testing = true`` in the pytest ini file, with
``WSGI_DETACH_TESTING=1`` in the environment (both through the package's
entry point, :mod:`wsgi_detach_pytest`), with ``-p wsgi_detach_pytest.plugin``
or with ``pytest_plugins = ["wsgi_detach_pytest.plugin"]`` in the root
``conftest.py``. Installing the package alone enables nothing.

It imports only pytest: nothing of ``wsgi_detach`` (whose import brings gevent)
until a fixture is used, so a ``conftest.py`` that monkey-patches first is
undisturbed. Its hooks are old-style hook wrappers, which pytest 7 knows too.

Fixtures:

* ``wsgi_server_kind`` -- the server the other fixtures default to:
  ``--wsgi-detach-server`` on the command line, else ``pywsgi-detach``.
* ``serve_app`` -- ``serve_app(app, server=None, **options)`` starts a
  :class:`~wsgi_detach.testing.LiveServer` (see :func:`~wsgi_detach.testing.serve`)
  that is stopped when the test ends.
* ``open_stream`` -- ``open_stream(server, path, **options)``: a
  :class:`~wsgi_detach.testing.Stream` closed when the test ends.
* ``event_source`` -- ``event_source(server, path, **options)``: an
  :class:`~wsgi_detach.testing.EventSource` closed when the test ends.

When a test fails, its report shows the log of every server it started.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from wsgi_detach.testing import EventSource, LiveServer, Stream

_DEFAULT_SERVER = "pywsgi-detach"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("wsgi_detach", "wsgi_detach testing kit")
    group.addoption(
        "--wsgi-detach-server",
        default=_DEFAULT_SERVER,
        help="the server serve_app uses by default (one of wsgi_detach.testing.SERVERS; "
        f"default {_DEFAULT_SERVER})",
    )


@pytest.fixture
def wsgi_server_kind(request: pytest.FixtureRequest) -> str:
    """The server ``serve_app`` uses when not told: ``--wsgi-detach-server``."""
    kind: str = request.config.getoption("--wsgi-detach-server")
    return kind


@pytest.fixture
def serve_app(wsgi_server_kind: str) -> Iterator[Callable[..., LiveServer]]:
    """``serve_app(app, server=None, **options)``: a started server, stopped after the test."""
    from wsgi_detach.testing import serve

    with ExitStack() as stack:

        def start(app: Any, server: str | None = None, **options: Any) -> LiveServer:
            return stack.enter_context(serve(app, server or wsgi_server_kind, **options))

        yield start


@pytest.fixture
def open_stream() -> Iterator[Callable[..., Stream]]:
    """``open_stream(target, path="/", **options)``: a Stream, closed after the test."""
    from wsgi_detach.testing import Stream

    with ExitStack() as stack:

        def open_(target: Any, path: str = "/", **options: Any) -> Stream:
            return stack.enter_context(Stream(target, path, **options))

        yield open_


@pytest.fixture
def event_source() -> Iterator[Callable[..., EventSource]]:
    """``event_source(target, path="/", **options)``: an EventSource, closed after the test."""
    from wsgi_detach.testing import EventSource

    with ExitStack() as stack:

        def open_(target: Any, path: str = "/", **options: Any) -> EventSource:
            return stack.enter_context(EventSource(target, path, **options))

        yield open_


def _launched() -> list[LiveServer]:
    # Without importing the kit: if it is not imported, nothing was launched.
    servers = sys.modules.get("wsgi_detach.testing._servers")
    return [] if servers is None else servers.LiveServer.launched


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # The servers of earlier tests are let go: a long suite keeps none of them.
    _launched().clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test's report shows the logs of the servers it started."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for server in _launched():
            report.sections.append(
                (f"wsgi_detach server {server.server} on port {server.port} log",
                 server.log()[-10000:] or "(nothing)")
            )
