"""Server-sent events: an exact encoder, and :class:`EventStream`, an SSE body.

When to use it: pushing events to a browser's ``EventSource`` (or any SSE
client) from callbacks, greenlets or threads -- tickers, notifications, a chat.
The browser reconnects by itself and tells you the last id it saw; pair the
stream with :class:`~wsgi_detach.Hub` to resume without loss.

When not to: the client must talk back on the same connection (use a
WebSocket), or it needs binary payloads (SSE is UTF-8 text; base64 costs a
third more), or the browser keeps more than a handful of streams open on one
HTTP/1.1 origin (browsers allow about six connections per origin).

Encoding rules, from the WHATWG HTML standard, section "Server-sent events",
"Parsing an event stream" and "Interpreting an event stream":

* the stream is UTF-8; a line ends with CRLF, LF or CR;
* ``data:`` lines are joined with LF, so a value with line breaks is sent as
  one ``data:`` line per line, and CR/CRLF inside it come out as LF;
* the parser removes exactly one space after the colon, so we always write
  ``"field: value"`` and a value that starts with a space survives;
* ``event`` and ``id`` are single-line values: a line break would end the
  field early and inject whatever follows as another field, so we refuse
  them; an ``id`` containing NUL is ignored by the parser, so we refuse it too;
* ``retry`` is honoured only when it is all ASCII digits: an ``int >= 0``;
* a line starting with ``:`` is a comment; comments keep proxies from closing
  an idle stream and cost the client nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

from ._body import (
    DEFAULT_OPTIONS,
    NO_BUDGET,
    REGISTER_KEY,
    BodyOptions,
    DetachedBody,
    rebase,
    register,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["EventStream", "encode_comment", "encode_event", "read_last_event_id"]

#: The media type; the charset parameter is informative (SSE is always UTF-8).
CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"

#: Headers every event stream needs. ``no-cache``: a cached stream would be
#: replayed stale. ``X-Accel-Buffering: no``: nginx buffers proxied responses
#: unless told not to, which would hold events back.
SSE_HEADERS: Final = (
    ("Content-Type", CONTENT_TYPE),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
)

# One regex for every line terminator the parser knows (CRLF first, so it
# counts once).
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")

#: A heartbeat: an empty comment line. Non-empty on the wire (servers skip
#: empty writes, and an empty write detects no departed client) and
#: invisible to the client's ``onmessage``.
HEARTBEAT: Final = b":\n"


def _single_line(name: str, value: object, types: tuple[type, ...] = (str,)) -> str:
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{name} must be a {expected}, got {type(value).__name__}")
    text = str(value)
    if "\r" in text or "\n" in text:
        raise ValueError(
            f"{name} must be a single line: a CR or LF in {text!r} would end the field "
            f"early and inject the rest as another field"
        )
    return text


#: The longest ``retry`` accepted, in milliseconds (2**31 - 1, about 24.8
#: days): the longest delay a JavaScript timer waits (a longer one fires at
#: once), which is what an EventSource polyfill's reconnection runs on; a
#: longer delay means "do not come back", which closing the stream says.
MAX_RETRY: Final = 2**31 - 1


def check_fields(
    event: object = None, id: object = None, retry: object = None
) -> tuple[str | None, str | None, int | None]:
    """Validate an event's ``event``, ``id`` and ``retry`` fields; return them as sent.

    The one place the rules live, shared by :func:`encode_event`,
    :meth:`EventStream.send` and :meth:`~wsgi_detach.Hub.publish`, which call
    it before anything is queued, numbered or stored.

    Raises:
        TypeError: ``event`` is not a str, ``id`` not a str or int, ``retry``
            not an int (a bool, a float or a str are refused: the parser
            ignores a ``retry`` that is not all digits).
        ValueError: ``event`` or ``id`` contains CR or LF, ``id`` a NUL or
            starts or ends with whitespace, or ``retry`` is negative or above
            :data:`MAX_RETRY`.
    """
    event_text = None if event is None else _single_line("event", event)
    id_text = None
    if id is not None:
        id_text = _single_line("id", id, (str, int))
        if "\0" in id_text:
            raise ValueError(
                f"id must not contain NUL: the client ignores such an id ({id_text!r})"
            )
        if id_text[:1].isspace() or id_text[-1:].isspace():
            # The client hands the id back in the Last-Event-ID header, and
            # servers strip the whitespace around a header value (RFC 9110
            # section 5.5): such an id would come back as another one.
            raise ValueError(
                f"id must not start or end with whitespace: it would not come back "
                f"as Last-Event-ID ({id_text!r})"
            )
    return event_text, id_text, None if retry is None else _retry_ms(retry)


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event exactly as an SSE parser will read it back.

    Args:
        data: the payload, any text. Line breaks (CR, LF or CRLF) become
            several ``data:`` lines and reach the client as ``\\n``.
        event: the event type (``addEventListener(type)``); ``None`` or
            ``""``: the default, ``"message"``.
        id: the id the client echoes as ``Last-Event-ID`` when it reconnects.
            ``""`` clears the client's last id; ``None`` leaves it.
        retry: the client's reconnection delay in milliseconds.

    Raises:
        TypeError: ``data`` is not a str (``json.dumps`` objects first), or a
            field has the wrong type.
        ValueError: ``event`` or ``id`` contains a line break, ``id`` a NUL
            or whitespace at either end, or ``retry`` is negative or above
            :data:`MAX_RETRY`.

    >>> encode_event("a\\nb", event="tick", id=7)
    b'id: 7\\nevent: tick\\ndata: a\\ndata: b\\n\\n'
    """
    if not isinstance(data, str):
        raise TypeError(
            f"data must be a str (serialise objects first, e.g. json.dumps), "
            f"got {type(data).__name__}"
        )
    event, id, retry = check_fields(event, id, retry)
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    lines.append("\n")
    return "\n".join(lines).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment: one ``:`` line per line of ``text``; clients ignore it.

    >>> encode_comment("keep-alive")
    b': keep-alive\\n'
    """
    if not isinstance(text, str):
        raise TypeError(f"a comment must be a str, got {type(text).__name__}")
    return "".join(f": {line}\n" if line else ":\n" for line in _LINE_BREAK.split(text)).encode(
        "utf-8"
    )


def _retry_ms(retry: object) -> int:
    if isinstance(retry, bool) or not isinstance(retry, int):
        raise TypeError(f"retry must be an int of milliseconds, got {type(retry).__name__}")
    if retry < 0:
        raise ValueError(f"retry must be >= 0 milliseconds, got {retry}")
    if retry > MAX_RETRY:
        # Never str() an arbitrary int: past 4300 digits that raises too.
        shown = str(retry) if retry.bit_length() <= 64 else f"an int of {retry.bit_length()} bits"
        raise ValueError(
            f"retry must be at most {MAX_RETRY} ms (about 24.8 days), got {shown}"
        )
    return retry


def read_last_event_id(environ: WSGIEnvironment) -> str | None:
    """The ``Last-Event-ID`` request header, or ``None`` when absent.

    A reconnecting ``EventSource`` sends the id of the last event it
    received. WSGI hands header values over as latin-1-decoded text (PEP 3333
    "Unicode Issues") while browsers send the id as UTF-8, so the value is
    decoded again; bytes that are not UTF-8 become U+FFFD.
    """
    raw = environ.get("HTTP_LAST_EVENT_ID")
    if raw is None:
        return None
    try:
        return str(raw).encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a server that already decoded it properly
        return str(raw)


def _sse_options(base: BodyOptions, heartbeat: float | None) -> BodyOptions:
    """``base`` (the middleware's options, or the defaults) as an event stream needs them.

    SSE fixes the encoding and the heartbeat's chunk, has its own heartbeat,
    and a ``timeout_chunk`` meant for plain streams would be raw text in an
    event stream. Cached on ``base`` itself (one object per middleware), so
    that a stream opened with no options of its own makes none, and the
    cache goes away with the options (a module-level cache would keep every
    middleware's budget alive).
    """
    cache = base._derived
    derived = cache.get(heartbeat)
    if derived is None:
        derived = base.merge(
            {
                "encoding": "utf-8",
                "heartbeat_chunk": HEARTBEAT,
                "timeout_chunk": None,
                "heartbeat": heartbeat,
            },
            "EventStream",
        )
        if len(cache) >= _SSE_CACHE_SIZE:
            cache.clear()  # heartbeats chosen per request: stay bounded
        cache[heartbeat] = derived
    return derived


#: How many heartbeat values one options value keeps derived SSE options for.
_SSE_CACHE_SIZE: Final = 16


class EventStream(DetachedBody):
    """A :class:`DetachedBody` that speaks ``text/event-stream``.

    Use it where a browser's ``EventSource`` connects::

        def app(environ, start_response):
            stream = EventStream(environ, start_response, retry=2000)
            stream.spawn(ticker, stream)
            return stream

        def ticker(stream):
            for i in itertools.count():
                stream.send(f"tick {i}", id=i)
                gevent.sleep(1)

    The stream goes out to the client *at once*: the constructor queues a
    comment, so the server sends the status line and headers with its first
    iteration. Without it a WSGI server holds the headers back until the first
    event (PEP 3333, "Buffering and Streaming": headers go with the first
    non-empty chunk), and a browser's ``EventSource`` stays in "connecting"
    and never fires ``open``. Register the stream with whatever publishes
    (e.g. :meth:`Hub.subscribe`) *before* returning it from the app, and no
    event published after ``open`` can be missed.

    With ``start_response`` the stream starts the response itself (200 with
    :data:`SSE_HEADERS`); without it, the app (or its framework) must send
    those headers. Every producer method is safe from any greenlet, loop
    callback or OS thread, like :class:`DetachedBody`'s.

    Args:
        environ: the request's environ, read for ``Last-Event-ID``
            (:attr:`last_event_id`); optional. Under
            :class:`DetachMiddleware` the stream is registered with the
            request as it is made, like a :func:`detach` body (counted by
            ``stats()`` and ``max_open``, watched, drained, and closed with
            the request even if the app returns a wrapper around it or
            raises afterwards), and takes the middleware's
            :class:`BodyOptions` (``idle_timeout``, ``deadline``,
            ``max_buffer``, its ``max_buffered`` budget, ...; not
            ``heartbeat``, which an EventStream sets itself, nor a
            plain-text ``timeout_chunk``); options you pass win.
        start_response: the server's ``start_response``; see above.
        retry: the client's reconnection delay in ms, sent at the start.
        heartbeat: seconds of silence after which a comment line goes out
            (keeps proxies from closing the stream, and makes the server
            notice a departed client at its next write). ``None``: off.
        last_event_id: overrides the header, e.g. from a query parameter on
            the first connect (``EventSource`` cannot set headers).
        options: the other :class:`DetachedBody` options (``idle_timeout``,
            ``deadline``, ``max_buffer``, ``coalesce``, ...), or
            ``options=BodyOptions(...)`` in place of the middleware's (or the
            default) options, keywords still winning over it; SSE derives
            from it as from the middleware's. Under the middleware the
            budget is always its ``max_buffered`` one.

    Raises:
        TypeError: ``encoding`` or ``heartbeat_chunk`` was given; SSE fixes
            both (UTF-8, a comment line). ``budget=`` (or a BodyOptions with
            a budget of its own) under :class:`DetachMiddleware`: its
            ``max_buffered`` budget is the one shared by its bodies.
        Unavailable: under :class:`DetachMiddleware`, ``max_open`` streams
            are open or the server is draining; let it propagate, the
            middleware answers 503. The stream is closed first.
    """

    #: The headers to send when your framework starts the response, e.g.
    #: ``flask.Response(stream, headers=list(EventStream.HEADERS))``.
    HEADERS: Final = SSE_HEADERS

    __slots__ = ("last_event_id",)  # see DetachedBody.__slots__

    def __init__(
        self,
        environ: WSGIEnvironment | None = None,
        start_response: StartResponse | None = None,
        *,
        retry: int | None = None,
        heartbeat: float | None = 15.0,
        last_event_id: str | None = None,
        **options: Any,
    ) -> None:
        for fixed in ("encoding", "heartbeat_chunk"):
            if fixed in options:
                raise TypeError(f"EventStream fixes {fixed}; do not pass it")
        # Under DetachMiddleware: its registrar, with its options and budget.
        registrar = None if environ is None else environ.get(REGISTER_KEY)
        base = DEFAULT_OPTIONS if registrar is None else registrar.options
        if registrar is not None and "budget" in options:
            raise TypeError(NO_BUDGET.format(who="EventStream"))
        if "options" in options:
            base = rebase(options.pop("options"), base, "EventStream")
        if heartbeat is None or type(heartbeat) in (int, float):
            merged = _sse_options(base, heartbeat).merge(options, "EventStream")
        else:  # a bad value, which merge names: not a cache key
            merged = _sse_options(base, None).merge({**options, "heartbeat": heartbeat})
        opening = encode_comment("stream open")
        if retry is not None:  # checked before the body exists, so a bad value leaks nothing
            opening += f"retry: {_retry_ms(retry)}\n\n".encode("ascii")
        super().__init__(start_response=start_response, options=merged)
        # Registered before any byte is charged to the budget; closed (and the
        # error passed on) when it is refused.
        register(self, registrar)
        if last_event_id is None and environ is not None:
            last_event_id = read_last_event_id(environ)
        self.last_event_id: str | None = last_event_id
        """What the client last saw (``Last-Event-ID``), or ``None`` on a first connect."""
        if start_response is not None:
            self.start("200 OK", list(SSE_HEADERS))
        # Forced past a shared budget, like a last chunk: a few bytes, and
        # refusing them would fail the request with BufferFull inside the
        # app's constructor call (max_open is what turns streams away).
        with self._lock:
            self._append_locked(opening)

    def send(
        self,
        data: str,
        *,
        event: str | None = None,
        id: str | int | None = None,
        retry: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send one event; see :func:`encode_event` for the fields.

        Fields are checked before anything is queued, so a bad ``event`` or
        ``id`` raises here, in the caller, and the stream stays usable. Blocks
        like :meth:`DetachedBody.put` when ``max_buffer`` is reached.

        Raises:
            TypeError, ValueError: a bad field (see :func:`encode_event`).
            BodyClosed: the stream ended (the client left, or you finished).
        """
        self.put(encode_event(data, event=event, id=id, retry=retry), timeout=timeout)

    def send_nowait(
        self,
        data: str,
        *,
        event: str | None = None,
        id: str | int | None = None,
        retry: int | None = None,
    ) -> None:
        """Like :meth:`send`, but raise :class:`BufferFull` instead of waiting for room."""
        self.put_nowait(encode_event(data, event=event, id=id, retry=retry))

    def comment(self, text: str = "") -> None:
        """Send a comment line (or several); the client's handlers never see it."""
        self.put(encode_comment(text))

    def __repr__(self) -> str:
        return "<EventStream" + super().__repr__()[len("<DetachedBody") :]
