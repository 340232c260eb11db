"""The testing kit (wsgi_detach.testing) against every server it offers, and its failure paths.

Each server kind serves tests/kit_apps.py (in a thread, or a subprocess for
gunicorn and for the subprocess variant of pywsgi-detach); the same scenario
runs on each: the head at once, SSE events with ids, a reset noticed by the
server at its next write (``outcome == "disconnected"``), a reconnect that
resumes with ``Last-Event-ID``, long-poll JSON, and stats back to zero. The
failure paths: a server that does not start (it exits, or it hangs), a
stream that never sends, a connection reset or closed in the middle of a
chunk, a wait on the server side that runs out -- each with a message that
says what happened.
"""

from __future__ import annotations

import _thread
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import kit_apps
from wsgi_detach.testing import (
    SERVERS,
    SMALL_SNDBUF,
    EventSource,
    LiveServer,
    ProcessServer,
    ServerDidNotStart,
    SSEParser,
    Stream,
    ThreadServer,
    WaitTimeout,
    get,
    get_json,
    parse_sse,
    serve,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent

#: (server, in a subprocess) pairs: every kind in a thread where it can run
#: in one, gunicorn in a subprocess, and the default kind in both.
#: Servers where a client that leaves an idle response is noticed at once
#: (wsgi_detach watches the connection): the others notice at their next write.
NOTICES_IDLE = {"pywsgi-detach", "detach-server", "waitress", "gunicorn-gevent",
                "gunicorn-gthread"}

CASES = [(kind, kind.startswith("gunicorn-")) for kind in SERVERS] + [("pywsgi-detach", True)]


def _case_id(case: tuple[str, bool]) -> str:
    return f"{case[0]}-{'process' if case[1] else 'thread'}"


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    kind, process = request.param
    app: object = "tests.kit_apps:app" if process else kit_apps.app
    if kind == "detach-server" and not process:
        # Its stop() drains the middleware for good: a fresh one per server.
        app = kit_apps.plain_app
    with serve(app, kind, process=process) as live:
        yield live


def publish(server: LiveServer, data: str) -> str:
    """Publish through the app (works whether the hub is in this process or not)."""
    return get(server, f"/publish?data={data}").body.decode()


def wait_subscribed(server: LiveServer, count: int) -> None:
    """Wait until ``count`` SSE streams are open on the server (seen through its stats)."""
    wait_until(lambda: server.stats().open >= count, 5,
               message=lambda: f"{count} streams did not open: {server.stats()}")


def test_head_at_once_then_chunks_with_arrival_times(server: LiveServer) -> None:
    with Stream(server, "/mute", timeout=5) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/plain"
        assert stream.head_at >= stream.started
        assert stream.next_chunk() == b"started\n"
        assert stream.arrivals[0].at >= stream.head_at
        with pytest.raises(WaitTimeout, match=r"the next (chunk|piece of the body) did not "
                           r"arrive within 0\.\d+s; GET /mute \(status 200\): "
                           r"1 chunks / 8 bytes so far"):
            stream.next_chunk(timeout=0.3)
    # Seen at once where the server watches idle connections; elsewhere
    # the body's idle_timeout ends it.
    expected = "disconnected" if server.server in NOTICES_IDLE else "timed_out"
    server.wait_closed(stream, outcome=expected)


def test_sse_reset_resume_and_stats_back_to_zero(server: LiveServer) -> None:
    with EventSource(server, "/events", timeout=5) as source:
        wait_subscribed(server, 1)
        first = publish(server, "one")
        publish(server, "two")
        assert [e.data for e in source.take(2)] == ["one", "two"]
        assert source.events[0].last_event_id == first
        assert source.parser.retry == 50
        left = source.stream
        left.reset()
        # The server notices the reset at its next write, on every server.
        publish(server, "three")
        closed = server.wait_closed(left, outcome="disconnected")
        assert closed.on_close_at is not None and closed.closed_at is not None
        publish(server, "four")
        assert [e.data for e in source.take(2)] == ["three", "four"]
        assert source.sent_ids == [None, source.events[1].last_event_id]
        assert server.exchange(source.stream).last_event_id == source.events[1].last_event_id
    # The client closed the last stream; a server that cannot see that sees
    # it at the next heartbeat.
    server.wait_idle()


def test_long_poll_json(server: LiveServer) -> None:
    now = get_json(server, "/poll?cursor=")  # "from now": waits
    assert now["messages"] == [] and now["cursor"]
    cursor = publish(server, "a")
    after = get_json(server, f"/poll?cursor={now['cursor']}")
    assert [m["data"] for m in after["messages"]] == ["a"]
    assert after["cursor"] == cursor


def test_a_stream_that_never_sends_times_out_with_a_clear_message(server: LiveServer) -> None:
    with pytest.raises(WaitTimeout, match=r"the status line \(sent with the first non-empty "
                       r"chunk\) did not arrive within 0\.\d+s; GET /silent"):
        Stream(server, "/silent", timeout=0.5)
    # The client gave up first; a server that cannot see that times the body
    # out, and as the head never went out, answers 504.
    silent = server.wait_closed("/silent")
    assert (silent.outcome, silent.status) in {("disconnected", None),
                                               ("timed_out", "504 Gateway Timeout")}


def test_a_server_side_wait_that_runs_out_says_what_it_saw(server: LiveServer) -> None:
    with Stream(server, "/mute") as stream:
        with pytest.raises(WaitTimeout, match=r"(?s)GET /mute was not closed: Exchange\(.*"
                           r"status='200 OK'.*\(waited 0\.2s\)"):
            server.wait_closed(stream, timeout=0.2)


# ---------------------------------------------------------------------- failure paths


def test_a_server_that_exits_at_start_shows_its_log() -> None:
    with pytest.raises(ServerDidNotStart, match=r"(?s)pywsgi-detach exited with 1 .*"
                       r"AttributeError: module 'tests.kit_apps' has no attribute 'missing'"):
        with serve("tests.kit_apps:missing", process=True):
            pass


def test_a_server_that_does_not_start_in_time_shows_its_log(tmp_path: Path) -> None:
    (tmp_path / "slow_to_import.py").write_text(textwrap.dedent("""
        import sys, time
        print("loading the app slowly", file=sys.stderr, flush=True)
        time.sleep(30)
        app = None
    """))
    started = time.monotonic()
    with pytest.raises(ServerDidNotStart, match=r"(?s)waitress did not start within 1\.0s "
                       r"\(running\).*loading the app slowly"):
        with serve("slow_to_import:app", "waitress", process=True, timeout=1.0,
                   env={"PYTHONPATH": str(tmp_path)}):
            pass
    assert time.monotonic() - started < 15  # stopped by its PID, not waited for


@pytest.mark.parametrize("kind", ["pywsgi-detach", "pywsgi", "waitress", "wsgiref"])
def test_a_thread_server_given_up_on_closes_instead_of_serving(kind: str) -> None:
    """A start that runs out of time leaves no thread serving a port nobody will stop."""
    # A thread may get ready before start() looks, even with no time at all:
    # then try again (bounded).
    for _ in range(50):
        try:
            with serve(kit_apps.app, kind, timeout=0):
                pass
        except ServerDidNotStart as exc:
            assert f"{kind} did not start within 0s" in str(exc)
            break
    else:
        raise AssertionError("every start beat a timeout of 0 s")
    given_up = LiveServer.launched[-1]
    assert isinstance(given_up, ThreadServer) and given_up._thread is not None
    given_up._thread.join(10)
    assert not given_up._thread.is_alive()
    assert not given_up.running
    assert "start() had given up on it" in given_up.log()


def test_an_interrupt_while_a_subprocess_starts_stops_the_child(tmp_path: Path) -> None:
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(30)\napp = None\n")
    interrupt = threading.Timer(1.0, _thread.interrupt_main)
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with serve("slow_to_import:app", "pywsgi", process=True,
                       env={"PYTHONPATH": str(tmp_path)}):
                pass
    finally:
        interrupt.cancel()
    child = LiveServer.launched[-1]
    assert isinstance(child, ProcessServer) and child.proc is not None
    assert child.proc.poll() is not None  # stopped by its PID before the exception left serve()


@pytest.mark.parametrize("kind", ["pywsgi-detach", "pywsgi", "wsgiref"])
def test_a_stalled_small_buffer_client_holds_up_a_small_send_buffer_server_at_kilobytes(
    kind: str
) -> None:
    """send_buffer=SMALL_SNDBUF: the server's writes block after ~14 KiB, not megabytes."""
    written = [0]

    def app(environ: dict[str, object], start_response: Callable[..., object]
            ) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for _ in range(16 * 1024):  # 16 MiB at most
            yield b"x" * 1024
            written[0] += 1024

    with serve(app, kind, send_buffer=SMALL_SNDBUF) as server:
        with Stream(server, "/", small_buffer=True) as stream:
            stream.stall()
            # The writes stop when the buffers are full: wait for no progress
            # over 0.3 s (a measurement, so it has to be timed), bounded.
            last = -1
            deadline = time.monotonic() + 10
            while written[0] != last and time.monotonic() < deadline:
                last = written[0]
                time.sleep(0.3)
            assert written[0] == last, "the server never stopped writing"
            assert written[0] <= 64 * 1024, f"{written[0]} bytes written to a stalled client"
            stream.reset()


def test_a_bad_send_buffer_is_refused_where_it_is_given() -> None:
    with pytest.raises(ValueError, match=r"send_buffer must be a number of bytes >= 0, got -1"):
        with serve(kit_apps.app, "wsgiref", send_buffer=-1):
            pass
    with pytest.raises(ValueError, match=r"send_buffer is not available on gunicorn"):
        with serve("tests.kit_apps:app", "gunicorn-gthread", send_buffer=4096):
            pass


def test_a_subprocess_whose_server_fails_before_listening_fails_at_once(tmp_path: Path) -> None:
    """The error is in the message at once, not after the start timeout and a SIGKILL."""
    (tmp_path / "waitress.py").write_text('raise ImportError("no waitress here")\n')
    started = time.monotonic()
    with pytest.raises(ServerDidNotStart, match=r"(?s)waitress exited with 1 .*"
                       r"ImportError: no waitress here.*the server thread failed"):
        with serve("tests.kit_apps:app", "waitress", process=True, timeout=15,
                   env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}):
            pass
    assert time.monotonic() - started < 10


def test_a_thread_server_that_cannot_start_says_why() -> None:
    def app(environ: object, start_response: object) -> list[bytes]:
        return []

    with pytest.raises(ValueError, match=r"gunicorn-gevent runs in a subprocess only"):
        with serve(app, "gunicorn-gevent", process=False):
            pass
    with pytest.raises(TypeError, match=r"a server subprocess imports its app: pass "
                       r"'module:name'"):
        with serve(lambda e, s: [], process=True):
            pass
    with pytest.raises(ValueError, match=r"unknown server 'tornado'; choose from "):
        with serve(app, "tornado"):
            pass


def _raw_server(script: bytes, end: str) -> tuple[int, threading.Thread]:
    """A one-connection server that answers ``script`` and then ends with FIN or RST."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(script)
            time.sleep(0.05)
            if end == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("end", ["reset", "closed"])
def test_a_connection_ended_mid_chunk_is_not_a_complete_body(end: str) -> None:
    chunk = b"data: one\n\n"
    cut = b"20\r\ndata: cut"  # a 32-byte chunk, 9 bytes of it sent
    port, thread = _raw_server(HEAD + b"%x\r\n%s\r\n" % (len(chunk), chunk) + cut, end)
    with Stream(port, "/", timeout=5) as stream:
        assert stream.next_event().data == "one"  # type: ignore[union-attr]
        assert stream.next_chunk() is None
        assert not stream.complete
        assert stream.ending == end
        assert stream.body == chunk
    thread.join(5)


def test_a_complete_chunked_body_is_complete() -> None:
    port, thread = _raw_server(HEAD + b"3\r\nabc\r\n0\r\n\r\n", "closed")
    with Stream(port, "/") as stream:
        assert stream.read_all() == b"abc"
        assert stream.complete and stream.ending == "complete"
    thread.join(5)


def test_half_close_keeps_the_response_coming_on_plain_pywsgi() -> None:
    with serve(kit_apps.app, "pywsgi") as server:
        with EventSource(server, "/events") as source:
            wait_subscribed(server, 1)
            source.stream.half_close()
            kit_apps.hub.publish("after half-close")
            assert source.take(1)[0].data == "after half-close"
            assert len(source.connections) == 1


def test_a_stalled_small_buffer_client_backs_the_server_up() -> None:
    """With small_buffer, a stalled reader makes the body buffer after a few hundred KiB at most."""
    with serve(kit_apps.app, "pywsgi-detach") as server:
        with Stream(server, "/events", small_buffer=True) as stream:
            wait_subscribed(server, 1)
            stream.stall()
            chunk = "x" * 4096
            wait_until(lambda: kit_apps.hub.publish(chunk) and server.stats().buffered > 0,
                       10, message=lambda: f"the server never buffered: {server.stats()}")
            sent = kit_apps.hub.cursor
        assert int(sent.split("-")[1]) < 1000


def test_sse_parser_keeps_the_id_and_drops_the_half_event_across_a_reconnect() -> None:
    parser = parse_sse(b"retry: 70\nid: 7\ndata: whole\n\ndata: half")
    assert [e.data for e in parser.events] == ["whole"]
    parser.reconnected()
    parser.feed(b"data: next\n\n")
    assert [(e.data, e.last_event_id) for e in parser.events] == [("whole", "7"), ("next", "7")]
    assert parser.retry == 70


def test_sse_parser_forgets_the_id_of_an_event_cut_off_by_a_reconnect() -> None:
    """Only a dispatched event sets the last event id; an undispatched one's id is dropped."""
    parser = parse_sse(b"id: 1\ndata: a\n\nid: 2\ndata: b")
    assert parser.last_event_id == "1"
    parser.reconnected()
    parser.feed(b"data: c\n\n")
    assert [(e.data, e.last_event_id) for e in parser.events] == [("a", "1"), ("c", "1")]
    assert parser.last_event_id == "1"


def test_event_source_never_claims_an_event_it_did_not_receive() -> None:
    """A server that drops mid-event: the reconnects resume after the last whole event."""
    answers = iter([b"retry: 10\nid: 1\ndata: a\n\nid: 2\ndata: b",
                    b"data: c\n\n", b"data: d\n\n"])

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return [next(answers, b"")]

    with serve(app, "pywsgi") as server, EventSource(server, "/") as source:
        assert [(e.data, e.last_event_id) for e in source.take(3)] == [
            ("a", "1"), ("c", "1"), ("d", "1")]
        assert source.sent_ids == [None, "1", "1"]


def test_event_source_says_it_did_not_reconnect_when_the_retry_outlasts_the_wait() -> None:
    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return [b"retry: 3000\ndata: one\n\n"]

    with serve(app, "pywsgi") as server, EventSource(server, "/") as source:
        assert source.take(1)[0].data == "one"
        with pytest.raises(WaitTimeout, match=r"^0 of 1 events within 1\.5s: \[\]; "
                           r"then no event within 1\.\d+s over 1 connections; the stream ended "
                           r"and the reconnection delay \(2\.0s\) was longer than the "
                           r"1\.\d\ds left, so it did not reconnect"):
            source.take(1, timeout=1.5)


def _dies_mid_body(environ: dict[str, object], start_response: Callable[..., object]
                   ) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"part one\n"
    raise RuntimeError("the app dies mid-body")


@pytest.mark.parametrize(("kind", "ending"), [("pywsgi", "eof"), ("pywsgi-detach", "reset")])
def test_a_close_delimited_body_is_never_reported_complete(kind: str, ending: str) -> None:
    """Ended by a FIN, a body without a length may be whole or cut: "eof", not complete."""
    with serve(_dies_mid_body, kind) as server, Stream(server, "/", http10=True) as stream:
        assert stream.read_all() == b"part one\n"
        assert (stream.ending, stream.complete) == (ending, False)


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "204 No Content"),
                                                ("GET", "304 Not Modified")])
def test_a_response_without_a_body_ends_with_its_head(method: str, status: str) -> None:
    def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterator[bytes]:
        start_response(status, [("Content-Type", "text/plain")])
        yield b""

    with serve(app, "pywsgi") as server:
        with Stream(server, "/", method=method, timeout=3) as stream:
            assert stream.read_all(timeout=1) == b""
            assert (stream.ending, stream.complete) == ("complete", True)


def test_sse_parser_dispatches_a_cr_ended_event_at_once() -> None:
    assert [e.data for e in parse_sse(b"data: x\r\r").events] == ["x"]
    parser = SSEParser()
    assert [e.data for e in parser.feed(b"data: y\r")] == []
    assert [e.data for e in parser.feed(b"\r")] == ["y"]  # no more bytes needed
    assert [e.data for e in parser.feed(b"\ndata: z\r\n\r\n")] == ["z"]  # that LF ends nothing


_SSE_DATA = st.text(st.characters(codec="utf-8", blacklist_characters="\r\n\0"), max_size=5)


@given(
    st.lists(st.tuples(_SSE_DATA, st.sampled_from(["1", "", "x y"]),
                       st.sampled_from(["\n", "\r", "\r\n"])), min_size=1, max_size=4),
    st.lists(st.integers(0, 200), max_size=6),
)
def test_sse_parser_round_trips_any_line_ending_and_chunking(
    events: list[tuple[str, str, str]], cuts: list[int]
) -> None:
    """Events written with LF, CR or CRLF line ends, cut anywhere: all dispatched, as written."""
    wire = "".join(f"id: {id_}{end}data: {data}{end}{end}" for data, id_, end in events).encode()
    parser = parse_sse(wire, [c for c in cuts if c <= len(wire)])
    assert [(e.data, e.last_event_id) for e in parser.events] == [(d, i) for d, i, _ in events]


def test_the_kit_works_in_a_monkey_patched_test_process() -> None:
    """The same client and thread server after gevent.monkey.patch_all() (a greenlet 'thread')."""
    script = textwrap.dedent("""
        from gevent import monkey
        monkey.patch_all()
        from tests import kit_apps
        from wsgi_detach.testing import EventSource, serve, wait_until
        with serve(kit_apps.app, "pywsgi-detach") as server:
            with EventSource(server, "/events") as source:
                wait_until(lambda: kit_apps.hub.subscribers == 1, 5)
                kit_apps.hub.publish("patched")
                assert source.take(1)[0].data == "patched"
                source.stream.reset()
                kit_apps.hub.publish("again")
                server.wait_closed(source.connections[0], outcome="disconnected")
                assert source.take(1)[0].data == "again"
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "OK", done.stderr


def run_pytest(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest in a subprocess with only the plugins named here (no installed entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env),
    )


NOTHING_IMPORTED = textwrap.dedent("""
    import sys
    assert "gevent" not in sys.modules and "wsgi_detach" not in sys.modules, sorted(sys.modules)
""")


def test_the_package_registers_the_inert_module_as_its_entry_point() -> None:
    setup = (ROOT / "setup.cfg").read_text()
    assert "pytest11 =\n    wsgi_detach_pytest = wsgi_detach_pytest\n" in setup


def test_the_entry_point_alone_adds_nothing_to_an_unrelated_suite(tmp_path: Path) -> None:
    """Loaded as the entry point is, not enabled: no option, no fixture, no gevent import."""
    (tmp_path / "conftest.py").write_text(NOTHING_IMPORTED)
    (tmp_path / "test_unrelated.py").write_text(NOTHING_IMPORTED + textwrap.dedent("""
        def test_nothing_of_ours_was_imported():
            assert "gevent" not in sys.modules and "wsgi_detach" not in sys.modules
    """))
    done = run_pytest(tmp_path, "-p", "wsgi_detach_pytest", "-q")
    assert "1 passed" in done.stdout, done.stdout + done.stderr
    fixtures = run_pytest(tmp_path, "-p", "wsgi_detach_pytest", "--fixtures")
    assert fixtures.returncode == 0, fixtures.stdout + fixtures.stderr
    assert "serve_app" not in fixtures.stdout and "open_stream" not in fixtures.stdout
    help_ = run_pytest(tmp_path, "-p", "wsgi_detach_pytest", "--help")
    assert "--wsgi-detach-server" not in help_.stdout
    assert "wsgi_detach_testing" in help_.stdout  # the switch that enables it


ENABLED_SUITE = textwrap.dedent("""
    import sys

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hi"]

    def test_fixtures_serve(serve_app, open_stream, event_source, wsgi_server_kind):
        assert wsgi_server_kind == "wsgiref"
        assert open_stream(serve_app(app), "/").read_all() == b"hi"
""")


@pytest.mark.parametrize("how", ["ini", "env", "-p", "pytest_plugins", "all at once"])
def test_the_plugin_is_enabled_by_ini_env_p_or_conftest(tmp_path: Path, how: str) -> None:
    """Each switch enables it once, before option parsing, importing no gevent before a fixture."""
    plugin = "wsgi_detach_pytest.plugin"
    conftest = NOTHING_IMPORTED
    args = ["-p", "wsgi_detach_pytest", "--wsgi-detach-server", "wsgiref", "--trace-config", "-q"]
    env = {}
    if how in ("ini", "all at once"):
        (tmp_path / "pytest.ini").write_text("[pytest]\nwsgi_detach_testing = true\n")
    if how in ("env", "all at once"):
        env["WSGI_DETACH_TESTING"] = "1"
    if how in ("-p", "all at once"):
        args = ["-p", plugin, *args]
    if how in ("pytest_plugins", "all at once"):
        conftest += f"pytest_plugins = [{plugin!r}]\n"
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_user.py").write_text(ENABLED_SUITE)
    done = run_pytest(tmp_path, *args, **env)
    assert "1 passed" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count(f"PLUGIN registered: <module '{plugin}'") == 1, done.stdout


def test_the_plugin_keeps_only_the_current_tests_servers(tmp_path: Path) -> None:
    """A long suite does not keep every server it started (and its log) until the end."""
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import pytest
        from wsgi_detach.testing import LiveServer

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"hi"]

        @pytest.mark.parametrize("n", range(3))
        def test_one_server_each(serve_app, n):
            serve_app(app, "wsgiref")
            assert len(LiveServer.launched) == 1
    """))
    done = run_pytest(tmp_path, "-p", "wsgi_detach_pytest.plugin", "-q")
    assert "3 passed" in done.stdout, done.stdout + done.stderr


def test_the_plugin_reports_the_server_log_of_a_failed_test(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import logging

        def app(environ, start_response):
            logging.getLogger("wsgi_detach").error("the app says hello to the log")
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"hi"]

        def test_passes(serve_app, open_stream, wsgi_server_kind):
            assert wsgi_server_kind == "waitress"
            server = serve_app(app)
            assert open_stream(server, "/").read_all() == b"hi"

        def test_fails(serve_app, open_stream):
            server = serve_app(app, "wsgiref")
            open_stream(server, "/").read_all()
            assert False, "on purpose"
    """))
    done = run_pytest(tmp_path, "-p", "wsgi_detach_pytest.plugin",
                      "--wsgi-detach-server", "waitress", "-q")
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    assert "wsgi_detach server wsgiref on port" in done.stdout
    assert "the app says hello to the log" in done.stdout


def test_a_chatty_app_in_a_subprocess_never_blocks_on_its_stdout(tmp_path: Path) -> None:
    """Its stdout is copied into the log after the ready line too, not left to fill a pipe."""
    (tmp_path / "chatty.py").write_text(textwrap.dedent("""
        def app(environ, start_response):
            print("x" * 100_000, flush=True)  # more than a pipe holds
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"said it"]
    """))
    with serve("chatty:app", "wsgiref", process=True,
               env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}) as server:
        for _ in range(3):
            assert get(server, "/", timeout=5).body == b"said it"
        wait_until(lambda: server.log().count("x" * 100_000) == 3, 5)
