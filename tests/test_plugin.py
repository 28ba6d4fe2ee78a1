"""The pytest plugin for Lua specs, driven through pytester (real pytest runs, real
sandboxed runtimes): collection and node ids, outcomes and reports, selection (-k, node
ids, -x, --lf), busted's hook order, insulate/expose, tags as markers, JUnit XML."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]


def spec(pytester: pytest.Pytester, name: str, source: str) -> None:
    path = pytester.path / f"{name}.lua"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip("\n"))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An in-process pytest run. Hypothesis' plugin is left out: its summary hook imports
    hypothesis anew in every run (pytester restores sys.modules), a second per run."""
    return pytester.runpytest("-p", "no:hypothesispytest", *args)


def events(result: pytest.RunResult) -> list[str]:
    """What the spec printed as "EV <event>" (needs -s; may follow progress output)."""
    return [line.split("EV ", 1)[1] for line in result.outlines if "EV " in line]


BASIC = """
    describe("outer", function()
      it("passes", function()
        assert.are.equal(2, 1 + 1)
      end)
      it("fails", function()
        assert.are.equal(1, 2)
      end)
      context("nested", function()
        spec("errors", function()
          local t = nil
          return t.field
        end)
        test("is pending")
        pending("later")
      end)
    end)
    it("at top level", function() end)
    it "curried" (function() end)
"""


def test_collection_node_ids(pytester: pytest.Pytester) -> None:
    spec(pytester, "basic_spec", BASIC)
    spec(pytester, "sub/spec/other_spec", 'describe("a", function() describe("b", function() it("c") end) end)')
    spec(pytester, "helper", 'error("never loaded")')
    result = run(pytester, "--collect-only", "-q")
    assert result.ret == 0
    ids = [line for line in result.outlines if "::" in line]
    assert ids == [
        "basic_spec.lua::outer > passes",
        "basic_spec.lua::outer > fails",
        "basic_spec.lua::outer > nested > errors",
        "basic_spec.lua::outer > nested > is pending",
        "basic_spec.lua::outer > nested > later",
        "basic_spec.lua::at top level",
        "basic_spec.lua::curried",
        "sub/spec/other_spec.lua::a > b > c",
    ]


def test_duplicate_names_get_distinct_ids(pytester: pytest.Pytester) -> None:
    spec(pytester, "dup_spec", """
        describe("d", function() it("x", function() end) end)
        describe("d", function() it("x", function() error("second") end) end)
    """)
    result = run(pytester, "-v")
    result.stdout.fnmatch_lines(["*dup_spec.lua::d > x PASSED*", "*dup_spec.lua::d > x (2) FAILED*"])
    result.assert_outcomes(passed=1, failed=1)


def test_outcomes_and_reports(pytester: pytest.Pytester) -> None:
    spec(pytester, "basic_spec", BASIC)
    result = run(pytester, "-rs")
    result.assert_outcomes(passed=3, failed=2, skipped=2)
    out = result.stdout.str()
    # a failure: luassert's message at the spec's file:line
    assert "basic_spec.lua:6: Expected objects to be equal.\nPassed in:\n(number) 2\nExpected:\n(number) 1" in out
    # an error: Lua's message and a traceback with spec frames only
    assert ("basic_spec.lua:11: attempt to index local 't' (a nil value)\nstack traceback:\n"
            "\tbasic_spec.lua:11: in function <basic_spec.lua:9>") in out
    for internal in ("busted.lua", "luassert", "sandbox.lua", "[C]"):
        assert internal not in out
    # pending items are skips, reported at the spec's line
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] basic_spec.lua:13: pending",
                                 "SKIPPED [[]1[]] basic_spec.lua:14: pending"])


def test_traceback_through_a_driver_module(pytester: pytest.Pytester) -> None:
    spec(pytester, "drv/util", """
        local M = {}
        function M.parse(s)
          return s:match("x") .. "!"
        end
        return M
    """)
    spec(pytester, "drv/spec/util_spec", """
        local util = require "util"
        describe("util", function()
          it("parses", function()
            util.parse("abc")
          end)
        end)
    """)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "drv/util.lua:3: attempt to concatenate a nil value",
        "stack traceback:",
        "\tdrv/util.lua:3: in function 'parse'",
        "\tdrv/spec/util_spec.lua:4: in function <drv/spec/util_spec.lua:3>",
        "*= short test summary info =*",
    ])


def test_pending_inside_a_test_and_finally(pytester: pytest.Pytester) -> None:
    spec(pytester, "misc_spec", """
        local log = function(s) print("EV " .. s) end
        it("calls pending", function()
          pending("waiting for hardware")
          error("not reached")
        end)
        it("runs finally after a failure", function()
          finally(function() log("finally ran") end)
          assert.is_true(false)
        end)
        it("cannot nest", function()
          describe("inside", function() end)
        end)
    """)
    result = run(pytester, "-rs", "-s")
    result.assert_outcomes(skipped=1, failed=2)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] misc_spec.lua:2: pending: waiting for hardware"])
    assert "misc_spec.lua:11: 'describe' not supported inside current context block" in result.stdout.str()
    assert events(result) == ["finally ran"]


def test_selection_by_keyword_node_id_and_exitfirst(pytester: pytest.Pytester) -> None:
    spec(pytester, "sel_spec", """
        describe("group", function()
          it("first", function() end)
          it("second fails", function() assert.is_nil(1) end)
          describe("deep", function()
            it("third", function() end)
            it("fourth fails", function() error("boom") end)
          end)
        end)
    """)
    run(pytester, "-k", "deep").assert_outcomes(passed=1, failed=1)
    run(pytester, "-k", "first or third").assert_outcomes(passed=2)
    run(pytester, "sel_spec.lua::group > deep > third").assert_outcomes(passed=1)
    run(pytester, "sel_spec.lua::group > second fails").assert_outcomes(failed=1)
    run(pytester, "-x").assert_outcomes(passed=1, failed=1)


def test_last_failed(pytester: pytest.Pytester) -> None:
    spec(pytester, "lf_spec", """
        it("ok", function() end)
        it("broken", function() assert.is_true(false) end)
        it("also ok", function() end)
    """)
    run(pytester, "-p", "cacheprovider").assert_outcomes(passed=2, failed=1)
    result = run(pytester, "-p", "cacheprovider", "--lf", "-v")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*", "*lf_spec.lua::broken FAILED*"])


def test_one_lua_run_per_file(pytester: pytest.Pytester) -> None:
    spec(pytester, "once_spec", """
        print("EV file loaded")
        it("a", function() end)
        it("b", function() end)
        it("c", function() end)
    """)
    result = run(pytester, "-s")
    result.assert_outcomes(passed=3)
    # busted runs a file once; so does collection, and the items report that run's results
    assert events(result) == ["file loaded"]


HOOKS = """
    local function log(s) print("EV " .. s) end
    describe("outer", function()
      setup(function() log("setup outer") end)
      teardown(function() log("teardown outer") end)
      lazy_setup(function() log("lazy_setup outer") end)
      lazy_teardown(function() log("lazy_teardown outer") end)
      before_each(function() log("before_each outer") end)
      after_each(function() log("after_each outer") end)
      it("one", function() log("it one") end)
      describe("inner", function()
        setup(function() log("setup inner") end)
        teardown(function() log("teardown inner") end)
        before_each(function() log("before_each inner") end)
        after_each(function() log("after_each inner") end)
        it("two", function()
          finally(function() log("finally two") end)
          log("it two")
        end)
      end)
      describe("last", function()
        lazy_setup(function() log("lazy_setup last") end)
        strict_setup(function() log("setup last") end)
        it("three", function() log("it three") end)
      end)
    end)
"""


def test_hook_order(pytester: pytest.Pytester) -> None:
    spec(pytester, "hooks_spec", HOOKS)
    result = run(pytester, "-s")
    result.assert_outcomes(passed=3)
    assert events(result) == [
        "setup outer",
        "lazy_setup outer", "before_each outer", "it one", "after_each outer",
        "setup inner",
        "before_each outer", "before_each inner", "it two", "finally two",
        "after_each inner", "after_each outer",
        "teardown inner",
        "setup last",
        "lazy_setup last", "before_each outer", "it three", "after_each outer",
        "lazy_teardown outer", "teardown outer",
    ]


def test_hooks_of_unselected_blocks_do_not_run(pytester: pytest.Pytester) -> None:
    spec(pytester, "hooks_spec", HOOKS)
    result = run(pytester, "-s", "-k", "three")
    result.assert_outcomes(passed=1, deselected=2)
    assert events(result) == [
        "setup outer", "setup last",
        "lazy_setup outer", "lazy_setup last", "before_each outer", "it three", "after_each outer",
        "lazy_teardown outer", "teardown outer",
    ]


def test_hook_failures(pytester: pytest.Pytester) -> None:
    spec(pytester, "hookfail_spec", """
        describe("before fails", function()
          before_each(function() error("no database") end)
          after_each(function() print("EV after_each still runs") end)
          it("never runs", function() print("EV body ran") end)
        end)
        describe("after fails", function()
          after_each(function() assert.are.equal("clean", "dirty") end)
          it("passes itself", function() end)
        end)
        describe("setup fails", function()
          setup(function() error("setup broke") end)
          it("a", function() end)
          it("b", function() end)
        end)
        describe("teardown fails", function()
          teardown(function() error("teardown broke") end)
          it("first", function() end)
          it("last", function() end)
        end)
    """)
    result = run(pytester, "-s", "-rE")
    # errors: before_each (setup), after_each (teardown), setup x2, teardown of the last test
    result.assert_outcomes(passed=3, errors=5)
    out = result.stdout.str()
    assert events(result) == ["after_each still runs"]
    result.stdout.fnmatch_lines([
        "*ERROR at setup of before fails > never runs*",
        "before_each of 'before fails' failed (error):",
        "hookfail_spec.lua:2: no database",
        "*ERROR at teardown of after fails > passes itself*",
        "after_each of 'after fails' failed (failure):",
        "hookfail_spec.lua:7: Expected objects to be equal.",
        "*ERROR at setup of setup fails > a*",
        "strict_setup of 'setup fails' failed (error):",
        "hookfail_spec.lua:11: setup broke",
        "*ERROR at setup of setup fails > b*",
        "*ERROR at teardown of teardown fails > last*",
        "strict_teardown of 'teardown fails' failed (error):",
        "hookfail_spec.lua:16: teardown broke",
    ])
    assert "ERROR at teardown of teardown fails > first" not in out


def test_insulate_and_expose(pytester: pytest.Pytester) -> None:
    spec(pytester, "env_spec", """
        local target = { f = function() return "orig" end }
        describe("tests", function()
          it("sets a global", function() set_in_it = true end)
          it("does not leak it to the next test", function() assert.is_nil(set_in_it) end)
        end)
        describe("blocks", function()
          block_global = 1
          before_each(function() from_before_each = "hook" end)
          it("see their globals and their hooks'", function()
            assert.are.equal(1, block_global)
            assert.are.equal("hook", from_before_each)
          end)
        end)
        it("do not leak block globals", function()
          assert.is_nil(block_global)
          assert.is_nil(from_before_each)
        end)
        insulate("insulated", function()
          inside_insulate = true
          _G.raw_insulated = true
          stub(target, "f").returns("stubbed")
          it("sees its own changes", function()
            assert.is_true(inside_insulate)
            assert.is_true(raw_insulated)
            assert.are.equal("stubbed", target.f())
          end)
        end)
        it("after insulate everything is restored", function()
          assert.is_nil(inside_insulate)
          assert.is_nil(raw_insulated)
          assert.are.equal("orig", target.f())
        end)
        describe("wrapper", function()
          expose("exposed", function()
            exposed_global = "yes"
            _G.raw_exposed = "raw"
            it("works", function() end)
          end)
        end)
        it("after expose the changes are visible", function()
          assert.are.equal("yes", exposed_global)
          assert.are.equal("raw", raw_exposed)
        end)
        top_level = true
        _G.raw_top_level = true
    """)
    spec(pytester, "z_next_file_spec", """
        it("does not see the other file's globals", function()
          assert.is_nil(top_level)
          assert.is_nil(raw_top_level)
          assert.is_nil(exposed_global)
        end)
    """)
    result = run(pytester)
    result.assert_outcomes(passed=9)


def test_tags_become_markers(pytester: pytest.Pytester) -> None:
    spec(pytester, "tags_spec", """
        describe("network #slow", function()
          it("talks #serial", function() end)
          it("waits", function() end)
        end)
        it("quick #fast-path", function() end)
        it("uses #parametrize as a plain word", function() end)
    """)
    strict = ("--strict-markers", "-W", "error::pytest.PytestUnknownMarkWarning")
    run(pytester, *strict, "-m", "slow").assert_outcomes(passed=2, deselected=2)
    run(pytester, *strict, "-m", "serial").assert_outcomes(passed=1, deselected=3)
    run(pytester, *strict, "-m", "fast-path").assert_outcomes(passed=1, deselected=3)
    run(pytester, *strict, "-m", "not slow").assert_outcomes(passed=2, deselected=2)
    run(pytester, *strict).assert_outcomes(passed=4)


def test_junit_xml(pytester: pytest.Pytester) -> None:
    spec(pytester, "basic_spec", BASIC)
    run(pytester, "--junitxml=out.xml", "-o", "junit_family=xunit1")
    root = ET.parse(pytester.path / "out.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert list(cases) == ["outer > passes", "outer > fails", "outer > nested > errors",
                           "outer > nested > is pending", "outer > nested > later",
                           "at top level", "curried"]
    assert {c.get("classname") for c in cases.values()} == {"basic_spec.lua"}
    assert cases["outer > fails"].get("line") == "4"  # pytest writes 0-based lines
    failure = cases["outer > fails"].find("failure")
    assert failure is not None
    assert failure.text is not None and "basic_spec.lua:6: Expected objects to be equal." in failure.text
    error = cases["outer > nested > errors"].find("failure")
    assert error is not None and error.text is not None and "stack traceback:" in error.text
    assert cases["outer > nested > later"].find("skipped") is not None
    assert list(cases["outer > passes"]) == []


def test_load_errors(pytester: pytest.Pytester) -> None:
    """busted reports a file that fails to load as one error and runs every other file:
    here each broken file is one failing item named after the file, with Lua's message and
    file:line, the good tests still pass, and nothing stops at collection (no
    --continue-on-collection-errors needed)."""
    spec(pytester, "syntax_spec", """
        describe("x", function()
          it("y", function() end
        end)
    """)
    spec(pytester, "toplevel_spec", """
        local missing = require "no_such_module"
    """)
    spec(pytester, "body_spec", """
        describe("good", function() it("passes", function() end) end)
        describe("broken", function()
          local x = nil + 1
          it("never registered", function() end)
        end)
    """)
    spec(pytester, "zz_good_spec", 'it("runs after the broken files", function() end)')
    result = run(pytester, "-v")
    result.assert_outcomes(passed=2, failed=3)
    assert result.ret == 1
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*syntax_spec.lua::syntax_spec.lua FAILED*",
        "*toplevel_spec.lua::toplevel_spec.lua FAILED*",
        "*zz_good_spec.lua::runs after the broken files PASSED*",
    ])
    assert "syntax_spec.lua:3: ')' expected (to close '(' at line 2) near 'end'" in out
    assert "toplevel_spec.lua:1: module 'no_such_module' not found" in out
    result.stdout.fnmatch_lines(["*_ broken _*", "body_spec.lua:3: attempt to perform arithmetic on a nil value"])
    assert "error during collection" not in out


def test_require_from_the_driver_folder(pytester: pytest.Pytester) -> None:
    spec(pytester, "thermo/init", 'return { name = "thermo", helpers = require "helpers.math" }')
    spec(pytester, "thermo/helpers/math", "return { double = function(x) return 2 * x end }")
    spec(pytester, "thermo/spec/thermo_spec", """
        local driver = require "init"
        local m = require "helpers.math"
        describe("thermo", function()
          it("loads its modules", function()
            assert.are.equal("thermo", driver.name)
            assert.are.equal(m, driver.helpers)
            assert.are.equal(6, m.double(3))
          end)
          it("stays in the sandbox", function()
            assert.is_nil(os.exit)
            assert.is_nil(os.execute)
            assert.has_error(function() require "ffi" end)
          end)
        end)
    """)
    run(pytester).assert_outcomes(passed=2)


def test_runaway_code_is_stopped(pytester: pytest.Pytester) -> None:
    """Lua running in the VM cannot be interrupted by Python's signals: the sandbox's CPU
    budget stops a looping test (or describe body) and the rest of the file still runs."""
    spec(pytester, "loop_spec", """
        describe("loops", function()
          it("forever", function()
            local n = 0
            while true do n = n + 1 end
          end)
          it("still runs", function() assert.truthy(true) end)
        end)
        describe("looping body", function()
          while true do end
        end)
    """)
    result = run(pytester, "-o", "lua_spec_timeout=0.3")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "loop_spec.lua:4: it exceeded the time limit of 0.3 s (cpu limit exceeded) and was stopped",
        "stack traceback:",
        "\tloop_spec.lua:4: in function <loop_spec.lua:2>",
    ])
    assert "loop_spec.lua:9: describe exceeded the time limit of 0.3 s" in result.stdout.str()


def test_failure_in_a_driver_module_shows_the_spec_line(pytester: pytest.Pytester) -> None:
    spec(pytester, "drv/checks", """
        local assert = require "luassert"
        return { positive = function(x) assert.is_true(x > 0) end }
    """)
    spec(pytester, "drv/spec/checks_spec", """
        local checks = require "checks"
        it("rejects negatives", function()
          checks.positive(-1)
        end)
    """)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "drv/checks.lua:2: Expected objects to be the same.",
        "Passed in:",
        "(boolean) false",
        "Expected:",
        "(boolean) true",
        "stack traceback:",
        "\tdrv/checks.lua:2: in function 'positive'",
        "\tdrv/spec/checks_spec.lua:3: in function <drv/spec/checks_spec.lua:2>",
    ])
