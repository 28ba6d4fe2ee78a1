"""Split a device's byte stream into frames.

Framing runs on the driver's thread (a ``pattern`` framer calls a Lua tokenizer), so every
framer here is a plain synchronous object: no event loop, no locks, no text decoding.
Bytes are bytes: all 256 byte values pass through unchanged.

The spec is the driver template's ``framing`` table as a dict:

``{"delimiter": b"\\r"}`` or ``{"delimiter": [b"\\r\\n", b"\\r"]}``
    A frame ends at the earliest delimiter; the delimiter is NOT part of the frame.
    When several delimiters match at the same position the longest wins, and when a
    shorter delimiter ended a frame at the very end of a chunk while a longer one starts
    with it (``\\r`` vs ``\\r\\n``), the rest of the longer one is skipped if it is the
    first thing the next chunk brings, so a split CRLF never leaks a ``\\n`` into the next
    frame. Empty frames (two delimiters in a row) are skipped unless
    ``keep_empty = true``.
``{"length": n}``
    Fixed-size frames of exactly ``n`` bytes (``n <= max_frame``).
``{"pattern": ...}``
    The caller supplies ``tokenizer(buffer) -> (frame | None, rest)``; it is called while
    it returns frames. Returning ``None`` means "need more bytes" (``rest`` may be shorter
    than ``buffer`` to drop garbage). A frame must consume bytes, or the call is an error.
``{}``
    No framing: every received chunk is one frame (natural for UDP datagrams).

Optional keys in any mode: ``max_frame`` (overrides the keyword argument).

Overflow: a frame longer than ``max_frame`` is dropped. In delimiter mode the framer then
discards everything up to the next delimiter and resynchronises there; in pattern mode the
unconsumed buffer is discarded. The buffer never holds more than ``max_frame`` plus one
received chunk. ``on_overflow(nbytes)`` is called ONCE per burst (a burst ends when a good
frame is delivered), so the caller logs one warning per burst; ``dropped_frames`` and
``dropped_bytes`` count everything dropped.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Protocol

DEFAULT_MAX_FRAME = 65536

Tokenizer = Callable[[bytes], "tuple[bytes | None, bytes]"]
OverflowCallback = Callable[[int], None]

_ALLOWED_KEYS = ("delimiter", "length", "pattern", "max_frame", "keep_empty")
_MODES = ("delimiter", "length", "pattern")


class FramingError(ValueError):
    """A framing spec or a tokenizer result was rejected."""


class TokenizerError(FramingError):
    """The pattern tokenizer failed; ``frames`` holds the frames it produced before.

    The framer discards its buffer when this happens so the same bytes do not fail again.
    """

    def __init__(self, message: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.frames = frames


class Framer(Protocol):
    """What every framer offers to the driver runtime."""

    max_frame: int
    dropped_frames: int
    dropped_bytes: int

    def feed(self, data: bytes) -> list[bytes]: ...

    def reset(self) -> None: ...

    @property
    def buffered(self) -> int: ...


class _Base:
    """Overflow bookkeeping shared by all framers."""

    def __init__(self, max_frame: int, on_overflow: OverflowCallback | None) -> None:
        self.max_frame = max_frame
        self.on_overflow = on_overflow
        self.dropped_frames = 0
        self.dropped_bytes = 0
        self._in_burst = False

    def _overflow(self, nbytes: int, *, count_bytes: bool = True) -> None:
        """Count a dropped frame; tell the caller only at the start of a burst."""
        self.dropped_frames += 1
        if count_bytes:
            self.dropped_bytes += nbytes
        if not self._in_burst:
            self._in_burst = True
            if self.on_overflow is not None:
                self.on_overflow(nbytes)

    def _good_frame(self) -> None:
        self._in_burst = False

    @property
    def overflowing(self) -> bool:
        """True while inside an overflow burst (no good frame since the last drop)."""
        return self._in_burst


class ChunkFramer(_Base):
    """Each received chunk is one frame (``framing = {}``)."""

    @property
    def buffered(self) -> int:
        return 0

    def feed(self, data: bytes) -> list[bytes]:
        data = _as_bytes(data)
        if not data:
            return []
        if len(data) > self.max_frame:
            self._overflow(len(data))
            return []
        self._good_frame()
        return [data]

    def reset(self) -> None:
        self._in_burst = False


class LengthFramer(_Base):
    """Fixed-size frames; no overflow is possible because ``length <= max_frame``."""

    def __init__(self, length: int, max_frame: int, on_overflow: OverflowCallback | None) -> None:
        super().__init__(max_frame, on_overflow)
        self.length = length
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        data = _as_bytes(data)
        buf = self._buf
        buf += data
        n = self.length
        count = len(buf) // n
        if not count:
            return []
        frames = [bytes(buf[i * n:(i + 1) * n]) for i in range(count)]
        del buf[:count * n]
        self._good_frame()
        return frames

    def reset(self) -> None:
        self._buf.clear()
        self._in_burst = False


class DelimiterFramer(_Base):
    """Frames end at one of the delimiters, which are stripped."""

    def __init__(
        self,
        delimiters: list[bytes],
        max_frame: int,
        on_overflow: OverflowCallback | None,
        keep_empty: bool = False,
    ) -> None:
        super().__init__(max_frame, on_overflow)
        # Longest first so that at one position the longest delimiter wins.
        self.delimiters = sorted(set(delimiters), key=len, reverse=True)
        self.keep_empty = keep_empty
        self._single = self.delimiters[0] if len(self.delimiters) == 1 else None
        self._regex = re.compile(b"|".join(re.escape(d) for d in self.delimiters))
        self._overlap = max(len(d) for d in self.delimiters) - 1
        # For a delimiter that is a prefix of longer ones: the tails to skip next chunk.
        self._tails: dict[bytes, list[bytes]] = {}
        for d in self.delimiters:
            tails = [o[len(d):] for o in self.delimiters if len(o) > len(d) and o.startswith(d)]
            if tails:
                self._tails[d] = sorted(tails, key=len, reverse=True)
        self._buf = bytearray()
        self._scan_from = 0
        self._discarding = False
        self._pending_tails: list[bytes] = []

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _find(self, buf: bytearray, start: int) -> tuple[int, int]:
        """Return (position, delimiter length) of the first delimiter, or (-1, 0)."""
        if self._single is not None:
            return buf.find(self._single, start), len(self._single)
        m = self._regex.search(buf, start)
        if m is None:
            return -1, 0
        return m.start(), m.end() - m.start()

    def feed(self, data: bytes) -> list[bytes]:
        data = _as_bytes(data)
        if self._pending_tails and data:
            for tail in self._pending_tails:
                if data.startswith(tail):
                    data = data[len(tail):]
                    break
            self._pending_tails = []
        if not data:
            return []
        frames: list[bytes] = []
        buf = self._buf
        if buf:
            # A partial frame is waiting: only its first delimiter needs the joined buffer.
            buf += data
            pos, dlen = self._find(buf, self._scan_from)
            if pos < 0:
                self._keep_partial()
                return frames
            self._cut(frames, buf, 0, pos)
            end = pos + dlen
            if end == len(buf):
                self._pending_tails = self._tails.get(bytes(buf[pos:end]), [])
            data = bytes(buf[end:])
            buf.clear()
        start = 0
        single = self._single
        if single is not None and not self._discarding and not self._pending_tails:
            # Fast path for one delimiter: bytes.split does the scanning in C.
            parts = data.split(single)
            rest = parts.pop()
            max_frame, keep_empty = self.max_frame, self.keep_empty
            for part in parts:
                size = len(part)
                if size > max_frame:
                    self._overflow(size)
                elif size or keep_empty:
                    frames.append(part)
                    self._in_burst = False
            if rest:
                buf += rest
            self._keep_partial()
            return frames
        while True:
            pos, dlen = self._find(data, start)
            if pos < 0:
                break
            self._cut(frames, data, start, pos)
            start = pos + dlen
            if start == len(data):
                self._pending_tails = self._tails.get(data[pos:start], [])
        if start < len(data):
            buf += memoryview(data)[start:]
        self._keep_partial()
        return frames

    def _cut(self, frames: list[bytes], src: bytes | bytearray, start: int, pos: int) -> None:
        """Handle the bytes ``src[start:pos]`` that a delimiter just ended."""
        if self._discarding:
            # The tail of an oversized frame ends here: resynchronised.
            self.dropped_bytes += pos - start
            self._discarding = False
            return
        size = pos - start
        if size > self.max_frame:
            self._overflow(size)
        elif size or self.keep_empty:
            frames.append(bytes(src[start:pos]))
            self._good_frame()

    def _keep_partial(self) -> None:
        """Bound the unterminated rest of the buffer; decide where the next search starts."""
        buf = self._buf
        # The next search only needs to look back far enough to catch a split delimiter.
        self._scan_from = max(0, len(buf) - self._overlap)
        if not self._discarding and len(buf) - self._overlap > self.max_frame:
            # Cannot become a valid frame any more: drop it, skip to the next delimiter.
            self._overflow(len(buf) - self._overlap, count_bytes=False)  # _drop_partial counts
            self._discarding = True
        if self._discarding:
            self._drop_partial()

    def _drop_partial(self) -> None:
        """Discard buffered bytes of an oversized frame, keeping a possible split delimiter."""
        buf = self._buf
        drop = len(buf) - self._overlap
        if drop > 0:
            self.dropped_bytes += drop
            del buf[:drop]
        self._scan_from = 0

    def reset(self) -> None:
        self._buf.clear()
        self._scan_from = 0
        self._discarding = False
        self._pending_tails = []
        self._in_burst = False


class PatternFramer(_Base):
    """Frames cut by a caller-supplied tokenizer (a Lua function in practice)."""

    def __init__(
        self, tokenizer: Tokenizer, max_frame: int, on_overflow: OverflowCallback | None
    ) -> None:
        super().__init__(max_frame, on_overflow)
        self.tokenizer = tokenizer
        self._buf = b""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        data = _as_bytes(data)
        buf = self._buf + data if self._buf else data
        frames: list[bytes] = []
        while buf:
            try:
                frame, rest = _check_tokenizer_result(self.tokenizer(buf), len(buf))
            except Exception as exc:
                self._buf = b""
                raise TokenizerError(f"framing pattern: tokenizer failed: {exc}", frames) from exc
            if frame is None:
                buf = rest
                break
            if len(frame) > self.max_frame:
                self._overflow(len(frame))
            else:
                frames.append(frame)
                self._good_frame()
            buf = rest
        if len(buf) > self.max_frame:
            # No resync point is known to us: the tokenizer sees a fresh start.
            self._overflow(len(buf))
            buf = b""
        self._buf = buf
        return frames

    def reset(self) -> None:
        self._buf = b""
        self._in_burst = False


def _check_tokenizer_result(result: Any, buflen: int) -> tuple[bytes | None, bytes]:
    """Validate ``(frame, rest)`` from a tokenizer; reject results that cannot progress."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise FramingError(
            f"tokenizer must return (frame, rest), got {type(result).__name__} {result!r:.60}"
        )
    frame, rest = result
    if rest is None:
        rest = b""
    if not isinstance(rest, (bytes, bytearray)):
        raise FramingError(f"tokenizer rest must be bytes, got {type(rest).__name__}")
    if frame is not None and not isinstance(frame, (bytes, bytearray)):
        raise FramingError(f"tokenizer frame must be bytes or nil, got {type(frame).__name__}")
    if len(rest) > buflen:
        raise FramingError(f"tokenizer rest ({len(rest)} bytes) is longer than its buffer ({buflen})")
    if frame is not None and len(rest) == buflen:
        raise FramingError("tokenizer returned a frame but consumed no bytes (would loop forever)")
    return (bytes(frame) if frame is not None else None), bytes(rest)


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"framer.feed needs bytes, got {type(data).__name__}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # Lua numbers arrive as floats
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FramingError(f"framing: {name} must be a positive integer, got {value!r}")
    return value


def _delimiters(value: Any) -> list[bytes]:
    items: Iterable[Any]
    if isinstance(value, (bytes, bytearray, str)):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise FramingError(
            f"framing: delimiter must be bytes or a list of bytes, got {type(value).__name__}"
        )
    out: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            raise FramingError(
                f"framing: delimiter {item!r} is text, not bytes (no decoding on the byte path)"
            )
        if not isinstance(item, (bytes, bytearray)):
            raise FramingError(f"framing: delimiter must be bytes, got {type(item).__name__}")
        if not item:
            raise FramingError("framing: delimiter must not be empty")
        out.append(bytes(item))
    if not out:
        raise FramingError("framing: delimiter list must not be empty")
    return out


def make_framer(
    spec: dict[str, Any],
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    tokenizer: Tokenizer | None = None,
    on_overflow: OverflowCallback | None = None,
) -> Framer:
    """Build a framer from a template's framing table; errors name the bad key."""
    if not isinstance(spec, dict):
        raise FramingError(f"framing must be a table, got {type(spec).__name__}")
    for key in spec:
        if key not in _ALLOWED_KEYS:
            raise FramingError(
                f"framing: unknown key {key!r} (allowed: {', '.join(_ALLOWED_KEYS)})"
            )
    modes = [m for m in _MODES if m in spec]
    if len(modes) > 1:
        raise FramingError(f"framing: choose one of delimiter, length, pattern; got {', '.join(modes)}")
    max_frame = _positive_int("max_frame", spec.get("max_frame", max_frame))
    keep_empty = spec.get("keep_empty", False)
    if not isinstance(keep_empty, bool):
        raise FramingError(f"framing: keep_empty must be a boolean, got {keep_empty!r}")
    if not modes:
        return ChunkFramer(max_frame, on_overflow)
    mode = modes[0]
    if mode == "delimiter":
        return DelimiterFramer(_delimiters(spec["delimiter"]), max_frame, on_overflow, keep_empty)
    if mode == "length":
        length = _positive_int("length", spec["length"])
        if length > max_frame:
            raise FramingError(f"framing: length {length} exceeds max_frame {max_frame}")
        return LengthFramer(length, max_frame, on_overflow)
    if tokenizer is None or not callable(tokenizer):
        raise FramingError("framing: pattern mode needs a tokenizer function (buffer) -> frame, rest")
    return PatternFramer(tokenizer, max_frame, on_overflow)
