"""The wire between the supervisor and a worker: one Unix stream socket, length-framed.

A frame is `!II` (header length, blob length), the header (an orjson-encoded JSON array
whose first item names the message) and an optional blob of raw bytes (datastore snapshots
and loaded store files travel as blobs, so a 40 MB JSON text is not escaped into a string).

Both sides cap what they accept: a frame over the caps is a protocol violation, and the
supervisor kills a worker that commits one (a worker is never trusted to be well-behaved).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

import orjson

HEAD = struct.Struct("!II")
MAX_HEADER = 16 << 20          # 16 MiB of JSON per message (status batches, exec results)
MAX_BLOB = 1 << 30             # 1 GiB: a datastore snapshot is bounded by max_memory first


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
    """The worker's end: blocking reads on a reader thread, writes from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self._rfile = sock.makefile("rb", buffering=1 << 16)

    def send(self, msg: list[Any], blob: bytes = b"") -> None:
        data = pack(msg, blob)
        with self._wlock:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        with self._wlock:
            self.sock.sendall(data)

    def recv(self) -> tuple[list[Any], bytes] | None:
        """The next message, or None at end of stream."""
        head = self._rfile.read(HEAD.size)
        if len(head) < HEAD.size:
            return None
        hlen, blen = HEAD.unpack(head)
        if hlen > MAX_HEADER or blen > MAX_BLOB:
            raise ProtocolError(f"a frame of {hlen}+{blen} bytes (over the caps)")
        header = self._rfile.read(hlen)
        blob = self._rfile.read(blen) if blen else b""
        if len(header) < hlen or len(blob) < blen:
            return None
        return unpack_header(header), blob


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
