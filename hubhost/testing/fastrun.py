"""`hubhost test` without pytest's start-up, for the everyday case.

pytest costs about a second before the first spec runs (its own import, plugin entry
points, hypothesis, ...), while a driver folder's specs run in a fraction of that. When
`hubhost test` gets nothing but paths (plus `-q` or `-v`) and pytest would find nothing
of its own there (no Python tests, no conftest.py, no pytest or project config in the
folders or above them), this module runs the spec files itself and reports like pytest:
the same items, node ids, outcomes (pass, fail, skip for pending, errors at setup and
teardown), the same failure texts, the same counts and exit status. Anything else goes
to pytest. `HUBHOST_TEST_FAST=0` sends everything to pytest.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

# pytest's own defaults: what it would not recurse into, and the files that mean pytest
# configuration, Python tests or plugins (any of them: let pytest do it)
_NORECURSE = ("*.egg", ".*", "_darcs", "build", "CVS", "dist", "node_modules", "venv", "{arch}")
_CONFIG_FILES = ("pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg", "setup.py",
                 "conftest.py")
_OPTIONS = {"-q": -1, "--quiet": -1, "-v": 1, "--verbose": 1}

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_TESTS = 0, 1, 2, 5


def _python_test(name: str) -> bool:
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def _skip_dir(d: Path) -> bool:
    return any(fnmatch.fnmatch(d.name, p) for p in _NORECURSE) or (d / "pyvenv.cfg").exists()


def _walk(folder: Path, out: list[Path]) -> bool:
    """Spec files under folder in pytest's order (entries sorted by name, depth first);
    False when the folder holds something only pytest should handle."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return False
    for e in entries:
        if e.is_dir(follow_symlinks=True):
            sub = Path(e.path)
            if _skip_dir(sub):
                continue
            if not _walk(sub, out):
                return False
        elif e.name in _CONFIG_FILES or _python_test(e.name):
            return False
        elif e.name.endswith("_spec.lua"):
            out.append(Path(e.path))
    return True


@dataclass
class Plan:
    """What the fast path will run: spec files in order, the rootdir and verbosity."""

    files: list[Path]
    rootdir: Path
    verbosity: int = 0


def plan(argv: Sequence[str]) -> Plan | None:
    """A plan when the fast path gives exactly what pytest would, else None."""
    if os.environ.get("HUBHOST_TEST_FAST", "1") == "0" or os.environ.get("PYTEST_ADDOPTS"):
        return None
    verbosity = 0
    targets: list[Path] = []
    for a in argv:
        if a in _OPTIONS:
            verbosity += _OPTIONS[a]
            continue
        if a.startswith("-") or "::" in a:
            return None
        p = Path(a)
        if not p.exists():
            return None   # pytest words the error
        targets.append(p.resolve())
    if verbosity >= 2:
        return None   # -v -v: pytest's longer reports are pytest's to print
    if not targets:
        targets = [Path.cwd().resolve()]
    anchors = [t if t.is_dir() else t.parent for t in targets]
    # pytest's rootdir without a config file: the common ancestor of the arguments and
    # the invocation folder; any config file from the arguments upwards would change that
    rootdir = Path(os.path.commonpath([str(Path.cwd().resolve()), *(str(a) for a in anchors)]))
    for anchor in anchors:
        for d in (anchor, *anchor.parents):
            if any((d / name).exists() for name in _CONFIG_FILES if name != "conftest.py"):
                return None
    # conftest.py files between the rootdir and each target are loaded by pytest too
    for a in anchors:
        for d in (a, *a.parents):
            if (d / "conftest.py").exists():
                return None
            if d == rootdir:
                break
    files: list[Path] = []
    seen: set[Path] = set()
    for t in targets:
        found: list[Path] = []
        if t.is_dir():
            if not _walk(t, found):
                return None
        elif t.name.endswith("_spec.lua"):
            found.append(t)
        else:
            return None
        for f in found:
            if f not in seen:
                seen.add(f)
                files.append(f)
    return Plan(files, rootdir, verbosity)


@dataclass
class _Item:
    nodeid: str
    domain: str
    outcome: str = "passed"          # passed / failed / skipped
    setup_error: str | None = None
    teardown_error: str | None = None
    text: str | None = None          # failure text, or the skip reason
    where: str = ""
    output: str = ""


def _counts(items: list[_Item]) -> dict[str, int]:
    c = {"failed": 0, "passed": 0, "skipped": 0, "error": 0}
    for it in items:
        if it.setup_error is not None:
            c["error"] += 1
        else:
            c[it.outcome] += 1
        if it.teardown_error is not None:
            c["error"] += 1
    return c


def _summary_words(c: dict[str, int]) -> str:
    parts = [f"{c[k]} {k}" for k in ("failed", "passed", "skipped") if c[k]]
    if c["error"]:
        parts.append(f"{c['error']} error" + ("s" if c["error"] != 1 else ""))
    return ", ".join(parts) or "no tests ran"


def _sep(ch: str, title: str, width: int) -> str:
    if not title:
        return ch * width
    n = max((width - len(title) - 2) // 2, 1)
    line = f"{ch * n} {title} {ch * n}"
    if len(line) + 1 <= width:
        line += ch * (width - len(line))
    return line


def _running_on_ci() -> bool:
    """pytest's own test: on CI it prints summary messages whole (all their lines)."""
    return any(os.environ.get(var) for var in ("CI", "BUILD_NUMBER"))


def _short(word: str, nodeid: str, text: str | None, width: int, whole: bool) -> str:
    """pytest's short-summary line: the message whole on CI or at -vv, else its first
    line trimmed to the terminal width (and left out when not even "..." fits)."""
    line = f"{word} {nodeid}"
    if not text:
        return line
    if whole:
        return f"{line} - {text}"
    msg = text.split("\n", 1)[0]
    room = width - len(line) - 3
    if room < 3:
        return line
    if len(msg) > room:
        msg = msg[: room - 3] + "..."
    return f"{line} - {msg}"


def run(p: Plan, out: TextIO = sys.stdout) -> int:
    """Run the plan's spec files and report as pytest does; returns pytest's exit status."""
    from hubhost.testing import render as pp   # the same texts as the plugin
    from hubhost.testing import specrun

    start = time.perf_counter()
    width = shutil.get_terminal_size((80, 24)).columns
    if out is not sys.stdout or not out.isatty():
        width = int(os.environ.get("COLUMNS", "80") or 80)
    cwd = Path.cwd().resolve()

    def rel(path: Path) -> str:
        try:
            return path.relative_to(p.rootdir).as_posix()
        except ValueError:
            return path.as_posix()

    if p.verbosity >= 0:
        out.write(_sep("=", "test session starts", width) + "\n")
        out.write(f"rootdir: {p.rootdir}\n")
    runs = []
    total = 0
    for f in p.files:
        fr = specrun.run_file(f, None, specrun.DEFAULT_TIME_LIMIT)
        runs.append(fr)
        total += 1 if fr.load_error is not None else len(fr.tests)
    if p.verbosity >= 0:
        out.write(f"collected {total} item{'s' if total != 1 else ''}\n\n")
    items: list[_Item] = []
    done = written = 0
    for fr in runs:
        spec_file = specrun.display_name(fr.path)
        path_text = rel(fr.path)
        shown = os.path.relpath(fr.path, cwd) if p.verbosity < 1 else path_text
        tests = [(fr.file_item, specrun.SpecTest(fr.file_item, fr.file_item, (), fr.load_error.line or 0))] \
            if fr.load_error is not None else [(t.id, t) for t in fr.tests]
        results = {fr.file_item: fr.load_error} if fr.load_error is not None else fr.results
        line = shown + " " if p.verbosity == 0 else ""
        for tid, t in tests:
            r = results[tid]
            nodeid = f"{path_text}::{pp.item_name(tid)}"
            where = f"{fr.path.name}:{t.line}"
            it = _Item(nodeid=nodeid, domain=pp.head_line(tid), where=f"{path_text}:{t.line}", output=r.output)
            if r.setup is not None:
                it.setup_error = pp.render_hook(r.setup, where, spec_file)
            elif r.status == "pending":
                it.outcome = "skipped"
                it.text = f"pending: {r.message}" if r.message else "pending"
            elif r.status in ("failure", "error"):
                it.outcome = "failed"
                it.text = pp.render(r, where, spec_file)
            if r.teardown is not None:
                it.teardown_error = pp.render_hook(r.teardown, where, spec_file)
            items.append(it)
            done += 1
            chars = "E" if it.setup_error else {"passed": ".", "failed": "F", "skipped": "s"}[it.outcome]
            words = "ERROR" if it.setup_error else it.outcome.upper()
            if it.teardown_error:
                chars += "E"
            pct = f"[{done * 100 // total:3d}%]"
            if p.verbosity >= 1:
                if it.outcome == "skipped" and not it.setup_error:
                    words += f" ({it.text})"
                for w in ([words] + (["ERROR"] if it.teardown_error else [])):
                    left = f"{nodeid} {w}"
                    out.write(left + " " * max(width - 1 - len(left) - len(pct), 1) + pct + "\n")
            else:
                line += chars
        if p.verbosity == 0 and tests:
            pct = f"[{done * 100 // total:3d}%]"
            out.write(line + " " * max(width - 1 - len(line) - len(pct), 1) + pct + "\n")
        elif p.verbosity < 0 and tests:
            out.write(line)
            written += len(line)
    if p.verbosity < 0 and total:
        pct = f"[{done * 100 // total:3d}%]"
        out.write(" " * max(width - 1 - written % width - len(pct), 1) + pct + "\n")
    errors = [(i, "setup", i.setup_error) for i in items if i.setup_error] + \
             [(i, "teardown", i.teardown_error) for i in items if i.teardown_error]
    if errors:
        out.write(("\n" if p.verbosity >= 0 else "") + _sep("=", "ERRORS", width) + "\n")
        for it, when, text in sorted(errors, key=lambda e: items.index(e[0])):
            out.write(_sep("_", f"ERROR at {when} of {it.domain}", width) + "\n")
            out.write(f"{text}\n")
            if it.output:
                out.write(_sep("-", f"Captured stdout {'setup' if when == 'setup' else 'call'}", width)
                          + "\n" + it.output)
    failures = [i for i in items if i.outcome == "failed" and not i.setup_error]
    if failures:
        out.write(("\n" if not errors and p.verbosity >= 0 else "") + _sep("=", "FAILURES", width) + "\n")
        for it in failures:
            out.write(_sep("_", it.domain, width) + "\n")
            out.write(f"{it.text}\n")
            if it.output:
                out.write(_sep("-", "Captured stdout call", width) + "\n" + it.output)
    if failures or errors:
        out.write(_sep("=", "short test summary info", width) + "\n")
        whole = _running_on_ci()
        for it in failures:
            out.write(_short("FAILED", it.nodeid, it.text, width, whole) + "\n")
        for it, _, text in errors:
            out.write(_short("ERROR", it.nodeid, text, width, whole) + "\n")
    c = _counts(items)
    if not (failures or errors) and p.verbosity >= 0 and total:
        out.write("\n")
    elapsed = time.perf_counter() - start
    summary = f"{_summary_words(c)} in {elapsed:.2f}s"
    if p.verbosity < 0:
        out.write(summary + "\n")
    else:
        out.write(_sep("=", summary, width) + "\n")
    if total == 0:
        return EXIT_NO_TESTS
    return EXIT_FAILED if c["failed"] or c["error"] else EXIT_OK
