"""Weighted rendezvous hashing: which hub owns a device or builds a system's index.

Keyed by the stable device (or system) id, never by an address, so a hub that changes its
address moves nothing, and a hub that joins or leaves moves only its own share.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """A live, ready hub as HRW sees it."""

    id: str
    weight: float = 1.0
    tags: frozenset[str] = field(default_factory=frozenset)


def score(hub_id: str, key: str, weight: float) -> float:
    """-w / ln(u) with u uniform in (0, 1) from a hash of (hub, key): weighted HRW."""
    h = hashlib.blake2b(f"{hub_id}\0{key}".encode(), digest_size=8).digest()
    u = (int.from_bytes(h, "big") + 0.5) / 2.0**64
    return -weight / math.log(u)


def winner(key: str, hubs: Iterable[Candidate], needs: Iterable[str] = ()) -> str | None:
    """The hub that owns `key`: highest score among hubs carrying every tag in `needs`
    (ties, which need equal hashes, go to the smaller id); None when no hub qualifies."""
    need = frozenset(needs)
    best: tuple[float, str] | None = None
    for c in hubs:
        if c.weight <= 0 or not need <= c.tags:
            continue
        s = (score(c.id, key, c.weight), c.id)
        if best is None or s[0] > best[0] or (s[0] == best[0] and s[1] < best[1]):
            best = s
    return best[1] if best else None
