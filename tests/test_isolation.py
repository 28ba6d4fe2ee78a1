"""Driver isolation through a real `hubhost run` (issue 11): every attack of the issue's table
runs in a hostile driver beside an innocent one (a 100 ms timer that logs a beat and counts in
its status). For each: the innocent's beats never gap more than 0.35 s, its status is never
written by the attacker, the API keeps answering, process CPU is back to idle within 2 s of
the host giving up, memory stays bounded, and SIGTERM stops the hub within 10 s.

Also: workers killed from outside (SIGKILL, SIGSEGV) come back with their saved state while
their neighbours are untouched, and a group restarts together.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from hubproc import HubProcess
from hubutil import write_config, write_driver

INNOCENT = """
local driver_helper = require "driver_helper"
local log = require "log"
local n = 0
local driver = driver_helper.init {
  name = "innocent",
  lifecycle = { init = function(d, device) device.status.owner = "innocent" end },
}
driver:call_on_schedule(0.1, function(d)
  n = n + 1
  log.info("BEAT " .. n)
end, "beat")
return driver
"""

# The attack runs once per hub life: the attacker first saves that it attacked, so a
# restarted attacker (after the host gave up) stays quiet and idle CPU can be measured.
ATTACKER = """
local driver_helper = require "driver_helper"
local log = require "log"
local dev
local driver = driver_helper.init {{
  name = "attacker",
  lifecycle = {{ init = function(d, device) dev = device device.status.mine = 1 end }},
}}
driver:call_with_delay(0.5, function(d)
  if d.datastore.attacked then log.info("ATTACKER back, quiet") return end
  d.datastore.attacked = true
  d.datastore:save()
  log.info("ATTACK start")
  {attack}
  log.info("ATTACK survived")
end, "attack")
return driver
"""

ATTACKS = {
    "index_loop_on_driver": """
        rawset(d, "name", nil)
        local mt = getmetatable(d)
        if mt then mt.__index = function() while true do end end end
    """,
    "len_loop_on_implements": """
        d.implements = setmetatable({"X"}, {__len = function() while true do end end})
        error("make the host look at the driver")
    """,
    "tostring_loop_error": """
        error(setmetatable({}, {__tostring = function() while true do end end}))
    """,
    "xpcall_handler_loop": """
        xpcall(function() while true do end end, function() while true do end end)
    """,
    "coroutine_resume_chain": """
        local function f(n) return coroutine.resume(coroutine.create(f), n + 1) end
        pcall(f, 1)
    """,
    "gsub_in_gsub": """
        local function g(s) return (string.gsub(s, ".", g)) end
        pcall(g, "ab")
    """,
    "sort_killer": """
        -- a quicksort killer: median-of-three adversary on 100k numbers
        local n = 100000
        local t = {}
        for i = 1, n do t[i] = i end
        for i = 1, n, 2 do t[i], t[n - i + 1] = t[n - i + 1], t[i] end
        local cmp_calls = 0
        table.sort(t, function(a, b) cmp_calls = cmp_calls + 1 return a < b end)
    """,
    "forged_wait_token": """
        d:call_with_delay(0.3, function() log.info("ATTACK survived") end)   -- the driver goes on
        local _, W = coroutine.resume(coroutine.create(function() driver_helper.sleep(0) end))
        coroutine.yield(W, "host", "save", {999999, "not json\\0"})
    """,
    "hijack_status": """
        local mt = getmetatable(dev)
        for i = 1, 2000 do
          pcall(function()
            setmetatable({id = "inn1"}, mt).status.owner = "hijacked"
          end)
          pcall(function()
            setmetatable({id = "fake" .. i}, mt).status.big = string.rep("x", 65536)
          end)
        end
    """,
    "log_forgery": """
        log.info("line one\\n12:00:00 INFO    hubhost.driver: [innocent] FORGED LINE")
        log.info("ansi \\27[2J\\27[31mred\\0nul")
        print("print\\nFORGED PRINT")
    """,
    "timer_flood": """
        local ok, err = pcall(function()
          for i = 1, 343000 do d:call_with_delay(3600, function() end) end
        end)
        log.info("TIMERS " .. tostring(ok) .. " " .. tostring(err))
    """,
}


def _config(tmp_path: Path, attack: str) -> Path:
    write_driver(tmp_path, "innocent", INNOCENT)
    write_driver(tmp_path, "attacker", ATTACKER.format(attack=textwrap.indent(textwrap.dedent(attack), "  ")))
    return write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "innocent"
        path = "innocent"
        [[drivers.devices]]
        id = "inn1"

        [[drivers]]
        id = "attacker"
        path = "attacker"
        cpu_limit = 1.0
        max_memory = "32MiB"
        [[drivers.devices]]
        id = "att1"
    """)


GAVE_UP = ("aborted", "killing the worker", "killing it", "driver crashed", "failed:", "ATTACK survived",
           "refused")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained(tmp_path: Path, name: str) -> None:
    hub = HubProcess(_config(tmp_path, ATTACKS[name]), tmp_path / "state")
    try:
        hub.wait_api()
        start = hub.wait_for("ATTACK start")[0][0]
        # the host gives up on the attack (or the attack was refused and the handler ended)
        deadline = time.monotonic() + 10
        gave_up = None
        while time.monotonic() < deadline and gave_up is None:
            for t, line in hub.lines[:]:
                if t >= start and "[attacker" in line and any(g in line for g in GAVE_UP):
                    gave_up = t
                    break
            assert hub.api("GET", "/api/v1/health")[0] == 200          # the API answers throughout
            time.sleep(0.1)
        assert gave_up is not None, "\n".join(ln for _, ln in hub.lines[-30:])
        time.sleep(max(0.0, gave_up + 2.0 - time.monotonic()))
        # CPU back to idle within 2 s of the host giving up: the innocent's timer costs little
        c0, t0 = hub.cpu_seconds(), time.monotonic()
        time.sleep(1.5)
        busy = (hub.cpu_seconds() - c0) / (time.monotonic() - t0)
        assert busy < 0.35, f"processes still busy ({busy:.0%} of a core) after the host gave up"
        gaps = hub.gaps("[innocent] BEAT", since=start - 1.0)
        assert len(gaps) > 20 and max(gaps) <= 0.35, f"innocent's timer stalled: max gap {max(gaps):.2f} s"
        status, doc = hub.api("GET", "/api/v1/devices/inn1/status")
        assert status == 200 and doc == {"owner": "innocent"}, doc
        assert hub.rss() < 150 << 20, f"supervisor RSS {hub.rss() >> 20} MiB"
        for pid in hub.workers():   # every worker within its allowance (resident anonymous)
            assert hub.anon(pid) < (32 << 20) + (64 << 20), "a worker outgrew its allowance"
        # no forged lines, no raw control characters in what the hub wrote
        for _, line in hub.lines:
            assert "\x1b" not in line and "\x00" not in line
            assert not line.lstrip().startswith(("12:00:00", "FORGED"))
    finally:
        code, took = hub.stop()
    assert took < 10.0
    # the attacker's own datastore is still a JSON object holding what it really saved
    import json
    stored = json.loads((tmp_path / "state" / "drivers" / "attacker" / "datastore.json").read_bytes())
    assert stored.get("attacked") is True


SAVER = """
local driver_helper = require "driver_helper"
local log = require "log"
local dev
local driver = driver_helper.init {{ name = "{name}", lifecycle = {{ init = function(d, device) dev = device end }} }}
driver.datastore.boots = (driver.datastore.boots or 0) + 1
driver.datastore:save()
log.info("BOOT {name} " .. driver.datastore.boots)
local n = 0
driver:call_on_schedule(0.1, function(d)
  n = n + 1
  log.info("BEAT {name} " .. n)
  if dev then dev.status.beat = n end
end, "beat")
return driver
"""


def _pair_config(tmp_path: Path, group: str | None = None, redis: str | None = None) -> Path:
    for name in ("a", "b", "c"):
        write_driver(tmp_path, name, SAVER.format(name=name))
    g = f'group = "{group}"\n' if group else ""
    text = ""
    for name in "abc":
        text += f'[[drivers]]\nid = "{name}"\npath = "{name}"\n{g if name != "c" else ""}'
        text += f'[[drivers.devices]]\nid = "{name}1"\n'
    if redis:
        text += f'[redis]\nurl = "{redis}"\n'
    return write_config(tmp_path / "hub.toml", text)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_killed_worker_comes_back_with_its_saved_state(tmp_path: Path, sig: signal.Signals,
                                                         redis_server) -> None:
    hub = HubProcess(_pair_config(tmp_path, redis=redis_server.url), tmp_path / "state")
    r = redis_server.client()
    try:
        hub.wait_api()
        for name in "abc":
            hub.wait_for(f"BOOT {name} 1")
        time.sleep(0.5)
        victim = next(p for p in hub.workers() if open(f"/proc/{p}/comm").read().strip() == "hh-a")
        t_kill = time.monotonic()
        os.kill(victim, sig)
        # the mirror keeps following the others' status while a's worker is down
        b0 = int(r.hget("status/b1", "beat") or 0)
        time.sleep(0.5)
        assert int(r.hget("status/b1", "beat") or 0) > b0
        assert hub.api("GET", "/api/v1/health")[0] == 200
        back = hub.wait_for("BOOT a 2", timeout=2.0 + 1.0 + 2.0)[0][0]
        assert back - t_kill < 2.0 + 1.0 + 1.0                 # within 2 s plus the 1 s backoff
        hub.wait_for("BEAT a 1", count=2)
        assert any(signal.Signals(sig).name in ln for _, ln in hub.find("[a] driver crashed"))
        # the others never noticed: no restart, no gap in their beats
        assert not hub.find("BOOT b 2") and not hub.find("BOOT c 2")
        for other in "bc":
            gaps = hub.gaps(f"BEAT {other} ", since=t_kill - 0.5)
            assert max(gaps) <= 0.35, f"{other}'s timer gapped {max(gaps):.2f} s"
        assert hub.api("GET", "/api/v1/health")[0] == 200
        status, doc = hub.api("GET", "/api/v1/devices/a1/status")
        assert status == 200 and doc["beat"] >= 1
        a0 = int(r.hget("status/a1", "beat") or 0)
        time.sleep(0.5)
        assert int(r.hget("status/a1", "beat") or 0) > a0   # a is mirrored again
    finally:
        code, took = hub.stop()
    assert code == 0 and took < 10.0


def test_a_group_restarts_together_and_its_neighbour_does_not(tmp_path: Path) -> None:
    hub = HubProcess(_pair_config(tmp_path, group="pair"), tmp_path / "state")
    try:
        hub.wait_api()
        for name in "abc":
            hub.wait_for(f"BOOT {name} 1")
        workers = {open(f"/proc/{p}/comm").read().strip(): p for p in hub.workers()}
        assert set(workers) == {"hh-pair", "hh-c"}, workers     # a and b share one worker
        os.kill(workers["hh-pair"], signal.SIGKILL)
        hub.wait_for("BOOT a 2", timeout=5)
        hub.wait_for("BOOT b 2", timeout=5)
        time.sleep(0.5)
        assert not hub.find("BOOT c 2")
    finally:
        code, took = hub.stop()
    assert code == 0


def test_a_worker_over_its_memory_allowance_is_killed_and_restarted_with_backoff(tmp_path: Path) -> None:
    """The allowance is checked from outside (resident anonymous memory of the worker). With
    a tiny overhead the worker is over it as soon as it runs: it is killed, and comes back
    only after the crash backoff, again and again, while its neighbour runs untouched."""
    write_driver(tmp_path, "a", SAVER.format(name="a"))
    write_driver(tmp_path, "c", SAVER.format(name="c"))
    cfg = write_config(tmp_path / "hub.toml", """
        worker_overhead = "1MiB"
        [[drivers]]
        id = "a"
        path = "a"
        max_memory = "1MiB"
        [[drivers]]
        id = "c"
        path = "c"
        max_memory = "200MiB"
    """)
    hub = HubProcess(cfg, tmp_path / "state")
    try:
        hub.wait_api()
        kills = hub.wait_for("over its allowance of 2 MiB (max_memory + worker_overhead 1 MiB); killing it",
                             timeout=10, count=2)
        assert kills[1][0] - kills[0][0] >= 1.0          # the second kill came after the backoff
        assert all("[driver:a]" in ln for _, ln in kills)
        assert hub.find("[a] driver crashed") and not hub.find("[c] driver crashed")
        gaps = hub.gaps("BEAT c ")
        assert gaps and max(gaps) <= 0.35
    finally:
        code, took = hub.stop()
    assert took < 10.0


# -- found by an outside check: the supervisor's own work must stay bounded ---------------------

SUBSCRIBER = """
local driver_helper = require "driver_helper"
local log = require "log"
local driver = driver_helper.init {{ name = "subscriber" }}
driver:call_with_delay(0.3, function(d)
  local target = d:system("s"):get("Inn", 1)
  local n, err = 0, nil
  for i = 1, {count} do
    local ok, e = pcall(function() target:subscribe("n", function() end) end)
    if not ok then err = e break end
    n = n + 1
  end
  log.info("SUBSCRIBED " .. n .. " " .. tostring(err))
end, "flood")
return driver
"""

INNOCENT_N = """
local driver_helper = require "driver_helper"
local log = require "log"
local dev
local driver = driver_helper.init {
  name = "innocent",
  lifecycle = { init = function(d, device) dev = device end },
}
local n = 0
driver:call_on_schedule(0.1, function(d)
  n = n + 1
  log.info("BEAT " .. n)
  if dev then dev.status.n = n end
end, "beat")
return driver
"""


def test_a_subscription_flood_is_capped_and_shared(tmp_path: Path) -> None:
    """20000 subscriptions to one value: refused past max_subscriptions with a Lua error
    naming it; the ones taken share one subscription in the supervisor, so each change of
    the innocent's status is one message to the subscriber's worker, and nothing stalls."""
    write_driver(tmp_path, "innocent", INNOCENT_N)
    write_driver(tmp_path, "subscriber", SUBSCRIBER.format(count=20000))
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "innocent"
        path = "innocent"
        [[drivers.devices]]
        id = "inn1"
        system = "s"
        module = "Inn"
        index = 1
        [[drivers]]
        id = "subscriber"
        path = "subscriber"
        max_subscriptions = 500
    """)
    hub = HubProcess(cfg, tmp_path / "state")
    try:
        hub.wait_api()
        line = hub.wait_for("SUBSCRIBED", timeout=10)[0][1]
        assert "SUBSCRIBED 500 " in line and "limit of 500 per driver reached (max_subscriptions)" in line
        start = hub.wait_for("BEAT 5")[0][0]
        time.sleep(2.0)
        gaps = hub.gaps("[innocent] BEAT", since=start)
        assert max(gaps) <= 0.35, f"max gap {max(gaps):.2f} s"
        assert hub.rss() < 150 << 20
        assert not hub.find("killing")
    finally:
        code, took = hub.stop()
    assert code == 0 and took < 10.0


def test_a_stalled_supervisor_does_not_kill_healthy_workers(tmp_path: Path) -> None:
    """SIGSTOP the supervisor for longer than the heartbeat timeout: when it runs again its
    workers' heartbeats are waiting in their sockets; nobody is killed."""
    hub = HubProcess(_pair_config(tmp_path), tmp_path / "state")
    try:
        hub.wait_api()
        for name in "abc":
            hub.wait_for(f"BOOT {name} 1")
        os.kill(hub.proc.pid, signal.SIGSTOP)
        time.sleep(6.0)
        os.kill(hub.proc.pid, signal.SIGCONT)
        time.sleep(2.0)
        assert not hub.find("killing"), [ln for _, ln in hub.find("killing")]
        assert not hub.find("BOOT a 2") and not hub.find("driver crashed")
        assert hub.api("GET", "/api/v1/health")[0] == 200
    finally:
        code, took = hub.stop()
    assert code == 0


def test_workers_outlive_their_zygote(tmp_path: Path) -> None:
    """Killing the zygote takes no driver down; the next worker that must start gets a new
    zygote."""
    hub = HubProcess(_pair_config(tmp_path), tmp_path / "state")
    try:
        hub.wait_api()
        for name in "abc":
            hub.wait_for(f"BOOT {name} 1")
        zygote = next(p for p in hub.tree() if open(f"/proc/{p}/comm").read().strip() == "hh-zygote")
        workers = {open(f"/proc/{p}/comm").read().strip(): p for p in hub.workers()}
        t_kill = time.monotonic()
        os.kill(zygote, signal.SIGKILL)
        time.sleep(1.5)
        for name in "abc":
            gaps = hub.gaps(f"BEAT {name} ", since=t_kill - 0.5)
            assert gaps and max(gaps) <= 0.35, f"{name}: {max(gaps):.2f} s"
        assert not hub.find("driver crashed")
        # a worker that dies now (no longer under the zygote) is restarted from a new zygote
        os.kill(workers["hh-a"], signal.SIGKILL)
        hub.wait_for("BOOT a 2", timeout=8)
    finally:
        code, took = hub.stop()
    assert code == 0 and took < 10.0


ENCODE_ABORT = """
local driver_helper = require "driver_helper"
return driver_helper.init {
  name = "big",
  functions = { huge = { handler = function() return ("R"):rep(12 * 1024 * 1024) end } },
}
"""


def test_an_exec_whose_result_is_refused_after_the_handler_returned_answers_at_once(tmp_path: Path) -> None:
    write_driver(tmp_path, "big", ENCODE_ABORT)
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "big"
        path = "big"
        max_memory = "32MiB"
        [[drivers.devices]]
        id = "b1"
    """)
    hub = HubProcess(cfg, tmp_path / "state")
    try:
        hub.wait_api()
        hub.wait_for("[big] running")
        t0 = time.monotonic()
        status, doc = hub.api("POST", "/api/v1/exec", {"device": "b1", "function": "huge"}, timeout=15)
        took = time.monotonic() - t0
        assert status == 502 and doc["error"]["code"] == "driver_error", doc
        assert took < 3.0, f"the caller waited {took:.1f} s"
    finally:
        hub.stop()
