"""gevent.pywsgi's request path, re-implemented for speed: :class:`SpeedUps`.

``DetachHandler`` (:mod:`wsgi_detach._server`) mixes this class in front of
pywsgi's ``WSGIHandler``. Each method here does what pywsgi's method of the
same name does -- same attributes, same environ, same errors, same bytes --
in less Python per request: a request head already buffered whole is parsed
in one pass over its bytes; plain header lines skip the ``email`` package;
``start_response`` walks the headers once; ``Date`` is formatted once a
second; the access log is not formatted when it goes nowhere. Anything
unusual goes to pywsgi's own method.

The switch: ``make_server(app, speedups=False)`` (or
``handler_class(speedups=False)``) serves with ``DetachHandler`` without this
class, so pywsgi's own methods run. tests/test_conformance.py serves every
case both ways; when the wire differs between them, the fault is here.
"""

from __future__ import annotations

import email.parser
import functools
import re
import time
import urllib.parse
from http import client as _http
from typing import Any, Callable, Final

from gevent import get_hub, pywsgi
from gevent.pywsgi import WSGIHandler
from gevent.socket import socket as _GeventSocket

from ._watchers import ConnectionReader

__all__ = ["SpeedUps"]

#: A request header line the email parser would take as ``name: value`` and
#: nothing else: a name of the characters it accepts, no continuation, no
#: stray line break. Anything else goes to the email parser itself.
_SIMPLE_HEADER: Final = re.compile(r"([\x21-\x39\x3b-\x7e]+):[ \t]*([^\r\n]*)\r?\n")
#: The same line as the lean path sees it: split from the head at its CRLFs.
_SIMPLE_LINE: Final = re.compile(_SIMPLE_HEADER.pattern.removesuffix(r"\r?\n"))
#: What pywsgi's own ``MessageClass`` builds (``None``: a gevent without it).
_OldMessage: Any = getattr(pywsgi, "OldMessage", None)
#: The access log pywsgi installs for ``log=None``.
_NoopLog: Any = getattr(pywsgi, "_NoopLog", None)
#: pywsgi's "bad request" error (answered with its 400); ``None``: leave parsing to pywsgi.
_InvalidClientRequest: Any = getattr(pywsgi, "_InvalidClientRequest", None)
#: pywsgi's ``Date`` header value for a timestamp (``None``: leave it to pywsgi).
_format_date: Any = getattr(pywsgi, "format_date_time", None)
#: How pywsgi decodes PATH_INFO.
_unquote_latin1: Final = functools.partial(urllib.parse.unquote, encoding="latin-1")
#: The request versions the lean request path takes; anything else goes to pywsgi.
_PLAIN_VERSIONS: Final = frozenset({"HTTP/1.1", "HTTP/1.0"})
#: Header names pywsgi leaves out of the ``HTTP_*`` keys (they have their own).
_OWN_KEYS: Final = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})
#: The end of a request head.
_HEAD_END: Final = b"\r\n\r\n"
#: The lean path looks for a whole head in the first this-many buffered bytes;
#: longer heads go to pywsgi. Below pywsgi's request-line limit (8 192) and
#: http.client's header-line limit, so neither limit can be reached here.
_LEAN_HEAD_MAX: Final = 8192
#: As many header lines as this, or more, go to pywsgi: http.client refuses
#: more than 100 lines counting the blank one that ends the head.
_LEAN_MAX_HEADERS: Final = 100
#: Request headers that need pywsgi's own handling: a body in chunks, a
#: 100-continue, a protocol switch.
_NOT_LEAN: Final = frozenset({"transfer-encoding", "expect", "upgrade"})


class SpeedUps(WSGIHandler):  # type: ignore[misc]  # gevent ships no type hints
    """pywsgi's request-path methods, faster; see the module docstring."""

    def handle_one_request(self) -> Any:
        """pywsgi's ``handle_one_request``, with a lean path for the everyday request.

        When the whole head of the next request is already buffered, is at
        most 8 KiB, has a plain HTTP/1.1 or 1.0 request line and only plain
        ``name: value`` header lines, and asks for nothing pywsgi must handle
        itself (``Transfer-Encoding``, ``Expect``, ``Upgrade``, an invalid
        ``Content-Length``), it is parsed here in one pass over the bytes
        instead of a ``readline`` per line; the request then goes through
        pywsgi's own ``handle_one_response`` (error handling, 500s, closing
        the result) as any other. Anything else -- and so every request pywsgi
        would answer with a 400 or 414 -- goes to pywsgi unchanged, with
        nothing consumed. What the app sees is the same either way
        (tests/test_server.py compares the environs).
        """
        rfile = self.rfile
        if rfile.closed or _InvalidClientRequest is None:
            return super().handle_one_request()
        drained = self._drained
        if drained:
            # The last request's head was all that was buffered and it had
            # no body: the next one can only come from the socket. Wait for
            # it there, rather than with a read that fails first (the usual
            # keep-alive client, a long-poller above all, asks again only
            # once it has its answer): a system call and an exception less.
            self._drained = False
        try:
            if drained:
                # Inside the try: the server ends an idle connection by
                # throwing an OSError into this wait (head_timeout, stop(),
                # making room), which is the ordinary end of a keep-alive
                # connection and so ends it quietly, as the read below would.
                self._wait_readable(self.socket)
            buffered = rfile.peek(1)  # what is buffered; one read (cooperative) if nothing is
        except OSError:
            return None  # as pywsgi: a reset connection is not worth a word
        end = buffered.find(_HEAD_END, 0, _LEAN_HEAD_MAX)
        if end <= 0 or not self._take_lean_head(buffered[:end].decode("latin-1")):
            return super().handle_one_request()
        rfile.read(end + 4)  # the head, now parsed: consume it
        # Only over gevent's plain socket: a TLS socket may hold decrypted
        # bytes the kernel no longer has, and wait for ever on them.
        self._drained = (
            len(buffered) == end + 4
            and not self.content_length
            and type(self.socket) is _GeventSocket
        )
        self.response_length = 0
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection or rfile.closed:
            return None
        return True

    #: Nothing is buffered after the last request (see handle_one_request).
    _drained = False
    #: The connection's own read watcher, once made (:class:`ConnectionReader`).
    _reader: ConnectionReader | None = None
    #: The reader's ``watch``, for the environ (``OWN_WATCH_KEY``); the reader's,
    #: not ours, so that the environ holds no reference back to the handler.
    _watch_here: Any = None

    def handle(self) -> None:
        self._connection_reader(self.socket)  # now: its watch goes in every environ
        try:
            super().handle()
        finally:
            # pywsgi has closed the socket by now; nothing yielded since, so
            # no new connection can have its descriptor yet.
            self._watch_here = None
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()

    def _connection_reader(self, sock: Any) -> ConnectionReader | None:
        """The connection's read watcher, made at first use; None where there can be none."""
        reader = self._reader
        fd = sock.fileno()
        if reader is not None and reader.fd != fd:
            # The app detached the socket (fd -1), or it is another one now.
            self._reader = self._watch_here = None
            reader.close()
            reader = None
        if reader is None and fd >= 0:
            loop = get_hub().loop
            if hasattr(loop, "io"):
                reader = self._reader = ConnectionReader(loop, sock, fd)
                self._watch_here = reader.watch
        return reader

    def _wait_readable(self, sock: Any) -> None:
        """Wait until ``sock`` (gevent's plain socket) has something to read, or the client
        left; where this gevent has no such wait, do nothing (the read waits instead).

        The connection's own read watcher waits (see :class:`ConnectionReader`
        for what that saves); with a socket timeout, or no watcher to be had,
        gevent's own wait does, which knows the timeout and what to raise for
        a socket that is no longer there.
        """
        reader = self._connection_reader(sock)
        if reader is None or sock.timeout is not None:
            wait = getattr(sock, "_wait", None)
            event = getattr(sock, "_read_event", None)
            if wait is not None and event is not None:
                wait(event)
            return
        reader.wait()

    def _take_lean_head(self, head: str) -> bool:
        """Parse ``head`` as pywsgi's ``read_request`` would; False (nothing set): not lean."""
        lines = head.split("\r\n")
        requestline = lines[0].rstrip()
        words = requestline.split()
        if (
            len(words) != 3
            or words[2] not in _PLAIN_VERSIONS
            # A bare LF anywhere: pywsgi's readline would end a line there.
            or head.count("\n") != len(lines) - 1
            or len(lines) > _LEAN_MAX_HEADERS
        ):
            return False
        pairs: list[tuple[str, str]] = []
        index: dict[str, str] = {}
        match = _SIMPLE_LINE.fullmatch
        for line in lines[1:]:
            found = match(line)
            if found is None:
                return False
            name, value = found.groups()
            pairs.append((name, value))
            lower = name.lower()
            if lower in _NOT_LEAN:
                return False
            index.setdefault(lower, value)  # email's get(): the first one
        content_length: Any = index.get("content-length")
        if content_length is not None:
            try:
                content_length = int(content_length)
            except ValueError:
                return False
            if content_length < 0 or (content_length and words[0] == "HEAD"):
                return False
        if "connection" in index and index["connection"].lower() == "upgrade":
            return False
        self.requestline = requestline
        self.command, self.path, self.request_version = words
        self._lean_pairs = pairs
        self._lean_head = head
        self._headers_message = None  # the previous request's, if anyone asked
        self._header_index = index
        self.content_length = content_length
        self.close_connection = _closes_after(words[2], index.get)
        return True

    #: The request's header lines when the lean path parsed them, until the
    #: environ is built from them; else ``None``.
    _lean_pairs: list[tuple[str, str]] | None = None
    #: The head the lean path parsed: ``headers`` is made from it only if
    #: someone asks. A string, which the garbage collector does not track,
    #: rather than the pairs (a list and a tuple per header line): a waiting
    #: response would hold them, and each brings the next young collection
    #: closer (see bench/poll_objects.py).
    _lean_head: str | None = None
    _headers_message: Any = None

    @property
    def headers(self) -> Any:
        """pywsgi's parsed request headers (an ``email`` message), made on first use."""
        message = self._headers_message
        if message is None:
            pairs = self._lean_pairs
            if pairs is None and self._lean_head is not None:
                match = _SIMPLE_LINE.fullmatch
                lines = self._lean_head.split("\r\n")[1:]
                pairs = [(found[1], found[2]) for found in map(match, lines) if found is not None]
            if pairs is None or _OldMessage is None:
                return WSGIHandler.headers  # pywsgi's empty default
            message = self._headers_message = _OldMessage()
            message._headers = list(pairs)
            message._payload = ""
        return message

    @headers.setter
    def headers(self, message: Any) -> None:
        self._headers_message = message
        self._lean_pairs = None
        self._lean_head = None

    def MessageClass(self, rfile: Any, *args: Any) -> Any:
        """The request headers, as pywsgi's own parser returns them, in a fraction of its time.

        pywsgi hands every header block to the ``email`` package (~30 us a
        request here). The lines are read exactly as ``http.client`` reads
        them (same limits, same errors); when each is a plain ``name: value``
        line, the message is filled in directly with what the email parser
        would have stored; anything unusual (continuation lines, odd names)
        still goes through the email parser.
        """
        if _OldMessage is None or _read_headers is None:
            return super().MessageClass(rfile, *args)
        try:
            lines = _read_headers(rfile)
        except _http.LineTooLong:
            message = _OldMessage()
            message.status = "Line too long"
            return message
        pairs: list[tuple[str, str]] = []
        index: dict[str, str] = {}
        match = _SIMPLE_HEADER.fullmatch
        for line in lines[:-1]:
            found = match(line.decode("latin-1"))
            if found is None:
                return _email_parser(lines)
            pairs.append((found[1], found[2]))
            index.setdefault(found[1].lower(), found[2])  # email's get(): the first one
        message = _OldMessage()
        message._headers = pairs
        message._payload = ""
        self._header_index = index
        return message

    #: The parsed request's headers by lower-case name (the first of each, as
    #: ``Message.get`` answers), when :meth:`MessageClass` took its fast path
    #: and nothing changed them since; else ``None``.
    _header_index: dict[str, str] | None = None

    def read_request(self, raw_requestline: str) -> bool:
        """pywsgi's request parsing, with header look-ups in a dict instead of the email API.

        Same attributes, same errors (and so the same 400 answers); HTTP/0.9
        and unusual request lines go to pywsgi itself.
        """
        self._header_index = None
        words = raw_requestline.split()
        if _InvalidClientRequest is None or len(words) != 3 or words[2] not in _PLAIN_VERSIONS:
            return bool(super().read_request(raw_requestline))
        self.requestline = raw_requestline.rstrip()
        self.command, self.path, self.request_version = words
        headers = self.headers = self.MessageClass(self.rfile, 0)
        if headers.status:
            raise _InvalidClientRequest(f"Invalid headers status: {headers.status!r}")
        index = self._header_index
        get: Callable[[str, Any], Any] = headers.get if index is None else index.get
        if get("transfer-encoding", "").lower() == "chunked":
            try:
                del headers["content-length"]
            except KeyError:
                pass
            self._header_index, get = None, headers.get  # the message changed
        content_length = get("content-length", None)
        if content_length is not None:
            content_length = int(content_length)
            if content_length < 0:
                raise _InvalidClientRequest(f"Invalid Content-Length: {content_length!r}")
            if content_length and self.command == "HEAD":
                raise _InvalidClientRequest("Unexpected Content-Length")
        self.content_length = content_length
        self.close_connection = _closes_after(self.request_version, get)
        return True

    def log_request(self) -> None:
        # pywsgi formats the access log line (a datetime, string formatting)
        # even when it writes it nowhere.
        if _NoopLog is None or not isinstance(self.server.log, _NoopLog):
            super().log_request()

    def get_environ(self) -> dict[str, Any]:
        """pywsgi's environ (the same keys and values), built from the parsed headers directly."""
        index = self._header_index
        if index is None:
            environ: dict[str, Any] = super().get_environ()
            return environ
        env: dict[str, Any] = self.server.get_environ()
        env["REQUEST_METHOD"] = self.command
        env["SCRIPT_NAME"] = ""
        path, _, query = self.path.partition("?")
        env["PATH_INFO"] = _unquote_latin1(path)
        env["QUERY_STRING"] = query
        content_type = index.get("content-type")
        if content_type is not None:
            env["CONTENT_TYPE"] = content_type
        length = index.get("content-length")
        if length:
            env["CONTENT_LENGTH"] = length
        env["SERVER_PROTOCOL"] = self.request_version
        client_address = self.client_address
        if isinstance(client_address, tuple):
            env["REMOTE_ADDR"] = str(client_address[0])
            env["REMOTE_PORT"] = str(client_address[1])
        pairs = self._lean_pairs
        for name, value in self.headers._headers if pairs is None else pairs:
            if "_" in name:
                continue  # pywsgi drops names with underscores (they could spoof others)
            key = name.replace("-", "_").upper()
            if key in _OWN_KEYS:
                continue
            key = "HTTP_" + key
            value = value.strip()
            if key in env:
                env[key] += ("; " if "COOKIE" in key else ",") + value
            else:
                env[key] = value
        sock = self.socket if env.get("HTTP_EXPECT") == "100-continue" else None
        chunked = env.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        handling_reads = not (
            index.get("connection", "").lower() == "upgrade"
            or index.get("upgrade", "").lower() == "websocket"
        )
        self.wsgi_input = pywsgi.Input(
            self.rfile, self.content_length, socket=sock, chunked_input=chunked
        )
        env["wsgi.input"] = self.wsgi_input if handling_reads else self.rfile
        env["wsgi.input_terminated"] = handling_reads
        # Done with them: the handler would otherwise keep them for as long
        # as the response lasts -- forever, for a held stream.
        self._header_index = None
        self._lean_pairs = None  # ``headers`` parses _lean_head again if asked
        return env

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        """pywsgi's ``start_response``, in one pass over the headers when all is well.

        pywsgi walks the headers twice (checking and encoding, then looking
        for ``Connection``, ``Date`` and ``Content-Length``). Here one pass
        does both for plain ``str`` headers that need no error; anything pywsgi
        would refuse or treat specially (``exc_info``, a 204/304, a
        non-``str``, a CR or LF, a character beyond latin-1) goes to pywsgi's
        own method, which raises exactly its own errors.

        An app sends the same status and headers over and over (every
        long-poll answer, every stream of an endpoint), and behind
        ``DetachMiddleware`` each response calls this twice (the check when
        the app calls, then the head with its streaming headers): what that
        pass found is kept per distinct status and headers (see
        ``_HeadCache``), so a repeat costs a look-up and a list copy.
        """
        if (
            exc_info is not None
            or type(headers) is not list  # an iterator would be half used up by the fallback
            or type(status) is not str
        ):
            return super().start_response(status, headers, exc_info)  # type: ignore[no-any-return]
        try:
            key: Any = (status, *headers)
            checked = _heads.get(key)
        except TypeError:  # an unhashable header item: pywsgi's method says what is wrong
            return super().start_response(status, headers)  # type: ignore[no-any-return]
        if checked is not None:
            # Equal is not enough: only plain tuples of plain str were kept,
            # and an equal str subclass might encode otherwise.
            for item in headers:
                if type(item) is not tuple or type(item[0]) is not str or type(item[1]) is not str:
                    return super().start_response(status, headers)  # type: ignore[no-any-return]
        else:
            checked = _check_head(status, headers)
            if checked is None:
                return super().start_response(status, headers)  # type: ignore[no-any-return]
            _heads.put(key, checked)
        self.status, kept, self.code, connection, self.provided_date, length = checked
        encoded = list(kept)  # finalize_headers appends to it
        self._orig_status = status
        self.response_headers = encoded
        self.provided_content_length = length
        if self.request_version == "HTTP/1.0" and connection is None:
            encoded.append((b"Connection", b"close" if self.close_connection else b"keep-alive"))
        elif connection == "close":
            self.close_connection = True
        return self.write  # type: ignore[no-any-return]

    def finalize_headers(self) -> None:
        """pywsgi's ``finalize_headers``, with the ``Date`` value formatted once a second.

        The same headers in the same order: ``Date`` unless the app gave one,
        then ``Content-Length`` for a body with ``len()`` or ``Transfer-Encoding:
        chunked`` on HTTP/1.1 (PEP 3333 "Handling the Content-Length Header").
        """
        if _format_date is None:
            super().finalize_headers()
            return
        headers = self.response_headers
        if self.provided_date is None:
            headers.append((b"Date", _date_now()))
        code = self.code
        self.connection_upgraded = code == 101
        if code in (204, 304) or self.provided_content_length is not None:
            return
        result = self.result
        if hasattr(result, "__len__"):
            total = sum(len(chunk) for chunk in result)
            headers.append((b"Content-Length", str(total).encode("latin-1")))
        elif code != 101 and self.request_version != "HTTP/1.0":
            self.response_use_chunked = True
            headers.append((b"Transfer-Encoding", b"chunked"))


#: What :func:`_check_head` found for a status and its headers: the encoded
#: status, the encoded headers, the status code, and the values of
#: ``Connection``, ``Date`` and ``Content-Length`` (or None).
_Checked = tuple[
    bytes, tuple[tuple[bytes, bytes], ...], int, "str | None", "str | None", "str | None"
]


def _check_head(status: str, headers: list[tuple[str, str]]) -> _Checked | None:
    """One pass over a head for :meth:`SpeedUps.start_response`; None: leave it to pywsgi.

    None for anything pywsgi refuses or treats specially: a CR or LF, a
    non-``str`` name or value (exactly ``str``: a subclass might encode
    otherwise), a character beyond latin-1, a 204 or 304.
    """
    if "\r" in status or "\n" in status:
        return None
    encoded: list[tuple[bytes, bytes]] = []
    connection = date = length = None
    try:
        for item in headers:
            if type(item) is not tuple:
                return None  # it might hash by identity and change: never kept
            name, value = item
            if (
                type(name) is not str
                or type(value) is not str
                or "\r" in name
                or "\n" in name
                or "\r" in value
                or "\n" in value
            ):
                return None
            encoded.append((name.encode("latin-1"), value.encode("latin-1")))
            lower = name.lower()
            if lower == "connection":
                connection = value
            elif lower == "date":
                date = value
            elif lower == "content-length":
                length = value
        code = int(status.split(" ", 1)[0])
    except (UnicodeEncodeError, ValueError):
        return None
    if code in (204, 304):
        return None
    return status.encode("latin-1"), tuple(encoded), code, connection, date, length


class _HeadCache:
    """The heads :func:`_check_head` accepted, by status and headers: at most ``size``.

    Only accepted heads are kept, keyed by exactly the status and header
    items the app passed (equal ``str`` values; ``1`` and ``True`` would hash
    alike, but a non-``str`` is never accepted, so never kept). An app that
    makes a new head per response (a ``Set-Cookie``, an ``ETag``) fills it:
    then it starts again, empty, so a long-lived server holds at most
    ``size`` heads and the repeated ones come back within a pass.
    """

    __slots__ = ("_heads", "_size")

    def __init__(self, size: int) -> None:
        self._heads: dict[Any, _Checked] = {}
        self._size = size

    def get(self, key: Any) -> _Checked | None:
        return self._heads.get(key)

    def put(self, key: Any, checked: _Checked) -> None:
        if len(self._heads) >= self._size:
            self._heads.clear()
        self._heads[key] = checked


_heads = _HeadCache(256)


def _closes_after(version: str, get: Callable[[str, str], str]) -> bool:
    """Whether the connection ends after this request, as pywsgi decides it.

    ``get`` looks up a request header by lower-case name, with a default.
    HTTP/1.1 keeps the connection unless the client says ``close``; HTTP/1.0
    closes it unless the client says ``keep-alive``.
    """
    if version == "HTTP/1.1":
        return get("connection", "").lower() == "close"
    return get("connection", "close").lower() != "keep-alive"


_date_cache: list[Any] = [None, b""]


def _date_now() -> bytes:
    """pywsgi's ``Date`` value for now, formatted once per second."""
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache[0], _date_cache[1] = second, _format_date(second)
    return _date_cache[1]  # type: ignore[no-any-return]


_read_headers: Callable[[Any], list[bytes]] | None = getattr(_http, "_read_headers", None)


def _email_parser(lines: list[bytes]) -> Any:
    """What ``http.client.parse_headers`` does with the lines it read."""
    text = b"".join(lines).decode("iso-8859-1")
    return email.parser.Parser(_class=_OldMessage).parsestr(text)
