"""_adopt: Bottle's queue-as-body pattern and detached bodies are found in frameworks' iterators.

Each framework is called in-process as the WSGI app it is, with a gevent
queue (Bottle's queue-as-body pattern) as the response body; the search must find that
very queue in whatever the framework returns, and nothing in an ordinary
response.
"""

from __future__ import annotations

from typing import Any, Callable
from wsgiref.util import setup_testing_defaults

import gevent.queue
import pytest

from tests.client import Stream, wait_until
from tests.servers import serve
from wsgi_detach import DetachedBody
from wsgi_detach._adopt import SEARCH_LIMIT, find_inside, is_queue

#: A module-level queue: reachable from every function's globals, and
#: therefore exactly what the search must not find by accident.
SHARED: gevent.queue.Queue = gevent.queue.Queue()  # type: ignore[type-arg]


def _call(app: Callable[..., Any], path: str = "/") -> Any:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    return app(environ, lambda status, headers, exc_info=None: lambda data: None)


def _queue() -> gevent.queue.Queue:  # type: ignore[type-arg]
    queue: gevent.queue.Queue = gevent.queue.Queue()  # type: ignore[type-arg]
    queue.put(b"first")  # Bottle peeks at the first chunk inside the app call
    return queue


def _flask(body: object) -> Any:
    import flask

    app = flask.Flask(__name__)
    app.add_url_rule("/", "stream", lambda: flask.Response(body))
    return _call(app)


def _bottle(body: object) -> Any:
    import bottle

    app = bottle.Bottle()
    app.route("/", callback=lambda: body)
    return _call(app)


def _webob(body: object) -> Any:
    import webob

    return _call(webob.Response(app_iter=body))


_django_body: list[object] = []


def _django_view(request: Any) -> Any:
    from django.http import StreamingHttpResponse

    return StreamingHttpResponse(_django_body[-1])


def _django(body: object) -> Any:
    import django
    from django.conf import settings
    from django.urls import path

    if not settings.configured:
        settings.configure(
            DEBUG=False, ALLOWED_HOSTS=["*"], SECRET_KEY="test", ROOT_URLCONF=__name__,
            MIDDLEWARE=[], INSTALLED_APPS=[],
        )
        django.setup()
        urlpatterns.append(path("", _django_view))
    from django.core.handlers.wsgi import WSGIHandler

    _django_body.append(body)  # Django caches the URL conf: the view reads the body from here
    return _call(WSGIHandler())


urlpatterns: list[Any] = []

FRAMEWORKS = {"flask": _flask, "bottle": _bottle, "webob": _webob, "django": _django}


#: webob imports the stdlib cgi module, deprecated in 3.11; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("kind", ["queue", "body"])
def test_found_inside_each_framework(framework: str, kind: str) -> None:
    body: Any = _queue() if kind == "queue" else DetachedBody()
    if kind == "body":
        body.put(b"first")
    result = FRAMEWORKS[framework](body)
    try:
        assert result is body or find_inside(result) is body
    finally:
        getattr(result, "close", lambda: None)()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_nothing_found_in_an_ordinary_response(framework: str) -> None:
    SHARED.put(b"unrelated")
    result = FRAMEWORKS[framework]([b"plain", b" bytes"])
    try:
        assert find_inside(result) is None
    finally:
        getattr(result, "close", lambda: None)()


def test_the_search_is_bounded() -> None:
    queue = _queue()
    deep: Any = queue
    for _ in range(SEARCH_LIMIT + 1):
        deep = [deep]
    assert find_inside(deep) is None
    assert find_inside([[queue]]) is queue


def test_every_gevent_queue_kind_is_a_queue() -> None:
    kinds = [gevent.queue.Queue, gevent.queue.JoinableQueue, gevent.queue.LifoQueue,
             gevent.queue.PriorityQueue, gevent.queue.Channel]
    assert all(is_queue(kind()) for kind in kinds)
    assert not is_queue([b"a list"])


def test_an_adopted_queue_on_a_threaded_server_leaves_no_pump_behind() -> None:
    """Regression: on waitress, every abandoned queue-as-body request left its pump
    greenlet frozen in the request thread's hub (found by the soak/matrix work)."""
    with serve("waitress", "tests.matrix_apps:app") as server:
        for _ in range(10):
            with Stream(server.port, "/queue?n=1000&interval=0.05", timeout=5) as stream:
                stream.read_head()
                assert stream.read_chunk()
        pumps: list[str] = []

        def no_pumps_left() -> bool:
            pumps[:] = [k for k in server.info()["greenlet_kinds"] if "_pump" in k]
            return not pumps

        assert wait_until(no_pumps_left, timeout=5), pumps


def test_a_private_queue_of_an_ordinary_generator_is_not_adopted() -> None:
    """a generator draining a work queue filled before the app returned
    was taken for Bottle's queue-as-body pattern: counted in max_open (-> 503), given streaming
    headers, and a drain would have put StopIteration into the app's own queue."""
    from wsgi_detach import DetachMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        jobs: gevent.queue.Queue = gevent.queue.Queue()  # type: ignore[type-arg]
        for n in (1, 2, 3):
            jobs.put(n)
        jobs.put(StopIteration)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])

        def results() -> Any:  # an ordinary, self-contained generator
            for n in jobs:
                yield f"{n * 11}".encode()

        return results()

    assert find_inside(app({}, lambda *args: None)) is None
    middleware = DetachMiddleware(app, max_open=1)
    heads: list[Any] = []
    responses = []
    for _ in range(2):  # the first still open: it must not hold a max_open slot
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        responses.append(middleware(environ, lambda s, h, e=None: heads.append((s, h))))
    head = ("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    assert heads == [head, head]  # no 503, no streaming headers
    assert [b"".join(r) for r in responses] == [b"112233", b"112233"]  # handed back unchanged
    assert middleware.stats().open == 0


@pytest.mark.parametrize("framework", ["flask", "django"])
def test_the_same_queue_behind_a_framework_is_still_adopted(framework: str) -> None:
    """The other side: Bottle's queue-as-body pattern in a framework's wrapper is found."""
    queue = _queue()
    result = FRAMEWORKS[framework](queue)
    try:
        assert find_inside(result) is queue
    finally:
        getattr(result, "close", lambda: None)()


def test_a_body_inside_an_ordinary_generator_is_still_found() -> None:
    body = DetachedBody()

    def relay() -> Any:
        yield from body

    assert find_inside(relay()) is body
