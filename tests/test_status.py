"""StatusStore: the in-memory source of truth, used without any Redis."""

from __future__ import annotations

import threading
import time

import pytest

from hubhost.status.store import StatusStore


def test_set_get_and_change_detection_by_json_text() -> None:
    store = StatusStore()
    assert store.get("d1", "power") is None
    assert store.set("d1", "power", "true") is True
    assert store.set("d1", "power", "true") is False  # same JSON text: not a change
    assert store.get("d1", "power") == "true"
    assert store.set("d1", "level", "1.0") is True
    assert store.set("d1", "level", "1") is True  # different text counts as a change
    assert store.device("d1") == {"power": "true", "level": "1"}
    assert store.device_ids() == ["d1"]
    assert store.device("nobody") == {}


def test_none_deletes_and_deleting_absent_is_no_change() -> None:
    store = StatusStore()
    assert store.set("d1", "power", None) is False
    store.set("d1", "power", "true")
    assert store.set("d1", "power", None) is True
    assert store.get("d1", "power") is None
    assert store.set("d1", "power", None) is False
    assert store.device("d1") == {}


def test_device_returns_a_copy() -> None:
    store = StatusStore()
    store.set("d1", "a", "1")
    copy = store.device("d1")
    copy["a"] = "2"
    copy["b"] = "3"
    assert store.device("d1") == {"a": "1"}


def test_non_text_value_is_rejected_and_changes_nothing() -> None:
    store = StatusStore()
    seen: list[tuple[str, str, str | None]] = []
    store.add_listener(lambda *a: seen.append(a))
    with pytest.raises(TypeError, match=r"d1\.power.*JSON text"):
        store.set("d1", "power", True)  # type: ignore[arg-type]
    assert store.device_ids() == [] and seen == []


def test_listeners_hear_every_change_in_order_and_can_unsubscribe() -> None:
    store = StatusStore()
    seen: list[tuple[str, str, str | None]] = []
    unsubscribe = store.add_listener(lambda d, n, v: seen.append((d, n, v)))
    store.set("d1", "a", "1")
    store.set("d1", "a", "1")  # no change, no call
    store.set("d1", "a", "2")
    store.set("d1", "a", None)
    assert seen == [("d1", "a", "1"), ("d1", "a", "2"), ("d1", "a", None)]
    unsubscribe()
    store.set("d1", "a", "3")
    assert len(seen) == 3


def test_listener_sees_the_change_already_applied() -> None:
    store = StatusStore()
    observed: list[str | None] = []
    store.add_listener(lambda d, n, v: observed.append(store.get(d, n)))
    store.set("d1", "a", "42")
    assert observed == ["42"]


def test_clear_device_notifies_deletions_and_forgets_the_device() -> None:
    store = StatusStore()
    store.set("d1", "a", "1")
    store.set("d1", "b", "2")
    store.set("d2", "a", "1")
    seen: list[tuple[str, str, str | None]] = []
    store.add_listener(lambda d, n, v: seen.append((d, n, v)))
    store.clear_device("d1")
    assert sorted(seen) == [("d1", "a", None), ("d1", "b", None)]
    assert store.device_ids() == ["d2"]
    store.clear_device("unknown")  # harmless


def test_a_failing_listener_does_not_break_set(caplog: pytest.LogCaptureFixture) -> None:
    store = StatusStore()
    seen: list[str | None] = []

    def broken(d: str, n: str, v: str | None) -> None:
        raise RuntimeError("boom")

    store.add_listener(broken)
    store.add_listener(lambda d, n, v: seen.append(v))
    assert store.set("d1", "a", "1") is True
    assert store.get("d1", "a") == "1" and seen == ["1"]
    assert "boom" in caplog.text


def test_snapshot_reads_many_fields_at_once() -> None:
    store = StatusStore()
    store.set("d1", "a", "1")
    store.set("d2", "b", '"x"')
    assert store.snapshot([("d1", "a"), ("d2", "b"), ("d1", "zz"), ("d9", "a")]) == [
        "1", '"x"', None, None]


def test_concurrent_setters_lose_nothing_and_listener_order_matches_final_state() -> None:
    store = StatusStore()
    last: dict[tuple[str, str], str | None] = {}
    store.add_listener(lambda d, n, v: last.__setitem__((d, n), v))
    threads = 8
    per_thread = 5_000
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            store.set(f"dev{t}", f"f{i % 50}", str(i))
            store.set("shared", "x", f"{t}:{i}")  # every thread races on one field

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for t in range(threads):
        fields = store.device(f"dev{t}")
        assert len(fields) == 50
        assert fields["f49"] == str(per_thread - 1)
    # The last listener call for the contended field reports what memory holds.
    assert last[("shared", "x")] == store.get("shared", "x")


def test_set_costs_microseconds() -> None:
    store = StatusStore()
    store.add_listener(lambda d, n, v: None)
    n = 100_000
    start = time.perf_counter()
    for i in range(n):
        store.set("d", "f", str(i))
    per_call = (time.perf_counter() - start) / n
    # Typically ~1 µs; the bound is loose for busy shared machines but still rules out I/O.
    assert per_call < 50e-6, f"StatusStore.set took {per_call * 1e6:.1f} µs per call"
