"""The shipped systemd unit and sample config: valid, hardened, and what operators expect.

`systemd-analyze` is the judge where it exists. Without it the tests skip, except
in CI (CI=true), where a missing systemd-analyze is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "hubhost.service"
SAMPLE_CONFIG = ROOT / "systemd" / "hub.toml"
MAX_EXPOSURE = 3.0


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
    )
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("systemd-analyze is required in CI (install the systemd package)")
    pytest.skip("systemd-analyze not installed: cannot verify the unit here")


def _directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every non-comment line of a unit file."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _values(key: str) -> list[str]:
    return [v for _, k, v in _directives(UNIT.read_text()) if k == key]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert match, f"cannot read a time span from {value!r}"
    factor = {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * factor


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists on this machine.

    `systemd-analyze verify` fails when the ExecStart binary is missing, and
    /usr/local/bin/hubhost is not installed on test machines. Only the binary path
    of ExecStart is rewritten (to /bin/true); every other line stays as shipped.
    """
    text = UNIT.read_text()
    rewritten, count = re.subn(
        r"^ExecStart=/usr/local/bin/hubhost ", "ExecStart=/bin/true ", text, flags=re.M
    )
    assert count == 1, "expected exactly one ExecStart=/usr/local/bin/hubhost line"
    copy = tmp_path / "hubhost.service"
    copy.write_text(rewritten)
    return copy


def test_systemd_analyze_verify_is_clean(verifiable_unit: Path) -> None:
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "verify", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=verifiable_unit.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze verify warned:\n{result.stderr}"


def test_security_exposure_is_low(
    verifiable_unit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tool = _systemd_analyze()
    # --offline=yes reads the unit file itself (no running systemd needed); giving a
    # path instead of a unit name is enough, no --root or unit search path required.
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=verifiable_unit.parent,
    )
    match = re.search(r"Overall exposure level for hubhost\.service:\s*([\d.]+)", result.stdout)
    assert match, f"no exposure score in output:\n{result.stdout}\n{result.stderr}"
    score = float(match.group(1))
    with capsys.disabled():  # shown in the test output without pytest -s
        print(f"\nsystemd-analyze security --offline=yes: hubhost.service exposure {score}")
    assert score < MAX_EXPOSURE, result.stdout


def test_unit_has_the_operational_contract() -> None:
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "StateDirectory": "hubhost",
        "ConfigurationDirectory": "hubhost",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ExecStart": "/usr/local/bin/hubhost run --config /etc/hubhost/hub.toml",
        "SupplementaryGroups": "dialout",
        "DevicePolicy": "closed",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "UMask": "0027",
        "CapabilityBoundingSet": "",
    }
    for key, value in expect.items():
        assert _values(key) == [value], f"{key}= should be exactly {value!r}"
    assert _seconds(_values("WatchdogSec")[0]) > 0
    # The host exits within 10 s of SIGTERM (shutdown flush bound): give it more.
    assert _seconds(_values("TimeoutStopSec")[0]) > 10
    allowed = _values("DeviceAllow")
    assert "char-ttyUSB rw" in allowed and "char-ttyACM rw" in allowed


def test_unit_leaves_out_directives_that_break_the_host() -> None:
    text = UNIT.read_text()
    keys = {k for _, k, _ in _directives(text)}
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers", "PrivateNetwork"):
        assert key not in keys, f"{key}= breaks the host (see the comment in the unit)"
        assert re.search(rf"^#\s*{key}=yes\s+-\s+\S", text, re.M), (
            f"the unit should say in a comment why {key}= is left out"
        )


def test_sample_config_parses_and_covers_every_section() -> None:
    config = tomllib.loads(SAMPLE_CONFIG.read_text())
    assert isinstance(config["hub_id"], str) and config["hub_id"]
    assert config["flush_interval"] == 10
    assert config["log_level"] in {"trace", "debug", "info", "warn", "error"}
    assert "state_dir" not in config, "the service should use $STATE_DIRECTORY"
    assert config["redis"]["url"].startswith("redis://")
    assert "prefix" in config["redis"]
    (driver,) = config["drivers"]
    assert {"id", "path", "flush_interval", "max_memory", "cpu_limit"} <= driver.keys()
    by_transport = {d["transport"]: d for d in driver["devices"]}
    assert set(by_transport) == {"serial", "tcp"}
    for device in driver["devices"]:
        assert {"id", "label", "system", "module", "index", "config"} <= device.keys()
        assert isinstance(device["config"], dict)
    assert by_transport["serial"]["port"].startswith("/dev/")
    assert isinstance(by_transport["serial"]["baudrate"], int)
    assert isinstance(by_transport["tcp"]["host"], str)
    assert isinstance(by_transport["tcp"]["port"], int)
    # The unit's ExecStart reads the config from its ConfigurationDirectory.
    assert _values("ExecStart")[0].endswith("--config /etc/hubhost/" + SAMPLE_CONFIG.name)
