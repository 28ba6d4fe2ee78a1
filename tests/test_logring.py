"""The log ring stays bounded per driver, by count and by bytes, and filters as asked."""

from __future__ import annotations

import logging

from hubhost.supervisor.logring import Filter, LogRing


def test_ring_is_bounded_by_count_and_bytes() -> None:
    ring = LogRing(size=100, max_bytes=10_000)
    for i in range(1000):
        ring.add(logging.INFO, "a", None, f"[a] line {i}")
    assert len(ring.rings["a"]) == 100 and ring.rings["a"][-1].text == "[a] line 999"
    for i in range(50):
        ring.add(logging.INFO, "b", "d1", "[b/d1] " + "x" * 1000)
    assert sum(len(e.text) for e in ring.rings["b"]) <= 10_000 and len(ring.rings["b"]) == 9
    assert ring.bytes["b"] == sum(len(e.text) for e in ring.rings["b"])
    got = ring.recent(Filter(frozenset(["b"]), "d1", logging.INFO))
    assert len(got) == 9 and all(e.device == "d1" for e in got)
    assert ring.recent(Filter(None, None, logging.WARNING)) == []
    ring.forget(["a"])
    assert "b" not in ring.rings and "b" not in ring.bytes
