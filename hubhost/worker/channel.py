"""The wire between the supervisor and a worker: one Unix stream socket, length-framed.

A frame is `!II` (header length, blob length), the header (an orjson-encoded JSON array
whose first item names the message) and an optional blob of raw bytes (datastore snapshots
and loaded store files travel as blobs, so a 40 MB JSON text is not escaped into a string).

Both sides cap what they accept: a frame over the caps is a protocol violation, and the
supervisor kills a worker that commits one (a worker is never trusted to be well-behaved).
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import threading
from typing import Any

import orjson

HEAD = struct.Struct("!II")
MAX_HEADER = 16 << 20          # 16 MiB of JSON per message (status batches, exec results)
MAX_BLOB = 1 << 30             # 1 GiB: a datastore snapshot is bounded by max_memory first



FENCE_EXIT = 75   # a worker's exit status for "fenced" (fleet mode): not a crash, not restarted

class ProtocolError(Exception):
    """The peer sent something that is not a well-formed frame within the caps."""


def pack(msg: list[Any], blob: bytes = b"") -> bytes:
    header = orjson.dumps(msg)
    return HEAD.pack(len(header), len(blob)) + header + blob


def unpack_header(header: bytes) -> list[Any]:
    try:
        msg = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"a message that is not JSON ({e})") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise ProtocolError("a message that is not a non-empty list naming its kind")
    return msg


class SyncChannel:
    """The worker's end. Reads happen on the worker's loop thread only: from a reader
    callback of the loop when it is idle, or inside a blocking request of the loop thread
    itself (which must not wait on the loop). Writes may come from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self._buf = bytearray()
        self.eof = False

    def send(self, msg: list[Any], blob: bytes = b"") -> None:
        data = pack(msg, blob)
        with self._wlock:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        with self._wlock:
            self.sock.sendall(data)

    def read_ready(self) -> list[tuple[list[Any], bytes]]:
        """Every whole message that has arrived, without waiting (end of stream: eof)."""
        while True:
            try:
                data = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self._buf += data
            if len(data) < 1 << 18:
                break
        return self._parse()

    def read_wait(self, timeout: float | None) -> list[tuple[list[Any], bytes]]:
        """Whole messages, waiting up to `timeout` seconds for the first bytes."""
        got = self._parse()
        if got or self.eof:
            return got
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return self.read_ready() if ready else []

    def recv(self) -> tuple[list[Any], bytes] | None:
        """The next message, waiting as long as it takes; None at end of stream."""
        pending: list[tuple[list[Any], bytes]] = []
        while not pending:
            if self.eof:
                return None
            pending = self.read_wait(None)
        first, rest = pending[0], pending[1:]
        if rest:   # put the others back, in order, in front of what is still unparsed
            self._buf[:0] = b"".join(pack(m, b) for m, b in rest)
        return first

    def _parse(self) -> list[tuple[list[Any], bytes]]:
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEAD.size:
            hlen, blen = HEAD.unpack_from(buf, pos)
            if hlen > MAX_HEADER or blen > MAX_BLOB:
                raise ProtocolError(f"a frame of {hlen}+{blen} bytes (over the caps)")
            end = pos + HEAD.size + hlen + blen
            if len(buf) < end:
                break
            h0 = pos + HEAD.size
            out.append((unpack_header(bytes(buf[h0:h0 + hlen])), bytes(buf[h0 + hlen:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


class AsyncChannel:
    """The supervisor's end: asyncio streams; writes never block the loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_blob: int = MAX_BLOB) -> None:
        self.reader = reader
        self.writer = writer
        self.max_blob = max_blob
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket, max_blob: int = MAX_BLOB) -> "AsyncChannel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer, max_blob)

    def send(self, msg: list[Any], blob: bytes = b"") -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(pack(msg, blob))

    async def recv(self) -> tuple[list[Any], bytes] | None:
        try:
            head = await self.reader.readexactly(HEAD.size)
            hlen, blen = HEAD.unpack(head)
            if hlen > MAX_HEADER or blen > self.max_blob:
                raise ProtocolError(f"a frame of {hlen}+{blen} bytes (over the caps)")
            header = await self.reader.readexactly(hlen)
            blob = await self.reader.readexactly(blen) if blen else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return unpack_header(header), blob

    def close(self) -> None:
        self.closed = True
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a dead peer's socket
            pass


__all__ = ["SyncChannel", "AsyncChannel", "ProtocolError", "pack", "MAX_HEADER", "MAX_BLOB"]
