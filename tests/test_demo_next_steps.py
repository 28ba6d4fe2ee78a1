"""The demo prints its next steps at start (issue 13), and the commands it prints work
against it from another process as printed."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_demo_prints_next_steps_that_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "HUBHOST_CONFIG", "NOTIFY_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "hubhost", "run", "--demo", "--state-dir", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C here stops the hub") or time.monotonic() > deadline:
                break
        text = "\n".join(lines)
        assert "Next steps, from another terminal:" in text, text
        commands = [ln.split("#")[0].strip() for ln in lines if ln.strip().startswith("hubhost ")]
        kinds = {c.split()[1] for c in commands}
        assert {"ls", "watch", "exec"} <= kinds, commands
        for cmd in commands:
            argv = shlex.split(cmd)[1:]
            if argv[0] == "watch":
                argv += ["--count", "1"]
            if argv[0] == "logs":
                argv.remove("-f")
            out = subprocess.run([sys.executable, "-m", "hubhost", *argv], capture_output=True, text=True,
                                 env=env, timeout=30)
            assert out.returncode == 0, (cmd, out.stderr)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
