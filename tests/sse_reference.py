"""A reference event-stream parser, written step by step from the WHATWG HTML standard.

Section "Server-sent events", subsections "Parsing an event stream" and
"Interpreting an event stream". It is deliberately literal and slow: it is
the oracle the encoder is tested against, so it must not share any code or
shortcut with it. Feed it bytes in any chunking; it keeps the state a browser
keeps across chunks (the buffers, the last event id, the reconnection time).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    type: str
    data: str
    last_event_id: str


@dataclass
class Parser:
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str = ""
    _data: str = ""
    _type: str = ""
    _id_buffer: str = ""
    _pending: bytes = b""
    _text: str = ""
    _started: bool = False

    def feed(self, chunk: bytes) -> None:
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

    def _lines(self) -> None:
        # A line ends with CRLF, LF, or CR. A CR at the very end may be the
        # first half of a CRLF: wait for the next chunk to know.
        text = self._text
        start = 0
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\n":
                self._line(text[start:i])
                start = i = i + 1
            elif ch == "\r":
                if i + 1 == len(text):
                    break
                self._line(text[start:i])
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
        self.events.append(Event(self._type or "message", data, self.last_event_id))
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


def parse(data: bytes, chunks: list[int] | None = None) -> Parser:
    """Parse a whole stream, split at the given offsets."""
    parser = Parser()
    last = 0
    for cut in sorted(chunks or []):
        parser.feed(data[last:cut])
        last = cut
    parser.feed(data[last:])
    return parser
