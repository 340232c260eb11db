"""Just enough HTTP/1.1 for the load generator: a request, a head, a chunked body.

A real HTTP client library would cost more CPU per chunk than some of the
servers under test; at 150 k chunks/s the client must stay far below one
microsecond-scale Python call per byte. So this parses only what our own
targets send: a status line, headers, and either ``Content-Length`` or
chunked transfer coding without trailers (RFC 9112 section 7.1).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The server sent something this minimal parser does not accept."""


def request(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n" % path.encode()


class Head:
    """Status and the two framing headers of a response."""

    __slots__ = ("chunked", "length", "status")

    def __init__(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        self.chunked = False
        self.length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"content-length":
                self.length = int(value)


class Dechunker:
    """Incremental chunked-body decoder that counts, and optionally keeps, payload.

    ``feed`` returns True once the last chunk has been read; bytes after it
    (the next response on a keep-alive connection) are left in ``rest``.
    """

    __slots__ = ("chunks", "done", "ending", "keep", "need", "out", "partial", "payload", "rest")

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.out = bytearray()
        self.need = 0  # bytes of chunk data + its CRLF still to consume
        self.ending = False
        self.done = False
        self.partial = b""
        self.rest = b""
        self.chunks = 0
        self.payload = 0

    def feed(self, data: bytes) -> bool:
        if self.partial:
            data, self.partial = self.partial + data, b""
        pos, end = 0, len(data)
        while pos < end:
            if self.need:
                take = min(self.need, end - pos)
                if self.keep and self.need > 2:
                    self.out += data[pos : pos + min(take, self.need - 2)]
                self.need -= take
                pos += take
                if not self.need and self.ending:
                    self.done = True
                    self.rest = data[pos:]
                    return True
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                self.partial = data[pos:]
                if len(self.partial) > 1024:
                    raise ProtocolError("chunk size line too long")
                return False
            size = int(data[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                self.ending = True
                self.need = 2  # the CRLF closing an empty trailer section
            else:
                self.chunks += 1
                self.payload += size
                self.need = size + 2
        return self.done

    def lines(self) -> list[bytes]:
        """Complete payload lines kept so far (removed from the buffer)."""
        cut = self.out.rfind(b"\n")
        if cut < 0:
            return []
        lines = bytes(self.out[:cut]).split(b"\n")
        del self.out[: cut + 1]
        return lines


def parse_message(line: bytes) -> tuple[int, int] | None:
    """``(seq, stamp_ns)`` of a producer message line, or None for anything else.

    Accepts the plain form and the SSE form (``data: ...``), skipping the
    hello line, SSE comments and blank separators.
    """
    line = line.rstrip(b"\r")
    if line.startswith(b"data: "):
        line = line[6:]
    if not line or line == b"hello" or line.startswith(b":"):
        return None
    seq, _, stamp = line.partition(b" ")
    return int(seq), int(stamp)
