"""[fleet] in the hub config: what is accepted, what is refused (naming file and key), the
hub id given on the command line, and each hub's local view of the shared config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hubhost import config
from hubhost.fleet import hrw
from hubhost.fleet.node import local_view

ROOT = Path(__file__).resolve().parents[1]
COUNTER = ROOT / "tests" / "drivers_fleet" / "counter"
PROJECTOR = ROOT / "drivers" / "projector"

BASE = f'''
hub_id = "h1"
[redis]
url = "redis://127.0.0.1:1"
[fleet]
id = "site"
ttl = 3
[[fleet.hubs]]
id = "h1"
weight = 2
tags = ["lan-a"]
[[drivers]]
id = "net"
path = "{COUNTER}"
[[drivers.devices]]
id = "d-moves"
transport = "tcp"
host = "127.0.0.1"
port = 1
[[drivers.devices]]
id = "d-pinned"
transport = "tcp"
host = "127.0.0.1"
port = 2
hub = "h2"
[[drivers.devices]]
id = "d-tagged"
transport = "tcp"
host = "127.0.0.1"
port = 3
needs = ["lan-a"]
'''


def test_fleet_config_is_read() -> None:
    cfg = config.parse(__import__("tomllib").loads(BASE))
    fc = cfg.fleet
    assert fc is not None and fc.id == "site" and fc.ttl == 3
    assert fc.hub("h1").weight == 2 and fc.hub("h1").tags == frozenset({"lan-a"})
    assert fc.hub("other").weight == 1 and fc.hub("other").tags == frozenset()   # unlisted
    assert fc.placement["d-pinned"].hub == "h2" and not fc.movable("d-pinned")
    assert fc.movable("d-moves") and fc.placement["d-tagged"].needs == ("lan-a",)


def test_each_hub_runs_its_pinned_devices_and_the_movable_ones_it_holds() -> None:
    cfg = config.parse(__import__("tomllib").loads(BASE))
    h2 = local_view(cfg, "h2", set())
    assert [d.id for d in h2.drivers[0].devices] == ["d-pinned"]
    assert set(h2.drivers[0].elsewhere) == {"d-moves", "d-tagged"}   # away, not removed
    h1 = local_view(cfg, "h1", {"d-moves"})
    assert [d.id for d in h1.drivers[0].devices] == ["d-moves"] and h1.hub_id == "h1"
    assert local_view(cfg, "h3", set()).drivers == []   # nothing of the driver is here
    assert cfg.drivers[0].elsewhere == ()               # the shared config is not touched


def test_tags_decide_who_may_own_a_device() -> None:
    hubs = [hrw.Candidate("h1", 1, frozenset({"lan-a"})), hrw.Candidate("h2", 5)]
    assert all(hrw.winner(f"d{i}", hubs, ("lan-a",)) == "h1" for i in range(50))
    assert hrw.winner("d", hubs, ("lan-b",)) is None
    assert hrw.winner("d", [hrw.Candidate("h1", 0), hrw.Candidate("h2")]) == "h2"   # weight 0: none


@pytest.mark.parametrize("edit, key, words", [
    (lambda t: t.replace('hub = "h2"\n', ""), "", ""),  # sanity: still fine
    (lambda t: t.replace("ttl = 3", "ttl = 0.5"), "fleet.ttl", "at least 1 second"),
    (lambda t: t.replace('[[fleet.hubs]]\nid = "h1"', '[[fleet.hubs]]\nid = "h1"\n[[fleet.hubs]]\nid = "h1"'),
     "fleet.hubs[1].id", "duplicate hub id"),
    (lambda t: t.replace("weight = 2", "weight = -1"), "fleet.hubs[0].weight", "from 0"),
    (lambda t: t.replace('tags = ["lan-a"]', 'tags = "lan-a"'), "fleet.hubs[0].tags", "array"),
    (lambda t: t.replace('needs = ["lan-a"]', 'needs = ["lan-a"]\nhub = "h1"'), "drivers[0].devices[2].needs",
     "pinned"),
    (lambda t: t.replace('[redis]\nurl = "redis://127.0.0.1:1"', ""), "fleet", "needs a [redis]"),
    (lambda t: t.replace("[fleet]", "[fleetx]"), "fleetx", "unknown key"),
    (lambda t: t.replace('[fleet]\nid = "site"', "[fleet]"), "fleet.id", "required"),
])
def test_bad_fleet_config_is_refused_naming_the_key(edit, key: str, words: str) -> None:
    text = edit(BASE)
    if not key:
        config.parse(__import__("tomllib").loads(text))
        return
    with pytest.raises(config.ConfigError) as e:
        config.parse(__import__("tomllib").loads(text), source="hub.toml")
    assert f"hub.toml: {key}" in str(e.value) and words in str(e.value)


def test_pin_or_needs_without_a_fleet_is_refused() -> None:
    text = BASE.replace('[fleet]\nid = "site"\nttl = 3\n', "").replace(
        '[[fleet.hubs]]\nid = "h1"\nweight = 2\ntags = ["lan-a"]\n', "")
    with pytest.raises(config.ConfigError, match=r"devices\[1\]\.hub: only means something in fleet mode"):
        config.parse(__import__("tomllib").loads(text))


def test_a_serial_device_must_be_pinned(tmp_path: Path) -> None:
    text = BASE + f'''
[[drivers]]
id = "serial"
path = "{PROJECTOR}"
[[drivers.devices]]
id = "proj"
transport = "serial"
port = "/dev/ttyUSB0"
'''
    with pytest.raises(config.ConfigError, match=r"drivers\[1\]\.devices\[0\]\.hub: a serial device is wired "
                                                 r"to one hub"):
        config.parse(__import__("tomllib").loads(text))
    config.parse(__import__("tomllib").loads(text + 'hub = "h1"\n'))


def test_hub_id_from_the_command_line_is_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "hub.toml"
    cfg.write_text(BASE)
    out = subprocess.run([sys.executable, "-m", "hubhost", "run", "--config", str(cfg), "--state-dir",
                          str(tmp_path / "s"), "--hub-id", "bad id!"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "--hub-id" in out.stderr and "'bad id!'" in out.stderr


def test_config_hash_names_the_file_content(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text(BASE)
    b = tmp_path / "b.toml"
    b.write_text(BASE + "\n# another hub's edit\n")
    assert config.load(a).fleet.config_hash == config.load(a).fleet.config_hash
    assert config.load(a).fleet.config_hash != config.load(b).fleet.config_hash
