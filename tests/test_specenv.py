"""Specs run as busted runs them (issue 14): the spec environment, busted's execution
model, a broken file among good ones, nested spec folders, libraries without init.lua,
and the fast path of `hubhost test` giving what pytest gives.

Each test states busted's behaviour in its own words and checks it through real runs:
pytester for plain pytest, a subprocess for `hubhost test`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def write(root: Path, name: str, source: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip("\n"))
    return path


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:hypothesispytest", *args)


def hubhost_test(cwd: Path, *args: str, fast: bool = True,
                 ci: bool | None = None) -> subprocess.CompletedProcess[str]:
    """`hubhost test` as a user runs it; ci=True/False sets or clears pytest's CI markers
    (CI, BUILD_NUMBER), which change how pytest prints its short summary."""
    env = dict(os.environ, COLUMNS="80")
    env.pop("PYTEST_ADDOPTS", None)
    if ci is not None:
        env.pop("CI", None)
        env.pop("BUILD_NUMBER", None)
        if ci:
            env["CI"] = "true"
    if not fast:
        env["HUBHOST_TEST_FAST"] = "0"
    return subprocess.run([sys.executable, "-m", "hubhost", "test", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def events(result: pytest.RunResult) -> list[str]:
    return [line.split("EV ", 1)[1] for line in result.outlines if "EV " in line]


# -- busted's execution model -----------------------------------------------------------

def test_describe_bodies_run_in_execution_order(pytester: pytest.Pytester) -> None:
    """busted runs the file body first (it only registers blocks), then each describe body
    when its turn comes: after the tests before it, and their before_each, have run. So a
    describe body sees what an earlier sibling's hooks set (the issue's example)."""
    write(pytester.path, "order_spec.lua", """
        local function log(s) print("EV " .. s) end
        local x
        before_each(function() x = 1; log("before_each") end)
        it("a", function() log("it a") end)
        describe("b", function()
          log("body b")
          local y = x + 1
          it("sees what the earlier hooks set", function() assert.are.equal(2, y) end)
        end)
        log("file body done")
    """)
    result = run(pytester, "-s")
    result.assert_outcomes(passed=2)
    assert events(result) == ["file body done", "before_each", "it a", "body b", "before_each"]


def test_setup_teardown_lazy_and_strict_as_busted_defines_them(pytester: pytest.Pytester) -> None:
    """setup/teardown are strict_setup/strict_teardown: once per block, around all of its
    children, even when the block holds no test; lazy_setup runs before the block's first
    test only, so a block without tests never runs it, and lazy_teardown only runs when
    lazy_setup did."""
    write(pytester.path, "setups_spec.lua", """
        local function log(s) print("EV " .. s) end
        describe("empty", function()
          setup(function() log("strict setup of empty") end)
          lazy_setup(function() log("lazy setup of empty") end)
          lazy_teardown(function() log("lazy teardown of empty") end)
          teardown(function() log("strict teardown of empty") end)
          describe("inner", function() end)
        end)
        describe("full", function()
          lazy_setup(function() log("lazy setup of full") end)
          it("one", function() log("one") end)
          it("two", function() log("two") end)
          lazy_teardown(function() log("lazy teardown of full") end)
        end)
    """)
    result = run(pytester, "-s")
    result.assert_outcomes(passed=2)
    assert events(result) == [
        "strict setup of empty", "strict teardown of empty",
        "lazy setup of full", "one", "two", "lazy teardown of full",
    ]


def test_stored_assertions_fail_under_the_plugin(pytester: pytest.Pytester) -> None:
    """luassert runs a stored chain whole at each call: each second call here must fail."""
    write(pytester.path, "stored_spec.lua", """
        it("equal", function() local eq = assert.are.equal; eq(1, 1); eq(1, 2) end)
        it("is_true", function() local t = assert.is_true; t(true); t(false) end)
        it("called_with", function()
          local s = spy.new(function() end); s(1)
          local c = assert.spy(s).was.called_with; c(1); c(2)
        end)
    """)
    result = run(pytester)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "stored_spec.lua:1: Expected objects to be equal.",
        "stored_spec.lua:2: Expected objects to be the same.",
        "stored_spec.lua:5: Function was never called with matching arguments.",
    ])


# -- a broken file among good ones ------------------------------------------------------

BROKEN_SUITE = {
    "spec/a_good_spec.lua": 'describe("a", function() it("passes", function() end) end)',
    "spec/b_broken_spec.lua": 'local helper = require "no_such_helper"\nit("never", function() end)',
    "spec/c_syntax_spec.lua": 'it("x", function()\n',
    "spec/d_good_spec.lua": 'it("one", function() end)\nit("two", function() assert.is_true(false) end)',
}


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "pytest"])
def test_a_broken_file_is_one_failure_and_the_rest_run(tmp_path: Path, fast: bool) -> None:
    """busted reports a file that cannot load as one error and runs every other file."""
    for name, src in BROKEN_SUITE.items():
        write(tmp_path, name, src)
    (tmp_path / "init.lua").write_text("return {}\n")
    proc = hubhost_test(tmp_path, "-v", fast=fast)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("spec/a_good_spec.lua::a > passes PASSED",
                 "spec/b_broken_spec.lua::b_broken_spec.lua FAILED",
                 "spec/c_syntax_spec.lua::c_syntax_spec.lua FAILED",
                 "spec/d_good_spec.lua::one PASSED",
                 "spec/d_good_spec.lua::two FAILED"):
        assert line in out, out
    assert "spec/b_broken_spec.lua:1: module 'no_such_helper' not found" in out
    assert re.search(r"spec/c_syntax_spec\.lua:2: .*near '<eof>'", out), out
    assert re.search(r"= 3 failed, 2 passed in [\d.]+s =", out), out
    assert "collection" not in out


def test_plain_pytest_reports_a_broken_file_as_one_failure(pytester: pytest.Pytester) -> None:
    for name, src in BROKEN_SUITE.items():
        write(pytester.path, name, src)
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=3)
    assert result.ret == 1


# -- the spec environment ---------------------------------------------------------------

def test_the_spec_environment(pytester: pytest.Pytester) -> None:
    """Specs get busted's globals (package, loadfile/dofile, io, arg, collectgarbage,
    debug.getmetatable/traceback) confined to the driver folder; the driver's own code
    keeps the hub's sandbox and sees none of them."""
    root = pytester.path
    write(root, "outside/evil.lua", "return 'escaped'")
    write(root, "drv/init.lua", """
        local sees = {}
        for _, name in ipairs({ "io", "package", "loadfile", "dofile", "arg" }) do
          if _G[name] ~= nil then sees[#sees + 1] = name end
        end
        if debug.getmetatable ~= nil then sees[#sees + 1] = "debug.getmetatable" end
        if pcall(collectgarbage, "stop") then sees[#sees + 1] = "collectgarbage('stop')" end
        return { sees = sees, req = function(name) return require(name) end }
    """)
    write(root, "drv/vendor/extra.lua", "return { extra = true }")
    write(root, "drv/spec/fixtures/data.lua", "return { answer = 42, env_has_describe = describe ~= nil }")
    write(root, "drv/spec/helper.lua", """
        package.preload["from.helper"] = function() return "preloaded by a helper" end
        return { sees_package = package ~= nil, sees_describe = describe ~= nil, sees_io = io ~= nil }
    """)
    write(root, "drv/spec/env_spec.lua", """
        local driver = require "init"
        describe("specs see", function()
          it("package.loaded: the runtime's modules", function()
            assert.are.equal(driver, package.loaded["init"])
            assert.are.equal(assert, package.loaded["luassert"])
            assert.is_string(package.path)
            assert.is_string(package.cpath)
          end)
          it("a helper in the spec folder is test code too", function()
            assert.are.same({ sees_package = true, sees_describe = true, sees_io = true },
                            require "spec.helper")
            assert.are.equal("preloaded by a helper", require "from.helper")
          end)
          it("package.preload, honoured by require here and in driver code", function()
            package.preload["fake.serial"] = function(name) return { name = name } end
            assert.are.equal("fake.serial", require("fake.serial").name)
            assert.are.equal(require("fake.serial"), driver.req("fake.serial"))
          end)
          it("package.path edits inside the driver folder, and not outside it", function()
            package.path = "./vendor/?.lua;../outside/?.lua;/usr/share/lua/5.1/?.lua;" .. package.path
            assert.is_true(require("extra").extra)
            local ok, err = pcall(require, "evil")
            assert.is_false(ok)
            assert.matches("module 'evil' not found", err, 1, true)
          end)
          it("loadfile and dofile inside the driver folder, with the spec's globals", function()
            local chunk = assert(loadfile("spec/fixtures/data.lua"))
            assert.are.same({ answer = 42, env_has_describe = true }, chunk())
            assert.are.equal(42, dofile("spec/fixtures/data.lua").answer)
            local none, err = loadfile("../outside/evil.lua")
            assert.is_nil(none)
            assert.matches("outside the driver folder", err, 1, true)
            assert.has_error(function() dofile("../outside/evil.lua") end)
          end)
          it("io.open read-only inside the driver folder", function()
            local f = assert(io.open("spec/fixtures/data.lua"))
            assert.are.equal("return { answer = 42, env_has_describe = describe ~= nil }", f:read("*l"))
            assert.is_nil(f:read("*l"))
            f:close()
            assert.are.equal("closed file", io.type(f))
            assert.are.equal("userdata", type(io.stdout))
            local w, werr = io.open("spec/fixtures/new.txt", "w")
            assert.is_nil(w)
            assert.matches("read-only", werr, 1, true)
            local o, oerr = io.open("../outside/evil.lua")
            assert.is_nil(o)
            assert.matches("outside the driver folder", oerr, 1, true)
            local n = 0
            for _ in io.lines("init.lua") do n = n + 1 end
            assert.is_true(n > 3)
          end)
          it("io.write, io.stdout and io.stderr in the test's captured output", function()
            io.write("written ", 1, "\\n")
            io.stdout:write("to stdout\\n"):write("chained\\n")
            io.stderr:write("to stderr\\n")
            print("printed")
          end)
          it("arg, as busted leaves it", function()
            assert.are.equal("busted", arg[0])
          end)
          it("collectgarbage with every option", function()
            assert.is_number(collectgarbage("count"))
            assert.are.equal(0, collectgarbage())
            assert.are.equal(0, collectgarbage("collect"))
            collectgarbage("stop")
            collectgarbage("restart")
            assert.is_boolean(collectgarbage("step"))
            assert.is_number(collectgarbage("setpause", 200))
            assert.is_number(collectgarbage("setstepmul", 200))
          end)
          it("debug.getmetatable and debug.traceback", function()
            assert.is_function(debug.getmetatable("").__index.format)
            assert.matches("^why\\nstack traceback:", debug.traceback("why"))
            assert.are.equal(package, _G.package)
          end)
        end)
        describe("driver code sees the hub's sandbox", function()
          it("without the spec's globals", function()
            assert.are.same({}, driver.sees)
          end)
          it("and its require still refuses io", function()
            assert.has_error(function() driver.req("io") end, "module 'io' is not available in the sandbox")
          end)
        end)
    """)
    result = run(pytester, "drv", "-rA")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines([
        "*_ specs see > io.write, io.stdout and io.stderr in the test's captured output *_",
        "*Captured stdout call*",
        "written 1", "to stdout", "chained", "to stderr", "printed",
    ])


# -- where modules come from ------------------------------------------------------------

def test_nested_spec_folders_resolve_from_the_driver_root(tmp_path: Path) -> None:
    """A spec in spec/features/ requires the driver's modules as one in spec/ does: the
    driver root is the folder with init.lua (or, for a library, the folder above spec/)."""
    write(tmp_path, "drv/init.lua", 'return { name = "drv" }')
    write(tmp_path, "drv/helpers/math.lua", "return { double = function(x) return 2 * x end }")
    write(tmp_path, "drv/spec/features/deep/deep_spec.lua", """
        it("finds the driver's modules", function()
          assert.are.equal("drv", require("init").name)
          assert.are.equal(6, require("helpers.math").double(3))
        end)
    """)
    write(tmp_path, "lib/spec/features/lib_spec.lua", """
        it("finds the library's modules", function() assert.are.equal(3, require("mylib").three) end)
    """)
    write(tmp_path, "lib/mylib.lua", "return { three = 3 }")
    proc = hubhost_test(tmp_path, "drv", "lib")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"= 2 passed in", proc.stdout), proc.stdout


def test_a_library_folder_without_init_lua(tmp_path: Path) -> None:
    """`hubhost test LIB` runs a library's suite: its modules from the folder above spec/,
    from src/ as busted's default lpath has it (./src/?.lua, ./src/?/init.lua), or from
    the lpath of the project's .busted file, which busted puts in front."""
    write(tmp_path, "lib/src/strs/init.lua", "return { up = string.upper }")
    write(tmp_path, "lib/plain.lua", "return { value = 1 }")
    write(tmp_path, "lib/lua/deep/mod.lua", "return { deep = true }")
    write(tmp_path, "lib/.busted", 'return { default = { lpath = "./lua/?.lua;./lua/?/init.lua" } }')
    write(tmp_path, "lib/spec/lib_spec.lua", """
        describe("the library", function()
          it("from src/", function() assert.are.equal("AB", require("strs").up("ab")) end)
          it("from the root", function() assert.are.equal(1, require("plain").value) end)
          it("from .busted's lpath", function()
            assert.is_true(require("deep.mod").deep)
            assert.are.equal("./lua/?.lua;./lua/?/init.lua;./src/?.lua",
                             package.path:sub(1, #"./lua/?.lua;./lua/?/init.lua;./src/?.lua"))
          end)
        end)
    """)
    proc = hubhost_test(tmp_path, "lib")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"= 3 passed in", proc.stdout), proc.stdout


# -- the fast path of `hubhost test` ----------------------------------------------------

FAST_SUITE = {
    "init.lua": "return {}",
    "spec/a_spec.lua": """
        describe("group", function()
          it("passes", function() end)
          it("fails", function() assert.are.equal(1, 2) end)
          it("errors", function() local t = nil; return t.x end)
          pending("later")
          it("calls pending", function() pending("hardware") end)
        end)
        describe("hooks", function()
          before_each(function() error("no database") end)
          it("never runs", function() end)
        end)
        describe("teardown", function()
          after_each(function() error("dirty") end)
          it("passes itself", function() print("said something") end)
        end)
        it("name with a dot 1.5", function() end)
    """,
    "spec/b_spec.lua": "error('broken at load')",
    "spec/sub/c_spec.lua": 'it("deep", function() end)',
}


def _outcome_lines(text: str) -> list[str]:
    keep = re.compile(r"^(?P<body>\S.* (PASSED|FAILED|SKIPPED \(.*\)|ERROR))\s+\[\s*\d+%\]$")
    return [m["body"] for m in map(keep.match, text.splitlines()) if m]


def _summary(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "short test summary info" in line)
    tail = [re.sub(r" in [\d.]+s", "", line) for line in lines[start:]]
    return tail


@pytest.mark.parametrize("ci", [False, True], ids=["terminal", "on-ci"])
def test_fast_path_reports_what_pytest_reports(tmp_path: Path, ci: bool) -> None:
    """Same items, node ids, outcomes, failure summaries, counts and exit status with and
    without pytest; only the fast one skips pytest's start-up (no platform/plugins line).
    On a CI system pytest prints summary messages whole, elsewhere trimmed to the width:
    the fast path follows it both ways."""
    for name, src in FAST_SUITE.items():
        write(tmp_path, name, src)
    fast = hubhost_test(tmp_path, "-v", ci=ci)
    slow = hubhost_test(tmp_path, "-v", fast=False, ci=ci)
    assert "platform " not in fast.stdout and "platform " in slow.stdout
    assert fast.returncode == slow.returncode == 1
    assert _outcome_lines(fast.stdout) == _outcome_lines(slow.stdout)
    assert len(_outcome_lines(fast.stdout)) == 11
    assert "spec/a_spec.lua::name with a dot 1.5 PASSED" in _outcome_lines(fast.stdout)
    assert _summary(fast.stdout) == _summary(slow.stdout)
    whole = "stack traceback:" in "\n".join(_summary(fast.stdout))
    assert whole == ci, "summary messages whole on CI only"
    for args in (("-q",), ("spec/a_spec.lua", "spec/sub/c_spec.lua")):
        f = hubhost_test(tmp_path, *args, ci=ci)
        s = hubhost_test(tmp_path, *args, fast=False, ci=ci)
        assert f.returncode == s.returncode, args
        assert _summary(f.stdout) == _summary(s.stdout) if f.returncode else True, args
        last_f = re.sub(r" in [\d.]+s", "", f.stdout.strip().splitlines()[-1]).strip("= ")
        last_s = re.sub(r" in [\d.]+s", "", s.stdout.strip().splitlines()[-1]).strip("= ")
        assert last_f == last_s, args


def test_fast_path_steps_aside_for_pytest_matters(tmp_path: Path) -> None:
    """Python tests, a conftest.py or pytest options mean pytest runs, as before."""
    write(tmp_path, "spec/x_spec.lua", 'it("x", function() end)')
    write(tmp_path, "test_py.py", "def test_py():\n    assert True\n")
    proc = hubhost_test(tmp_path)
    assert proc.returncode == 0
    assert "platform " in proc.stdout and re.search(r"= 2 passed in", proc.stdout), proc.stdout
