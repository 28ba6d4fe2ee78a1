"""Framers: every byte value passes, frames survive any chunking, overflow stays bounded."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubhost.devices.framing import (
    ChunkFramer,
    DelimiterFramer,
    FramingError,
    LengthFramer,
    PatternFramer,
    TokenizerError,
    make_framer,
)

ALL = bytes(range(256))


def feed_chunks(framer, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``data`` split at ``cuts`` (sorted positions); collect frames."""
    out: list[bytes] = []
    prev = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        out += framer.feed(data[prev:cut])
        prev = cut
    return out


def length_prefixed(buf: bytes):
    """A tokenizer like a Lua driver's: first byte is the payload length."""
    if not buf:
        return None, buf
    n = buf[0]
    if len(buf) < 1 + n:
        return None, buf
    return buf[1:1 + n], buf[1 + n:]


# -- all 256 byte values in every mode ------------------------------------------------


def test_delimiter_single_byte_passes_every_other_byte_value():
    payload = bytes(b for b in ALL if b != 0x0D)
    f = make_framer({"delimiter": b"\r"})
    assert isinstance(f, DelimiterFramer)
    assert f.feed(payload + b"\r" + payload[::-1] + b"\r") == [payload, payload[::-1]]


def test_multibyte_delimiter_lets_all_256_values_through():
    f = make_framer({"delimiter": b"\xff\x00"})
    # ALL ends in \xff: the frame ends right before the delimiter, not one byte early.
    assert f.feed(ALL + b"\xff\x00" + ALL + b"\xff\x00") == [ALL, ALL]


def test_length_mode_all_values_any_split():
    f = make_framer({"length": 256})
    assert isinstance(f, LengthFramer)
    stream = ALL + ALL[::-1] + ALL
    for step in (1, 7, 255, 256, 257, 1000):
        f.reset()
        frames = feed_chunks(f, stream, list(range(step, len(stream), step)))
        assert frames == [ALL, ALL[::-1], ALL], step
        assert f.buffered == 0


def test_pattern_mode_all_values_split_and_many_per_feed():
    f = make_framer({"pattern": "lenprefix"}, tokenizer=length_prefixed)
    assert isinstance(f, PatternFramer)
    payloads = [ALL[i:i + 200] for i in range(0, 256, 50)] + [ALL[200:]]
    stream = b"".join(bytes([len(p)]) + p for p in payloads)
    assert f.feed(stream) == payloads  # many frames in one feed
    assert feed_chunks(f, stream, list(range(1, len(stream)))) == payloads  # byte by byte


def test_chunk_mode_passes_each_chunk_whole():
    f = make_framer({})
    assert isinstance(f, ChunkFramer)
    assert f.feed(ALL) == [ALL]
    assert f.feed(b"") == []


# -- chunking -------------------------------------------------------------------------


def test_delimiter_split_across_every_position():
    stream = b"PWR=ON\r\nSOURCE=HDMI1\r\n\x00\xff\x80\r\n"
    want = [b"PWR=ON", b"SOURCE=HDMI1", b"\x00\xff\x80"]
    for cut in range(1, len(stream)):
        f = make_framer({"delimiter": b"\r\n"})
        assert feed_chunks(f, stream, [cut]) == want, cut
    f = make_framer({"delimiter": b"\r\n"})
    assert feed_chunks(f, stream, list(range(1, len(stream)))) == want


def test_many_frames_in_one_feed_and_partial_rest_kept():
    f = make_framer({"delimiter": b"\n"})
    frames = f.feed(b"".join(b"frame%d\n" % i for i in range(1000)) + b"part")
    assert frames == [b"frame%d" % i for i in range(1000)]
    assert f.buffered == 4
    assert f.feed(b"ial\n") == [b"partial"]


def test_delimiter_list_longest_wins_and_split_crlf_does_not_leak():
    f = make_framer({"delimiter": [b"\r", b"\r\n", b"\n"]})
    assert f.feed(b"a\r\nb\rc\n") == [b"a", b"b", b"c"]
    # CR at the end of one read, LF at the start of the next: still one delimiter.
    assert f.feed(b"d\r") == [b"d"]
    assert f.feed(b"\ne\r\n") == [b"e"]


def test_empty_frames_skipped_unless_keep_empty():
    assert make_framer({"delimiter": b"\r"}).feed(b"\r\ra\r\r") == [b"a"]
    f = make_framer({"delimiter": b"\r", "keep_empty": True})
    assert f.feed(b"\r\ra\r") == [b"", b"", b"a"]


def test_reset_drops_partial_frame():
    f = make_framer({"delimiter": b"\r"})
    f.feed(b"stale")
    f.reset()
    assert f.buffered == 0
    assert f.feed(b"fresh\r") == [b"fresh"]


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=20),
    delim=st.sampled_from([b"\r", b"\r\n", b"\x00", b"\xff\xfe\xfd"]),
)
def test_delimiter_any_chunking_gives_the_same_frames(frames, cuts, delim):
    # Payloads must not contain the delimiter nor end in a prefix that would combine
    # with it: replace such bytes so the expectation is unambiguous.
    clean = []
    for fr in frames:
        fr = fr.replace(delim, b"")
        while fr and (delim.startswith(fr[-1:]) or delim[:1] in fr):
            fr = fr.replace(delim[:1], b"_")
        clean.append(fr or b"x")
    stream = b"".join(fr + delim for fr in clean)
    f = make_framer({"delimiter": delim})
    assert feed_chunks(f, stream, cuts) == clean


@settings(max_examples=100, deadline=None)
@given(
    frames=st.lists(st.binary(min_size=0, max_size=255), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=2100), max_size=20),
)
def test_pattern_any_chunking_gives_the_same_frames(frames, cuts):
    stream = b"".join(bytes([len(fr)]) + fr for fr in frames)
    f = make_framer({"pattern": "x"}, tokenizer=length_prefixed)
    assert feed_chunks(f, stream, cuts) == frames


# -- overflow ---------------------------------------------------------------------------


def test_flood_without_delimiter_is_bounded_warned_once_and_recovers():
    warnings: list[int] = []
    max_frame, chunk = 4096, 1500
    f = make_framer({"delimiter": b"\r\n"}, max_frame=max_frame, on_overflow=warnings.append)
    junk = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") * 6
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        peak_buffer = fed = 0
        for i in range(2000):  # ~3 MB of junk with no delimiter
            piece = junk[(i * 7) % 200:][:chunk]
            fed += len(piece)
            assert f.feed(piece) == []
            peak_buffer = max(peak_buffer, f.buffered)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_buffer <= max_frame + chunk
    assert peak - base < 4 * (max_frame + chunk)  # nothing else piles up either
    assert len(warnings) == 1 and warnings[0] > max_frame
    assert f.dropped_frames == 1 and f.dropped_bytes == fed - f.buffered
    # The junk ends at the next delimiter; frames after it are fine.
    assert f.feed(b"tail of junk\r\nGOOD\r\n") == [b"GOOD"]
    assert not f.overflowing


def test_burst_of_oversized_frames_warns_once_per_burst():
    warnings: list[int] = []
    f = make_framer({"delimiter": b"\n", "max_frame": 100}, on_overflow=warnings.append)
    big = b"x" * 101 + b"\n"
    assert f.feed(big * 50) == []  # 50 terminated oversized frames in one read
    for _ in range(20):
        assert f.feed(big[:60]) == []
        assert f.feed(big[60:]) == []
    assert len(warnings) == 1
    assert f.dropped_frames == 70
    assert f.feed(b"y" * 100 + b"\n") == [b"y" * 100]  # exactly max_frame is fine
    assert f.feed(big) == []
    assert len(warnings) == 2  # a new burst after a good frame


def test_split_delimiter_found_while_discarding():
    f = make_framer({"delimiter": b"\r\n", "max_frame": 10})
    f.feed(b"z" * 50 + b"\r")
    assert f.buffered <= 1
    assert f.feed(b"\nok\r\n") == [b"ok"]


def test_pattern_overflow_discards_buffer_and_recovers():
    warnings: list[int] = []

    def never_done(buf: bytes):
        return None, buf

    f = make_framer({"pattern": 1}, max_frame=1000, tokenizer=never_done, on_overflow=warnings.append)
    for _ in range(100):
        f.feed(b"a" * 300)
        assert f.buffered <= 1000
    assert len(warnings) == 1
    g = make_framer({"pattern": 1}, max_frame=10, tokenizer=length_prefixed, on_overflow=warnings.append)
    assert g.feed(bytes([20]) + b"y" * 20 + bytes([3]) + b"abc") == [b"abc"]
    assert g.dropped_frames == 1


def test_chunk_mode_drops_oversized_chunk():
    warnings: list[int] = []
    f = make_framer({"max_frame": 10}, on_overflow=warnings.append)
    assert f.feed(b"x" * 11) == [] and warnings == [11]
    assert f.feed(b"x" * 10) == [b"x" * 10]


# -- tokenizer contract and spec errors ------------------------------------------------


def test_tokenizer_that_makes_no_progress_is_rejected():
    f = make_framer({"pattern": 1}, tokenizer=lambda buf: (b"", buf))
    with pytest.raises(TokenizerError, match="consumed no bytes"):
        f.feed(b"abc")
    assert f.buffered == 0


def test_tokenizer_error_keeps_earlier_frames_and_discards_buffer():
    calls = []

    def tok(buf: bytes):
        calls.append(buf)
        if buf.startswith(b"!"):
            raise RuntimeError("bad byte")
        return buf[:1], buf[1:]

    f = make_framer({"pattern": 1}, tokenizer=tok)
    with pytest.raises(TokenizerError, match="bad byte") as info:
        f.feed(b"ab!cd")
    assert info.value.frames == [b"a", b"b"]
    assert f.buffered == 0
    assert f.feed(b"x") == [b"x"]


def test_tokenizer_wrong_types_are_rejected():
    f = make_framer({"pattern": 1}, tokenizer=lambda buf: ("text", b""))
    with pytest.raises(TokenizerError, match="frame must be bytes"):
        f.feed(b"a")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"delimeter": b"\r"}, "unknown key 'delimeter'"),
        ({"delimiter": "\r"}, "is text, not bytes"),
        ({"delimiter": b""}, "must not be empty"),
        ({"delimiter": []}, "must not be empty"),
        ({"delimiter": b"\r", "length": 4}, "choose one of"),
        ({"length": 0}, "length must be a positive integer"),
        ({"length": "8"}, "length must be a positive integer"),
        ({"length": 70000}, "exceeds max_frame"),
        ({"pattern": 1}, "needs a tokenizer"),
        ({"delimiter": b"\r", "keep_empty": 1}, "keep_empty must be a boolean"),
        ({"delimiter": b"\r", "max_frame": -1}, "max_frame must be a positive integer"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(FramingError, match=message):
        make_framer(spec)


def test_lua_style_float_numbers_accepted():
    f = make_framer({"length": 4.0, "max_frame": 8.0})
    assert f.feed(b"abcdefgh") == [b"abcd", b"efgh"]


def test_feed_rejects_text():
    with pytest.raises(TypeError, match="needs bytes"):
        make_framer({"delimiter": b"\r"}).feed("PWR ON\r")  # type: ignore[arg-type]
