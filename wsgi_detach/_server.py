"""A gevent.pywsgi server tuned for detached responses: ``make_server`` and ``DetachHandler``.

Use it to serve any WSGI app under gevent.pywsgi with :class:`DetachMiddleware`
in front, which is what ``python -m wsgi_detach serve module:app`` does. It
differs from a plain ``gevent.pywsgi.WSGIServer`` in three ways:

* the handler puts the client socket in ``environ["wsgi_detach.socket"]``, so
  the middleware notices a client that leaves an idle stream within
  milliseconds (:mod:`wsgi_detach._watchers`); plain pywsgi exposes nothing;
* it sets ``TCP_NODELAY`` on every accepted connection: pywsgi writes a
  chunked response's final ``0\\r\\n\\r\\n`` separately, and without
  ``TCP_NODELAY`` that small write waits for the client's delayed ACK
  (~40 ms on Linux) -- each small response, each long-poll, pays it;
* ``stop()`` drains the middleware first (:meth:`DetachMiddleware.drain`), so
  open streams get a farewell or a grace period instead of being killed.

:class:`DetachHandler` also replaces pywsgi's write path (same bytes on the
wire, fewer system calls; see "The write path" in its docstring).

When not to use it: under gunicorn (``-k gevent`` already exposes
``gunicorn.socket``; wrap the app in ``DetachMiddleware`` and call ``drain``
from a ``worker_exit`` hook), or with another server; and not in a process
that is not monkey-patched if your app uses blocking libraries (the
``serve`` command patches for you).
"""

from __future__ import annotations

import email.parser
import errno
import functools
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from http import client as _http
from typing import TYPE_CHECKING, Any, Callable, Final

from gevent import get_hub, getcurrent, pywsgi
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.socket import socket as _GeventSocket

from ._body import Chunk
from ._middleware import DetachMiddleware, python_next
from ._watchers import SOCKET_KEY

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = ["DetachHandler", "DetachServer", "make_server"]

log = logging.getLogger("wsgi_detach")

#: After the drain, the least time the streams it has just cut get to abort
#: (each takes milliseconds) before every handler still running is ended.
_AFTER_CUT: Final = 0.2
#: How long pywsgi then waits for the handlers it ends before killing them.
_AFTER_DRAIN: Final = 1.0

#: The terminating chunk of a chunked response (RFC 9112 section 7.1).
_LAST_CHUNK: Final = b"0\r\n\r\n"
#: What ``next(iterator, _END)`` returns at the end of a body.
_END: Final = object()

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


class _Closing(ConnectionAbortedError):
    """Thrown into a handler waiting for a request head when the server closes the connection."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNABORTED, "the server is stopping")


class DetachHandler(WSGIHandler):  # type: ignore[misc]  # gevent ships no type hints
    """A ``WSGIHandler`` that exposes its socket, sets ``TCP_NODELAY``, answers HEAD with
    the head alone, and writes leaner.

    The write path: the bytes a client receives are exactly those plain
    pywsgi sends for the same app (tests/test_server.py compares them), in
    fewer system calls:

    * the status line and headers go out in the same ``send`` as the first
      chunk (pywsgi sends them separately);
    * a chunk and its chunked framing are one ``send`` of one buffer;
    * a chunk is handed to the kernel with one non-blocking ``send`` when it
      fits, instead of gevent's ``sendall``, which also asks the kernel for
      the buffer size (``getsockopt``) on every call; only what does not fit
      waits in ``sendall``;
    * when the body can say, without waiting, that the chunk it just yielded
      is its last (a :class:`DetachedBody` that is finished and drained, as a
      long-poll's is), the terminating ``0\\r\\n\\r\\n`` rides in the
      same ``send``. The iteration has then really ended before the
      terminator is sent: an error raised at that last step still aborts the
      connection without it.

    Nothing is held back: each chunk is sent before the next is asked for.
    """

    def handle(self) -> None:
        if getattr(self.server, "nodelay", True):
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (a Unix socket): nothing to tune
                pass
        # The kernel socket under gevent's, for the non-blocking first try of
        # each send; only for gevent's plain socket class (a TLS socket's
        # ``_sock`` would bypass the encryption). The socket, not its bound
        # ``send``: that would be one more object per connection.
        self._raw_socket = self.socket._sock if type(self.socket) is _GeventSocket else None
        self._greenlet = getcurrent()
        connections = getattr(self.server, "connections", None)
        if connections is not None:
            connections.add(self)
        try:
            super().handle()
        finally:
            self._raw_socket = None  # pywsgi drops its socket references here too
            self._greenlet = None
            if connections is not None:
                connections.discard(self)

    # ------------------------------------------------------------------ between requests

    #: True while the connection waits for (the rest of) a request head: the
    #: one time ``stop()`` may close it without cutting anything.
    _awaiting_head = False
    _greenlet: Any = None

    def close_if_idle(self) -> None:
        """End the connection if it is waiting for a request (the server is stopping)."""
        # From the hub, so that the stopping greenlet keeps running; and only
        # if still waiting when the hub gets there.
        get_hub().loop.run_callback(self._throw, _Closing(), True)

    def end_request(self) -> None:
        """End the connection whatever it is doing: the request outlived the server's grace.

        The request's greenlet gets a ``ConnectionResetError`` where it
        waits, as if the client had left: an app reading the body sees it
        there, and pywsgi closes the connection without an error page or a
        traceback, as it does for a departed client.
        """
        error = ConnectionResetError(
            errno.ECONNRESET, "the server is stopping and the request outlived its grace"
        )
        self._abandon_input()
        get_hub().loop.run_callback(self._throw, error, False)

    def _abandon_input(self) -> None:
        """Do not read the rest of this request's body: the connection closes after it.

        pywsgi reads an unread body to its end after the response (to find
        the next request); a client that stopped sending would hold it there.
        """
        self.close_connection = True
        reader = getattr(self, "wsgi_input", None)
        if reader is not None and hasattr(reader, "_chunked_input_error"):
            reader._chunked_input_error = True  # pywsgi's "do not discard": state unknown

    def _throw(self, error: BaseException, only_if_idle: bool) -> None:
        glet = self._greenlet
        if glet is not None and (self._awaiting_head or not only_if_idle):
            glet.throw(error)

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, _Closing):
            return None  # we ended the wait ourselves: no 400, no log line
        return super()._handle_client_error(ex)

    # ------------------------------------------------------------------ the request path

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
        if getattr(self.server, "stopping", False):
            return None  # the server is stopping: no further request on this connection
        self._awaiting_head = True
        try:
            return self._handle_one_request()
        finally:
            self._awaiting_head = False

    def _handle_one_request(self) -> Any:
        rfile = self.rfile
        if rfile.closed or _InvalidClientRequest is None:
            return super().handle_one_request()
        try:
            buffered = rfile.peek(1)  # what is buffered; one read (cooperative) if nothing is
        except OSError:
            return None  # as pywsgi: a reset connection is not worth a word
        end = buffered.find(_HEAD_END, 0, _LEAN_HEAD_MAX)
        if end <= 0 or not self._take_lean_head(buffered[:end].decode("latin-1")):
            return super().handle_one_request()
        rfile.read(end + 4)  # the head, now parsed: consume it
        self.response_length = 0
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection or rfile.closed:
            return None
        return True

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
        self._headers_message = None  # the previous request's, if anyone asked
        self._header_index = index
        self.content_length = content_length
        self.close_connection = _closes_after(words[2], index.get)
        return True

    #: The request's header lines when the lean path parsed them (``headers``
    #: is then made from them only if someone asks); else ``None``.
    _lean_pairs: list[tuple[str, str]] | None = None
    _headers_message: Any = None

    @property
    def headers(self) -> Any:
        """pywsgi's parsed request headers (an ``email`` message), made on first use."""
        message = self._headers_message
        if message is None:
            pairs = self._lean_pairs
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
        self._awaiting_head = False  # the head is in: from here on, the request runs
        index = self._header_index
        if index is None:
            environ: dict[str, Any] = super().get_environ()
            environ[SOCKET_KEY] = self.socket
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
        env[SOCKET_KEY] = self.socket
        # Done with it: the handler (and this dict) would otherwise be kept
        # for as long as the response lasts -- forever, for a held stream.
        self._header_index = None
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
        """
        if (
            exc_info is not None
            or type(headers) is not list  # an iterator would be half used up by the fallback
            or type(status) is not str
            or "\r" in status
            or "\n" in status
        ):
            return super().start_response(status, headers, exc_info)  # type: ignore[no-any-return]
        encoded: list[tuple[bytes, bytes]] = []
        connection = date = length = None
        try:
            for name, value in headers:
                if (
                    type(name) is not str
                    or type(value) is not str
                    or "\r" in name
                    or "\n" in name
                    or "\r" in value
                    or "\n" in value
                ):
                    return super().start_response(status, headers)  # type: ignore[no-any-return]
                encoded.append((name.encode("latin-1"), value.encode("latin-1")))
                lower = name.lower()
                if lower == "connection":
                    connection = value
                elif lower == "date":
                    date = value
                elif lower == "content-length":
                    length = value
        except UnicodeEncodeError:
            return super().start_response(status, headers)  # type: ignore[no-any-return]
        code = int(status.split(" ", 1)[0])
        if code in (204, 304):
            return super().start_response(status, headers)  # type: ignore[no-any-return]
        self.status = status.encode("latin-1")
        self._orig_status = status
        self.response_headers = encoded
        self.code = code
        self.provided_date = date
        self.provided_content_length = length
        if self.request_version == "HTTP/1.0" and connection is None:
            encoded.append((b"Connection", b"close" if self.close_connection else b"keep-alive"))
        elif connection == "close":
            self.close_connection = True
        return self.write

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

    # ------------------------------------------------------------------ the write path

    # pywsgi's per-response attributes this class reads and writes.
    status: Any
    code: Any
    headers_sent: bool
    response_headers: list[tuple[bytes, bytes]]
    response_use_chunked: bool
    response_length: int
    provided_date: Any
    provided_content_length: Any
    connection_upgraded: bool
    close_connection: bool
    request_version: str
    result: Any
    _orig_status: str
    _raw_socket: Any = None

    def write(self, data: bytes) -> None:
        """PEP 3333's ``write()`` callable, and how each chunk of the body is sent."""
        # pywsgi sends nothing for any empty value, and its own 400 answer
        # passes a str body (''): never concatenate that with the head.
        self._send(data or b"", False)

    def process_result(self) -> None:
        if self.command == "HEAD":
            self._send_head_only()
            return
        # pywsgi's loop, with the terminator merged into the last chunk where
        # the body can tell, without waiting, that it has no more.
        result = self.result
        tells_end = callable(getattr(result, "_exhausted", None))
        iterator: Iterator[bytes] = iter(result)
        in_place = python_next(iterator)
        ended = False
        data: Any = _next_or_end(iterator, in_place)
        while data is not _END:
            if not data:
                data = _next_or_end(iterator, in_place)
                continue
            if not tells_end or not result._exhausted():
                self._send(data, False)
                data = _next_or_end(iterator, in_place)
                continue
            try:
                following = _next_or_end(iterator, in_place)  # does not wait: the body said so
            except BaseException:
                self._send(data, False)  # yielded before the error: pywsgi sends it
                raise
            ended = following is _END
            self._send(data, ended)
            data = following
        if not ended:
            if self.status and not self.headers_sent:
                # An empty body: the headers (and the terminator) still go out.
                self._send(b"", True)
            elif self.response_use_chunked:
                self._sendall(_LAST_CHUNK)

    def _send_head_only(self) -> None:
        # HEAD gets GET's head and no body (RFC 9110 9.3.2). pywsgi sends the
        # body anyway -- for an endless detached stream, forever. GET's head
        # goes out with the first non-empty chunk, or at the end of an empty
        # body: iterate as far, so that an error before it becomes GET's 500
        # (pywsgi's error path, through write(), which sends no body for
        # HEAD), then send the head alone and stop: run_application closes
        # the result, which ends the stream and frees its producer and
        # max_open slot.
        for data in self.result:
            if data or self.headers_sent:  # a write() call already sent the head
                break
        if self.status and not self.headers_sent:
            self._send(b"", False)

    def _send(self, data: bytes, last: bool) -> None:
        """Send ``data`` (the headers first if due; the terminator too if ``last``) in one go."""
        if data and self.code in (304, 204):
            raise self.ApplicationError(f"The {self.code} response must have no body")
        if self.command == "HEAD":
            # The head alone, never a body: not what a write() call passes,
            # not pywsgi's error page.
            if self.headers_sent:
                return
            data, last = b"", False
        if self.headers_sent:
            if not data and not last:
                return  # PEP 3333 allows empty writes; they send nothing
            head = b""
        else:
            if not self.status:
                raise self.ApplicationError("The application did not call start_response()")
            self.headers_sent = True
            self.finalize_headers()
            head = b"HTTP/1.1 %s\r\n%s\r\n" % (
                self.status,
                b"".join([b"%s: %s\r\n" % item for item in self.response_headers]),
            )
        if self.response_use_chunked:
            if data:
                out = b"%s%x\r\n%s\r\n%s" % (head, len(data), data, _LAST_CHUNK if last else b"")
            else:
                out = head + _LAST_CHUNK if last else head
        else:
            out = head + data if head else data
        if out:
            self._sendall(out)

    def _sendall(self, data: bytes) -> None:
        # pywsgi's _sendall (same error bookkeeping), trying one plain
        # non-blocking send first.
        raw = self._raw_socket
        try:
            sent = 0
            if raw is not None:
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    pass
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:] if sent else data)
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)


def _closes_after(version: str, get: Callable[[str, str], str]) -> bool:
    """Whether the connection ends after this request, as pywsgi decides it.

    ``get`` looks up a request header by lower-case name, with a default.
    HTTP/1.1 keeps the connection unless the client says ``close``; HTTP/1.0
    closes it unless the client says ``keep-alive``.
    """
    if version == "HTTP/1.1":
        return get("connection", "").lower() == "close"
    return get("connection", "close").lower() != "keep-alive"


def _next_or_end(iterator: Iterator[bytes], in_place: bool) -> Any:
    """``next(iterator, _END)``; with ``in_place``, without nesting the interpreter loop.

    See :func:`~wsgi_detach._middleware.python_next` for why: a greenlet
    waiting in a body would keep the nested loop's C stack.
    """
    if not in_place:
        return next(iterator, _END)
    try:
        return iterator.__next__()
    except StopIteration:
        return _END


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


class DetachServer(WSGIServer):  # type: ignore[misc]
    """A pywsgi ``WSGIServer`` whose ``stop()`` drains the middleware first.

    Made by :func:`make_server`; ``middleware`` is the
    :class:`DetachMiddleware` in front of the app.
    """

    handler_class = DetachHandler

    def __init__(
        self,
        listener: Any,
        middleware: DetachMiddleware,
        *,
        nodelay: bool = True,
        farewell: Chunk | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("spawn", Pool())  # a pool, so that stop() can end the handlers
        super().__init__(listener, middleware, **kwargs)
        self.middleware = middleware
        self.nodelay = nodelay
        self.farewell = farewell
        #: Set once the first stop() has finished: a later call waits for it.
        self._stopped: Event | None = None
        #: The handlers of the open connections (see DetachHandler.handle).
        self.connections: set[DetachHandler] = set()

    @property
    def stopping(self) -> bool:
        """True from the first :meth:`stop` call on: connections end after their response."""
        return self._stopped is not None

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let responses end within ``timeout`` seconds, then stop.

        ``timeout`` (the grace) defaults to ``stop_timeout``. In order: the
        listener closes; connections waiting for their next request are
        closed at once; detached responses are drained
        (:meth:`DetachMiddleware.drain`: the farewell, then the grace);
        ordinary responses still running get what is left of the grace; any
        handler still running then is killed (after at least
        ``_AFTER_DRAIN`` seconds, time for the streams the drain cut to
        abort). Every connection closes after its current response.

        Call it from a greenlet (a ``gevent.signal_handler`` callback is
        one). ``serve_forever`` calls it again once it returns, and a second
        signal may too: every later call waits for the first to finish
        instead of cutting its grace short.
        """
        stopped = self._stopped
        if stopped is not None:
            stopped.wait()
            return
        stopped = self._stopped = Event()
        try:
            grace = self.stop_timeout if timeout is None else timeout
            until = time.monotonic() + grace
            self.close()
            for handler in list(self.connections):
                handler.close_if_idle()
            cut = self.middleware.drain(grace, self.farewell)
            if cut:
                log.warning("stopping: %d detached responses outlived the %ss grace", cut, grace)
            self.pool.join(timeout=max(until - time.monotonic(), _AFTER_CUT))
            if self.connections:
                log.warning(
                    "stopping: %d requests outlived the %ss grace; closing their connections",
                    len(self.connections), grace,
                )
                for handler in list(self.connections):
                    handler.end_request()
            super().stop(timeout=_AFTER_DRAIN)
        finally:
            stopped.set()


def make_server(
    app: WSGIApplication,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    nodelay: bool = True,
    grace: float = 10.0,
    farewell: Chunk | None = None,
    log: Any = "default",
    **middleware_options: Any,
) -> DetachServer:
    """A gevent.pywsgi server for ``app`` behind :class:`DetachMiddleware`; not yet started.

    Args:
        app: a WSGI app; wrapped in ``DetachMiddleware(app, **middleware_options)``
            unless it already is one.
        host, port: where to listen; port 0 picks a free port
            (``server.server_port`` after ``server.start()``).
        nodelay: set ``TCP_NODELAY`` on accepted connections (see the
            module docstring; ``False`` only to measure the difference).
        grace: seconds ``stop()`` lets detached responses end.
        farewell: the last chunk ``stop()`` sends every open detached body.
        log: pywsgi's access log (``"default"``: stderr; ``None``: off).

    Example::

        server = make_server(app, "0.0.0.0", 8000, idle_timeout=60)
        server.serve_forever()
    """
    if isinstance(app, DetachMiddleware):
        if middleware_options:
            raise TypeError(
                f"app is already a DetachMiddleware; configure it there, not with "
                f"{sorted(middleware_options)}"
            )
        middleware = app
    else:
        middleware = DetachMiddleware(app, **middleware_options)
    server = DetachServer((host, port), middleware, nodelay=nodelay, farewell=farewell, log=log)
    server.stop_timeout = grace
    return server
