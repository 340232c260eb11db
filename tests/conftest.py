"""Shared fixtures (real servers in subprocesses), the matrix recorder, and test grouping.

``python -m pytest -n 3 --dist loadgroup`` runs the suite on pytest-xdist
workers, in about half the time: most of it is spent waiting on servers and
clients, not computing. Tests go to workers in groups so that each server
starts once:
a module's tests together, split by server kind where a module-scoped
fixture is parametrised over server kinds. The conformance matrix (which
measures latencies for README.md) and the soak (3000 clients per server, the
heaviest load) share one group: they never run beside each other, and each
measures its servers one after another as before.

Not the default (pyproject.toml) yet: under that load the soak's
pywsgi-detach server dies now and then with gevent's ``LoopExit`` (the
loop's reference count at -1), which points at ``loop.run_callback_threadsafe``
from the disconnect watcher's thread: gevent's ``run_callback`` does
``loop.ref()`` from the calling thread, which its own source marks as maybe
not thread-safe. A failed test's report now carries its servers' stderr,
which is how that was seen.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

# Hypothesis loads third-party "hypothesis" entry points on import; a trio
# release that selenium pulls in registers one that no longer exists and
# crashes the run. We register no strategies through plugins.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import pytest

from tests import matrix_report
from tests.redis_server import RedisServer
from tests.servers import ServerProcess, serve


@pytest.fixture(scope="module", params=["pywsgi", "pywsgi-patched", "wsgiref"])
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """tests/apps.py served by each core server kind, over a real loopback socket.

    On teardown, asserts that wsgiref.validate (wrapped around the app in the
    server) objected to nothing during the whole module.
    """
    with serve(request.param, "tests.apps:app") as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, without persistence; stopped by its PID.

    Skipped where redis-server is absent (a failure with WSGI_DETACH_REQUIRE_REDIS=1).
    """
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server_aof() -> Iterator[RedisServer]:
    """Like ``redis_server``, with every write in an append-only file: restartable with its data."""
    with RedisServer(appendonly=True) as server:
        yield server


# The conformance matrix records every (server, case) outcome; written to
# build/matrix.json at the end of the session for tests/matrix_report.py.
_matrix_results: dict[str, dict[str, dict[str, object]]] = {}


#: Module-scoped fixtures parametrised over server kinds: each kind is a group.
_SERVER_FIXTURES = ("served", "server")
#: Modules that run one after another in one group (see the module docstring).
_SERIAL = ("tests/test_matrix.py", "tests/test_soak.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = item.nodeid.partition("::")[0]
        params = getattr(item, "callspec", None)
        if group in _SERIAL:
            group = "serial"
        elif params is not None:
            kinds = [params.params[name] for name in _SERVER_FIXTURES if name in params.params]
            group += "".join(f"[{kind}]" for kind in kinds)
        item.add_marker(pytest.mark.xdist_group(group))


_first_launched = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_first_launched] = len(ServerProcess.launched)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report shows what its servers printed to stderr (tracebacks, exits).

    Its servers: those its fixtures hold, and those it (or a fixture) started itself.
    """
    report = yield
    if report.failed:
        servers = {
            id(value): (name, value)
            for name, value in getattr(item, "funcargs", {}).items()
            if isinstance(value, ServerProcess)
        }
        for value in ServerProcess.launched[item.stash.get(_first_launched, 0):]:
            servers.setdefault(id(value), ("started by the test", value))
        for name, value in servers.values():
            code = value.proc.poll() if value.proc is not None else None
            state = "running" if code is None else f"exited with {code}"
            report.sections.append(
                (f"server {name} ({value.server}, {state}) stderr",
                 value.stderr_text()[-10000:] or "(nothing)")
            )
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    entry = dict(report.user_properties).get("matrix")
    if not isinstance(entry, dict):
        return
    outcome = report.outcome
    if outcome == "passed" and entry.get("broken"):
        outcome = "broken"
    elif outcome == "passed" and entry["note"]:
        outcome = "limited"
    matrix_report.record(
        _matrix_results,
        entry["server"],
        entry["case"],
        outcome=outcome,
        text=entry["text"],
        note=entry["note"],
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Under xdist the controller gets every worker's reports and writes the
    # whole matrix; a worker would write only its part.
    if _matrix_results and not hasattr(session.config, "workerinput"):
        matrix_report.write_results(_matrix_results)
