"""GET /metrics (issue 16, item 3): a real hub with workers, scraped over the Unix socket and
the TCP listener and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubhost import config as config_mod
from hubhost.supervisor.supervisor import Supervisor
from hubhost.worker.channel import ProtocolError
from hubutil import run, running_hub, write_config, write_driver

ADMIN_TOKEN = "admin-token-0123456789ab"
SUPPORT_TOKEN = "support-token-0123456789"
METRICS_TOKEN = "metrics-token-0123456789"

TICKER = """
    local driver_helper = require "driver_helper"
    local n = 0
    return driver_helper.init {
      name = "ticker",
      lifecycle = {
        init = function(driver, device)
          device.status.connected = true
          driver:call_on_schedule(0.05, function()
            n = n + 1
            device.status.count = n
            driver.datastore.count = n
          end, "tick " .. device.id)
        end,
      },
      functions = {
        echo = { params = { value = { "JSON", "none" } }, handler = function(d, device, args) return args.value end },
        boom = { handler = function() error("boom") end },
      },
    }
"""

EXPECTED = {
    "hubhost_driver_up": "gauge",
    "hubhost_driver_restarts": "counter",
    "hubhost_handler_seconds": "histogram",
    "hubhost_handler_faults": "counter",
    "hubhost_driver_memory_bytes": "gauge",
    "hubhost_device_connected": "gauge",
    "hubhost_status_changes": "counter",
    "hubhost_mirror_connected": "gauge",
    "hubhost_mirror_pending": "gauge",
    "hubhost_mirror_lag_seconds": "gauge",
    "hubhost_datastore_flush_seconds": "histogram",
    "hubhost_datastore_flush_failures": "counter",
    "hubhost_exec": "counter",
}


def hub_config(tmp_path: Path, devices: int = 2, api: str = "", redis: str = "") -> Path:
    write_driver(tmp_path, "ticker", TICKER)
    devs = "".join(f"""
        [[drivers.devices]]
        id = "d{i}"
        system = "s1"
        module = "Thing"
        index = {i}
    """ for i in range(1, devices + 1))
    return write_config(tmp_path / "hub.toml", f"""
        hub_id = "metrics"
        {redis}
        [api]
        {api}

        [[drivers]]
        id = "ticks"
        path = "ticker"
        flush_interval = 0.2
        {devs}
    """)


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    family = next(f for f in fams.values() if sample.startswith(f.name))
    for s in family.samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample}{labels}")


def unix(sup: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sup.api.socket_path)))


async def scrape(s: aiohttp.ClientSession, base: str = "http://hub", **kw: Any) -> tuple[int, str, str]:
    async with s.get(base + "/metrics", **kw) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def wait_until(pred: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def test_every_metric_present_typed_and_moving(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(hub_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with unix(sup) as s:
                status, ctype, text = await scrape(s)
                assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
                fams = parse(text)
                for name, kind in EXPECTED.items():
                    assert name in fams, f"{name} missing"
                    assert fams[name].type == kind, (name, fams[name].type)
                assert value(fams, "hubhost_driver_up", driver="ticks") == 1
                assert value(fams, "hubhost_device_connected", device="d1") == 1
                first_changes = value(fams, "hubhost_status_changes_total", device="d1")

                async def moved() -> bool:
                    f = parse((await scrape(s))[2])
                    try:
                        ticks = value(f, "hubhost_handler_seconds_count", driver="ticks", kind="timer")
                        flushes = value(f, "hubhost_datastore_flush_seconds_count")
                    except AssertionError:
                        return False
                    return (ticks >= 5 and flushes >= 1 and value(f, "hubhost_driver_memory_bytes", driver="ticks") > 0
                            and value(f, "hubhost_status_changes_total", device="d1") > first_changes)
                await wait_until(moved)

                async with s.post("http://hub/api/v1/exec", data=orjson.dumps(
                        {"device": "d1", "function": "echo", "args": {"value": 7}})) as r:
                    assert r.status == 200
                async with s.post("http://hub/api/v1/exec", data=orjson.dumps(
                        {"device": "d1", "function": "echo", "args": {"nope": 1}})) as r:
                    assert r.status == 400
                async with s.post("http://hub/api/v1/exec", data=orjson.dumps(
                        {"device": "d1", "function": "boom"})) as r:
                    assert r.status == 502

                async def counted() -> bool:
                    f = parse((await scrape(s))[2])
                    try:
                        fn = value(f, "hubhost_handler_seconds_count", driver="ticks", kind="function")
                        fault = value(f, "hubhost_handler_faults_total", driver="ticks", handler="function",
                                      kind="error")
                    except AssertionError:
                        return False
                    return fn >= 2 and fault >= 1
                await wait_until(counted)
                f = parse((await scrape(s))[2])
                assert value(f, "hubhost_exec_total", code="ok") == 1
                assert value(f, "hubhost_exec_total", code="bad_args") == 1
                assert value(f, "hubhost_exec_total", code="driver_error") == 1
                assert value(f, "hubhost_datastore_flush_failures_total") == 0
                # no Redis configured: the mirror families are there, without samples
                assert not f["hubhost_mirror_connected"].samples

    run(main())


def test_counters_survive_a_worker_death(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(hub_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with unix(sup) as s:
                async def ticks() -> float:
                    try:
                        return value(parse((await scrape(s))[2]), "hubhost_handler_seconds_count",
                                     driver="ticks", kind="timer")
                    except AssertionError:
                        return 0.0

                async def some() -> bool:
                    return await ticks() >= 5
                await wait_until(some)
                before = await ticks()
                w = sup.slots["ticks"].worker
                w.kill("test")
                await wait_until(lambda: _running(sup), timeout=10)

                async def more() -> bool:
                    return await ticks() > before + 5
                await wait_until(more, timeout=10)
                f = parse((await scrape(s))[2])
                assert value(f, "hubhost_driver_restarts_total", driver="ticks") >= 1

    run(main())


async def _running(sup: Any) -> bool:
    s = sup.slots["ticks"]
    return s.state == "running" and s.worker is not None and s.worker.incarnation >= 2


def test_label_sets_bounded_with_50_devices(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(hub_config(tmp_path, devices=50), tmp_path / "state") as (sup, cap):
            async with unix(sup) as s:
                await asyncio.sleep(0.5)
                before = parse((await scrape(s))[2])
                for i in range(30):   # distinct values and a bad device: no label per request or value
                    async with s.post("http://hub/api/v1/exec", data=orjson.dumps(
                            {"device": f"d{i % 50 + 1}", "function": "echo", "args": {"value": f"v{i}"}})):
                        pass
                    async with s.post("http://hub/api/v1/exec", data=orjson.dumps(
                            {"device": f"nope{i}", "function": "echo"})):
                        pass
                await asyncio.sleep(1.5)
                after = parse((await scrape(s))[2])
                devices = {f"d{i}" for i in range(1, 51)}
                for name in ("hubhost_device_connected", "hubhost_status_changes"):
                    samples = [x for x in after[name].samples if not x.name.endswith("_created")]
                    assert len(samples) == 50
                    assert {x.labels["device"] for x in samples} == devices
                allowed = devices | {"ticks", "timer", "function", "lifecycle", "receive", "resume",
                                     "subscription", "other", "error", "cpu", "memory", "ok",
                                     "unknown_device", "unknown_function", "forbidden", "bad_args",
                                     "driver_error", "timeout"}
                for fam in after.values():
                    for x in fam.samples:
                        for k, v in x.labels.items():
                            if k != "le":
                                assert v in allowed, (fam.name, k, v)
                exec_codes = {x.labels["code"] for x in after["hubhost_exec"].samples}
                assert exec_codes == {x.labels["code"] for x in before["hubhost_exec"].samples}
                assert value(after, "hubhost_exec_total", code="unknown_device") == 30
                series = sum(len(f.samples) for f in after.values())
                assert series < 400, series

    run(main())


TCP = f"""
        tcp = "127.0.0.1:0"
        metrics_token = "{METRICS_TOKEN}"
        [[api.tokens]]
        token = "{SUPPORT_TOKEN}"
        level = "support"
        [[api.tokens]]
        token = "{ADMIN_TOKEN}"
        level = "administrator"
"""


def test_tcp_needs_the_metrics_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(hub_config(tmp_path, api=TCP), tmp_path / "state") as (sup, cap):
            base = f"http://127.0.0.1:{sup.api.tcp_port}"
            bearer = lambda t: {"headers": {"Authorization": f"Bearer {t}"}}  # noqa: E731
            async with aiohttp.ClientSession() as s:
                status, _, body = await scrape(s, base)
                assert status == 401 and "metrics_token" in body
                assert (await scrape(s, base, **bearer("wrong-token-0123456789")))[0] == 401
                assert (await scrape(s, base, **bearer(SUPPORT_TOKEN)))[0] == 403
                status, _, text = await scrape(s, base, **bearer(METRICS_TOKEN))
                assert status == 200 and "hubhost_driver_up" in parse(text)
                assert (await scrape(s, base, **bearer(ADMIN_TOKEN)))[0] == 200
                # the metrics token reads /metrics and nothing else
                async with s.get(base + "/api/v1/health", **bearer(METRICS_TOKEN)) as r:
                    assert r.status == 403
                async with s.get(base + "/api/v1/health", **bearer(SUPPORT_TOKEN)) as r:
                    assert r.status == 200
            async with unix(sup) as s:   # the socket's administrators may scrape
                assert (await scrape(s))[0] == 200
                assert (await scrape(s, **bearer(SUPPORT_TOKEN)))[0] == 403

    run(main())


def test_open_on_loopback(tmp_path: Path) -> None:
    api = 'tcp = "127.0.0.1:0"\nmetrics = "open"'
    async def main() -> None:
        async with running_hub(hub_config(tmp_path, api=api), tmp_path / "state") as (sup, cap):
            base = f"http://127.0.0.1:{sup.api.tcp_port}"
            async with aiohttp.ClientSession() as s:
                status, _, text = await scrape(s, base)
                assert status == 200 and "hubhost_exec" in parse(text)
                async with s.get(base + "/api/v1/health") as r:
                    assert r.status == 401    # the rest of the API still needs a token

    run(main())


@pytest.mark.parametrize("api, message", [
    ('metrics = "public"', 'api.metrics: must be "token"'),
    ('tcp = "0.0.0.0:9000"\nmetrics = "open"', "needs a loopback api.tcp"),
    ('metrics = "open"', "api.tcp is not set"),
    ('metrics_token = "short"', "at least 16 printable"),
    (f'metrics = "open"\ntcp = "127.0.0.1:0"\nmetrics_token = "{METRICS_TOKEN}"', "api.metrics_token: is set"),
    (f'metrics_token = "{ADMIN_TOKEN}"\n[[api.tokens]]\ntoken = "{ADMIN_TOKEN}"\nlevel = "administrator"',
     "must differ from every"),
    ('tcp = "127.0.0.1:0"', "needs at least one [[api.tokens]]"),
])
def test_config_refuses_bad_metrics_settings(tmp_path: Path, api: str, message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(hub_config(tmp_path, api=api))
    assert message in str(e.value), str(e.value)


def test_metrics_only_tcp_listener_is_accepted(tmp_path: Path) -> None:
    cfg = config_mod.load(hub_config(tmp_path, api=f'tcp = "127.0.0.1:0"\nmetrics_token = "{METRICS_TOKEN}"'))
    assert cfg.api["metrics"] == "token" and cfg.api["metrics_token"] == METRICS_TOKEN


@pytest.mark.parametrize("stats", [
    "not a table",
    {"other-driver": [{}, {}]},
    {"ticks": [{"bogus": [0] * 16 + [0.0]}, {}]},
    {"ticks": [{"timer": [0] * 3 + [0.0]}, {}]},
    {"ticks": [{"timer": [-1] + [0] * 15 + [0.0]}, {}]},
    {"ticks": [{"timer": ["1"] + [0] * 15 + [0.0]}, {}]},
    {"ticks": [{"timer": [0] * 16 + [float("nan")]}, {}]},
    {"ticks": [{}, {"timer": {"segfault": 1}}]},
    {"ticks": [{}, {"timer": {"cpu": 1.5}}]},
])
def test_worker_stats_are_distrusted(tmp_path: Path, stats: Any) -> None:
    sup = Supervisor(config_mod.load(hub_config(tmp_path)), tmp_path / "state")
    w = sup.workers[next(iter(sup.workers))]
    with pytest.raises(ProtocolError):
        w.handle(["mem", {}, stats], b"")
    good = {"ticks": [{"timer": [1] + [0] * 15 + [0.5]}, {"timer": {"cpu": 2}}]}
    w.handle(["mem", {"ticks": 100}, good], b"")
    assert sup.slots["ticks"].handler_stats[1] == {"timer": {"cpu": 2}}


def test_mirror_metrics_with_redis(tmp_path: Path, redis_server: Any) -> None:
    redis = f'[redis]\nurl = "{redis_server.url}"\nprefix = "m:"'
    async def main() -> None:
        async with running_hub(hub_config(tmp_path, redis=redis), tmp_path / "state") as (sup, cap):
            async with unix(sup) as s:
                async def connected() -> bool:
                    f = parse((await scrape(s))[2])
                    return bool(f["hubhost_mirror_connected"].samples) and \
                        value(f, "hubhost_mirror_connected") == 1
                await wait_until(connected)
                f = parse((await scrape(s))[2])
                assert value(f, "hubhost_mirror_pending") >= 0
                assert value(f, "hubhost_mirror_lag_seconds") >= 0

    run(main())


def test_real_hub_process_serves_metrics(tmp_path: Path) -> None:
    """`hubhost run` as a subprocess (its own zygote and workers): the worker's handler
    numbers reach the supervisor's /metrics."""
    from hubproc import HubProcess, _UnixHTTP

    import time

    hub = HubProcess(hub_config(tmp_path), tmp_path / "state")
    try:
        hub.wait_api()

        def timer_count() -> float:
            conn = _UnixHTTP(str(tmp_path / "state" / "hubhost.sock"), 5.0)
            try:
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                assert r.status == 200
                fams = parse(r.read().decode())
            finally:
                conn.close()
            try:
                return value(fams, "hubhost_handler_seconds_count", driver="ticks", kind="timer")
            except AssertionError:
                return 0.0

        deadline = time.monotonic() + 10
        while timer_count() < 5:
            assert time.monotonic() < deadline, "no timer handlers counted"
            time.sleep(0.2)
        assert hub.stop()[0] == 0
    finally:
        hub.kill()
