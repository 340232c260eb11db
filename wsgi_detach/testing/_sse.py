"""An event-stream parser, written step by step from the WHATWG HTML standard.

Section "Server-sent events", subsections "Parsing an event stream" and
"Interpreting an event stream". It is deliberately literal rather than fast:
it is the oracle the encoder (:mod:`wsgi_detach._sse`) is tested against, so it
shares no code or shortcut with it. Feed it bytes in any chunking; it keeps the
state a browser keeps across chunks (the buffers, the last event id, the
reconnection time) and, across a reconnect, what a browser keeps across one
(:meth:`SSEParser.reconnected`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SSEEvent", "SSEParser", "parse_sse"]


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event, as a browser's ``onmessage`` would see it."""

    #: The ``event:`` field, or ``"message"``.
    type: str
    #: The ``data:`` lines joined with LF.
    data: str
    #: The last event id in force when the event was dispatched ("" if none).
    last_event_id: str


@dataclass
class SSEParser:
    """Incremental ``text/event-stream`` parser; :meth:`feed` it bytes.

    Attributes:
        events: every event dispatched so far, in order.
        comments: every comment line (the text after ``:``), heartbeats included.
        retry: the last valid ``retry:`` value (ms), or ``None``.
        last_event_id: the last event id (what a reconnect sends as ``Last-Event-ID``).
    """

    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str = ""
    _data: str = ""
    _type: str = ""
    _id_buffer: str = ""
    _pending: bytes = b""
    _text: str = ""
    _started: bool = False
    _after_cr: bool = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; returns the events it completed."""
        before = len(self.events)
        # "Streams must be decoded using the UTF-8 decode algorithm": decode
        # only complete characters, keep a split multi-byte sequence.
        self._pending += chunk
        text, self._pending = _decode_complete(self._pending)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):  # one leading BOM is skipped
                text = text[1:]
        self._text += text
        self._lines()
        return self.events[before:]

    def reconnected(self) -> None:
        """Start a new connection: what a browser drops and keeps when it reconnects.

        The half-received event and undecoded bytes are dropped (the spec
        discards an event that was not dispatched when the stream ended), and
        with it an ``id:`` it carried: the id buffer goes back to the last
        event id, which only a dispatched event sets. The last event id and
        the reconnection time are kept.
        """
        self._data = self._type = self._text = ""
        self._id_buffer = self.last_event_id
        self._pending = b""
        self._started = self._after_cr = False

    def _lines(self) -> None:
        # A line ends with CRLF, LF, or CR. A CR ends its line at once (a
        # CR-ended event is dispatched without waiting for more bytes); an LF
        # right after it, in this chunk or the next, is the rest of a CRLF.
        text = self._text
        start = i = 0
        if self._after_cr and text:
            self._after_cr = False
            if text[0] == "\n":
                start = i = 1
        while i < len(text):
            ch = text[i]
            if ch == "\n":
                self._line(text[start:i])
                start = i = i + 1
            elif ch == "\r":
                self._line(text[start:i])
                if i + 1 == len(text):
                    self._after_cr = True
                    i += 1
                else:
                    i += 2 if text[i + 1] == "\n" else 1
                start = i
            else:
                i += 1
        self._text = text[start:]

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
        elif line.startswith(":"):
            self.comments.append(line[1:])
        elif ":" in line:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            self._field(name, value)
        else:
            self._field(line, "")

    def _field(self, name: str, value: str) -> None:
        if name == "event":
            self._type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry":
            if value and all("0" <= c <= "9" for c in value):
                self.retry = int(value)
        # any other field is ignored

    def _dispatch(self) -> None:
        self.last_event_id = self._id_buffer
        if self._data == "":
            self._type = ""
            return
        data = self._data[:-1] if self._data.endswith("\n") else self._data
        self.events.append(SSEEvent(self._type or "message", data, self.last_event_id))
        self._data = ""
        self._type = ""


def _decode_complete(raw: bytes) -> tuple[str, bytes]:
    for cut in range(len(raw), max(len(raw) - 4, -1), -1):
        try:
            return raw[:cut].decode("utf-8"), raw[cut:]
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                return raw.decode("utf-8", "replace"), b""
    return raw.decode("utf-8", "replace"), b""


def parse_sse(data: bytes, chunks: list[int] | None = None) -> SSEParser:
    """Parse a whole stream, split at the given byte offsets (to test chunking)."""
    parser = SSEParser()
    last = 0
    for cut in sorted(chunks or []):
        parser.feed(data[last:cut])
        last = cut
    parser.feed(data[last:])
    return parser
