"""luassert in the sandbox: every assertion, spy, stub, mock and matcher form, passing and
failing, with the exact message text busted users know.

All cases run as `it` blocks of one generated spec file, in one pass of the real spec runner
(sandboxed runtime, busted, luassert); each case is then checked from Python, so a broken
assertion cannot vouch for itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hubhost.testing import specrun

OK = None  # the case must pass

# (case name, Lua body, expected status, expected message without "file:line: ")
CASES: list[tuple[str, str, str, str | None]] = [
    # -- equal / same -------------------------------------------------------------------
    ("equal passes", "assert.are.equal(1, 1); assert.equals('a', 'a'); assert.is.equal(true, true)",
     "success", OK),
    ("equal fails", "assert.are.equal(1, 2)", "failure",
     "Expected objects to be equal.\nPassed in:\n(number) 2\nExpected:\n(number) 1"),
    ("equal strings fail", "assert.equals('a', 'b')", "failure",
     "Expected objects to be equal.\nPassed in:\n(string) 'b'\nExpected:\n(string) 'a'"),
    ("equal tables by reference", "assert.are_not.equal({}, {})", "success", OK),
    ("not equal fails", "assert.are_not.equal(1, 1)", "failure",
     "Expected objects to not be equal.\nPassed in:\n(number) 1\nDid not expect:\n(number) 1"),
    ("equal custom message", "assert.are.equal(1, 2, 'the answer')", "failure",
     "the answer\nExpected objects to be equal.\nPassed in:\n(number) 2\nExpected:\n(number) 1"),
    ("message modifier", "assert.message('why not').is_true(false)", "failure",
     "why not\nExpected objects to be the same.\nPassed in:\n(boolean) false\nExpected:\n(boolean) true"),
    ("same passes", "assert.same({a = {1, 2}, b = 'x'}, {a = {1, 2}, b = 'x'})", "success", OK),
    ("same fails with marked key", "assert.same({1, 2}, {1, 3})", "failure",
     "Expected objects to be the same.\nPassed in:\n(table: 0x…) {\n  [1] = 1\n *[2] = 3 }\n"
     "Expected:\n(table: 0x…) {\n  [1] = 1\n *[2] = 2 }"),
    ("same fails nested", "assert.are.same({a = {b = 1}}, {a = {b = 2}})", "failure",
     "Expected objects to be the same.\nPassed in:\n(table: 0x…) {\n *[a] = {\n   *[b] = 2 } }\n"
     "Expected:\n(table: 0x…) {\n *[a] = {\n   *[b] = 1 } }"),
    ("same deep tables cut at level 3", "assert.same({1}, {{{{1}}}})", "failure",
     "Expected objects to be the same.\nPassed in:\n(table: 0x…) {\n *[1] = {\n    [1] = {\n"
     "      [1] = { ... more } } } }\nExpected:\n(table: 0x…) {\n *[1] = 1 }"),
    ("same empty table", "assert.same({}, {x = 1})", "failure",
     "Expected objects to be the same.\nPassed in:\n(table: 0x…) {\n *[x] = 1 }\nExpected:\n(table: 0x…) { }"),
    ("not same fails", "assert.is_not.same({1}, {1})", "failure",
     "Expected objects to not be the same.\nPassed in:\n(table: 0x…) {\n  [1] = 1 }\n"
     "Did not expect:\n(table: 0x…) {\n  [1] = 1 }"),
    ("same handles cycles", "local a, b = {}, {}; a.self = a; b.self = b; assert.same(a, b)", "success", OK),
    # -- truthy / falsy / booleans / types ------------------------------------------------
    ("truthy passes", "assert.truthy(0); assert.is_truthy(''); assert.falsy(nil); assert.is_falsy(false)",
     "success", OK),
    ("truthy fails", "assert.is_truthy(nil)", "failure", "Expected to be truthy, but value was:\n(nil)"),
    ("not truthy fails", "assert.is_not_truthy(1)", "failure",
     "Expected to not be truthy, but value was:\n(number) 1"),
    ("falsy fails", "assert.is_falsy(0)", "failure", "Expected to be falsy, but value was:\n(number) 0"),
    ("not falsy fails", "assert.is_not.falsy(false)", "failure",
     "Expected to not be falsy, but value was:\n(boolean) false"),
    ("is_true passes", "assert.is_true(true); assert.is_false(false); assert.is_not_true(1); assert.True(true)",
     "success", OK),
    ("is_true fails", "assert.is_true(1)", "failure",
     "Expected objects to be the same.\nPassed in:\n(number) 1\nExpected:\n(boolean) true"),
    ("is_false fails", "assert.is_false(nil)", "failure",
     "Expected objects to be the same.\nPassed in:\n(nil)\nExpected:\n(boolean) false"),
    ("types pass",
     "assert.is_nil(nil); assert.is_number(1); assert.is_string('s'); assert.is_table({}); "
     "assert.is_function(print); assert.is_boolean(false); assert.is_not_nil(0); "
     "assert.is_not_userdata(1); assert.is_thread(coroutine.create(function() end))",
     "success", OK),
    ("is_nil fails", "assert.is_nil(1)", "failure",
     "Expected objects to be the same.\nPassed in:\n(number) 1\nExpected:\ntype nil"),
    ("is_number fails", "assert.is_number('1')", "failure",
     "Expected objects to be the same.\nPassed in:\n(string) '1'\nExpected:\ntype number"),
    ("is_string fails", "assert.is_string(1)", "failure",
     "Expected objects to be the same.\nPassed in:\n(number) 1\nExpected:\ntype string"),
    ("is_table fails", "assert.is_table('t')", "failure",
     "Expected objects to be the same.\nPassed in:\n(string) 't'\nExpected:\ntype table"),
    ("is_function fails", "assert.is_function(1)", "failure",
     "Expected objects to be the same.\nPassed in:\n(number) 1\nExpected:\ntype function"),
    ("is_boolean fails", "assert.is_boolean(nil)", "failure",
     "Expected objects to be the same.\nPassed in:\n(nil)\nExpected:\ntype boolean"),
    ("is_userdata fails", "assert.is_userdata(1)", "failure",
     "Expected objects to be the same.\nPassed in:\n(number) 1\nExpected:\ntype userdata"),
    ("is_not_nil fails", "assert.is_not_nil(nil)", "failure",
     "Expected objects to not be the same.\nPassed in:\n(nil)\nDid not expect:\ntype nil"),
    # -- near / matches / unique ------------------------------------------------------------
    ("near passes", "assert.near(1.5, 1.55, 0.1); assert.is_not.near(1, 2, 0.5)", "success", OK),
    ("near fails", "assert.near(1.5, 2, 0.1)", "failure",
     "Expected values to be near.\nPassed in:\n(number) 2\nExpected:\n(number) 1.5 +/- 0.1"),
    ("not near fails", "assert.is_not.near(1, 1.25, 0.5)", "failure",
     "Expected values to not be near.\nPassed in:\n(number) 1.25\nDid not expect:\n(number) 1 +/- 0.5"),
    ("matches returns captures",
     "local d = assert.matches('(%d+)', 'ab12'); assert.are.equal('12', d); "
     "assert.matches('a.b', 'a.b', 1, true); assert.no.matches('^x', 'abc')",
     "success", OK),
    ("matches fails", "assert.matches('^a', 'ba')", "failure",
     "Expected strings to match.\nPassed in:\n(string) 'ba'\nExpected:\n(string) '^a'"),
    ("not matches fails", "assert.does_not.match('b', 'abc')", "failure",
     "Expected strings not to match.\nPassed in:\n(string) 'abc'\nDid not expect:\n(string) 'b'"),
    ("matches bad argument", "assert.matches(1, 'x')", "failure",
     "bad argument #1 to 'matches' (string expected, got number)"),
    ("unique passes", "assert.unique({1, 2, 3}); assert.unique({{1}, {1}}); assert.is_not.unique({1, 1})",
     "success", OK),
    ("unique fails", "assert.unique({1, 2, 1})", "failure",
     "Expected object to be unique:\n(table: 0x…) {\n  [1] = 1\n  [2] = 2\n  [3] = 1 }"),
    ("unique deep fails", "assert.unique({{1}, {1}}, true)", "failure",
     "Expected object to be unique:\n(table: 0x…) {\n  [1] = {\n    [1] = 1 }\n  [2] = {\n    [1] = 1 } }"),
    # -- errors ---------------------------------------------------------------------------
    ("has_error passes",
     "assert.has_error(function() error('boom') end, 'boom'); "
     "assert.has_error(function() error('boom') end); "
     "assert.error(function() error({code = 1}) end, {code = 1}); "
     "assert.errors(function() error(42) end, 42); "
     "assert.has_no.errors(function() end); "
     "assert.has_no_error(function() return 1 end)",
     "success", OK),
    ("has_error without error", "assert.has_error(function() end)", "failure",
     "Expected a different error.\nCaught:\n(no error)\nExpected:\n(error)"),
    ("has_error wrong message", "assert.has_error(function() error('x') end, 'y')", "failure",
     "Expected a different error.\nCaught:\n(string) 'x'\nExpected:\n(string) 'y'"),
    ("has_no errors fails", "assert.has_no.errors(function() error('x') end)", "failure",
     "Expected no error, but caught:\n(string) 'x'"),
    ("has_error on a non-function", "assert.has_error(1)", "failure",
     "bad argument #1 to 'error' (function or callable object expected, got number)"),
    ("error_matches passes",
     "assert.error_matches(function() error('bad thing happened') end, 'bad %a+'); "
     "assert.has_error_match(function() error('a.b') end, 'a.b', nil, true); "
     "assert.no.error_matches(function() error('boom') end, '^x')",
     "success", OK),
    ("error_matches fails", "assert.error_matches(function() error('boom') end, '^x')", "failure",
     "Expected a different error.\nCaught:\n(string) 'boom'\nExpected:\n(string) '^x'"),
    ("error_matches without error", "assert.error_matches(function() end, 'x')", "failure",
     "Expected a different error.\nCaught:\n(no error)\nExpected:\n(string) 'x'"),
    ("returned_arguments passes", "assert.returned_arguments(2, 1, 2); assert.returned_arguments(0)",
     "success", OK),
    ("returned_arguments fails", "assert.returned_arguments(2, 1)", "failure",
     "Expected 2 results(s) to be returned, but got 1"),
    ("not returned_arguments fails", "assert.is_not.returned_arguments(1, 'x')", "failure",
     "Expected not 1 results(s) to be returned, but got 1"),
    # -- plain assert ------------------------------------------------------------------------
    ("plain assert returns its arguments",
     "local a, b, c = assert(1, 2, 3); assert.are.same({1, 2, 3}, {a, b, c})", "success", OK),
    ("plain assert fails", "assert(false, 'plain message')", "failure", "plain message"),
    ("plain assert default message", "assert(nil)", "failure", "assertion failed!"),
    ("unknown assertion is an error", "assert.is_bogus(1)", "error",
     "luassert: unknown modifier/assertion: 'is_bogus'"),
    ("other errors are errors", "error('not an assertion')", "error", "not an assertion"),
    # -- spies ------------------------------------------------------------------------------
    ("spy passes",
     "local s = spy.new(function(x) return x * 2 end); assert.are.equal(4, s(2)); "
     "assert.spy(s).was.called(); assert.spy(s).was.called(1); assert.spy(s).was.called_with(2); "
     "assert.spy(s).was_not.called_with(3); assert.spy(s).returned_with(4); "
     "assert.spy(s).was.called_at_least(1); assert.spy(s).was.called_at_most(1); "
     "assert.spy(s).was_not.called(2); assert.is_true(spy.is_spy(s))",
     "success", OK),
    ("spy called count fails", "local s = spy.new(); s(); assert.spy(s).was.called(2)", "failure",
     "Expected to be called 2 time(s), but was called 1 time(s)"),
    ("spy never called fails", "local s = spy.new(); assert.spy(s).was.called()", "failure",
     "Expected to be called >0 time(s), but was called 0 time(s)"),
    ("spy not called fails", "local s = spy.new(); s(); assert.spy(s).was_not.called()", "failure",
     "Expected to be called 0 time(s), but was called 1 time(s)"),
    ("spy not called exactly fails", "local s = spy.new(); s(); assert.spy(s).was_not.called(1)", "failure",
     "Expected not to be called exactly 1 time(s), but it was."),
    ("spy called_with fails", "local s = spy.new(); s(1, 'a'); assert.spy(s).was.called_with(1, 'b')",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ((number) 1, (string) 'a')\nExpected:\n(values list) ((number) 1, (string) 'b')"),
    ("spy called_with counts trailing nils", "local s = spy.new(); s(1, nil); assert.spy(s).was.called_with(1)",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ((number) 1, (nil))\nExpected:\n(values list) ((number) 1)"),
    ("spy not called_with fails", "local s = spy.new(); s(1); assert.spy(s).was_not.called_with(1)",
     "failure", "Function was called with matching arguments at least once.\nCalled with (last matching call):\n"
     "(values list) ((number) 1)\nDid not expect:\n(values list) ((number) 1)"),
    ("spy called_at_least fails", "local s = spy.new(); s(); assert.spy(s).was.called_at_least(2)",
     "failure", "Expected to be called at least 2 time(s), but was called 1 time(s)"),
    ("spy called_at_most fails", "local s = spy.new(); s(); s(); assert.spy(s).was.called_at_most(1)",
     "failure", "Expected to be called at most 1 time(s), but was called 2 time(s)"),
    ("spy not called_at_least fails", "local s = spy.new(); s(); assert.spy(s).was_not.called_at_least(1)",
     "failure", "Expected to be called less than 1 time(s), but was called 1 time(s)"),
    ("spy returned_with fails",
     "local s = spy.new(function() return 1 end); s(); assert.spy(s).returned_with(2)",
     "failure", "Function never returned matching arguments.\nReturned (last call if any):\n"
     "(values list) ((number) 1)\nExpected:\n(values list) ((number) 2)"),
    ("spy not returned_with fails",
     "local s = spy.new(function() return 1 end); s(); assert.spy(s).was_not.returned_with(1)",
     "failure", "Function returned matching arguments at least once.\nReturned (last matching call):\n"
     "(values list) ((number) 1)\nDid not expect:\n(values list) ((number) 1)"),
    ("spy copies arguments at call time",
     "local s = spy.new(); local t = {1}; s(t); t[1] = 2; assert.spy(s).was.called_with({1})",
     "success", OK),
    ("spy.on and revert",
     "local t = {f = function(x) return x + 1 end}; local orig = t.f; local s = spy.on(t, 'f'); "
     "assert.are.equal(3, t.f(2)); assert.spy(t.f).was.called_with(2); s:revert(); "
     "assert.are.equal(orig, t.f); s:clear(); assert.spy(s).was_not.called()",
     "success", OK),
    ("spy of the original function is an error",
     "local t = {f = function() end}; assert.spy(t.f).was.called()", "error",
     "When calling 'spy(aspy)', 'aspy' must not be the original function, but the spy function replacing the original"),
    ("called without spy is an error", "assert.was.called(1)", "error",
     "'called' must be chained after 'spy(aspy)'"),
    ("spy on a non-function is an error", "spy.new(1)", "error",
     "Cannot spy on type 'number', only on functions or callable elements"),
    # -- stubs ------------------------------------------------------------------------------
    ("stub returns invokes revert",
     "local t = {f = function() return 'orig' end}; local s = stub(t, 'f'); assert.is_nil(t.f()); "
     "s.returns(5, 6); local a, b = t.f(); assert.are.same({5, 6}, {a, b}); "
     "s.invokes(function(x) return x + 1 end); assert.are.equal(3, t.f(2)); "
     "assert.stub(t.f).was.called(3); assert.stub(t.f).was.called_with(2); "
     "s:revert(); assert.are.equal('orig', t.f())",
     "success", OK),
    ("stub with values and on_call_with",
     "local t = {}; local s = stub(t, 'g', 7); assert.are.equal(7, t.g()); "
     "s.on_call_with(1).returns('one'); s.on_call_with(match.is_string()).invokes(function(x) return x .. '!' end); "
     "assert.are.equal('one', t.g(1)); assert.are.equal('hi!', t.g('hi')); assert.are.equal(7, t.g(2)); "
     "s.by_default.returns(8); assert.are.equal(8, t.g(3)); s:revert(); assert.is_nil(t.g)",
     "success", OK),
    ("stub call count fails", "local t = {}; stub(t, 'f'); t.f(); assert.stub(t.f).was.called(2)",
     "failure", "Expected to be called 2 time(s), but was called 1 time(s)"),
    ("stub on a non-table fails", "stub(1, 'f')", "failure",
     "stub.new(): Can only create stub on a table key, call with 2 params; table, key"),
    ("stub on a non-callable fails", "stub({f = 1}, 'f')", "failure",
     "stub.new(): The element for which to create a stub must either be callable, or be nil"),
    # -- mocks ------------------------------------------------------------------------------
    ("mock spies every function",
     "local obj = {a = function() return 1 end, sub = {b = function() return 2 end}, n = 3}; "
     "local m = mock(obj); assert.are.equal(obj, m); assert.are.equal(1, m.a()); m.sub.b(); "
     "assert.spy(m.a).was.called(1); assert.spy(m.sub.b).was.called(1); assert.are.equal(3, m.n); "
     "mock.clear(m); assert.spy(m.a).was_not.called(); mock.revert(m); assert.is_false(spy.is_spy(m.a))",
     "success", OK),
    ("mock with stubs", "local m = mock({a = function() return 1 end}, true); assert.is_nil(m.a()); "
     "assert.stub(m.a).was.called(1)", "success", OK),
    ("mock call count fails", "local m = mock({a = function() end}); assert.spy(m.a).was.called(1)",
     "failure", "Expected to be called 1 time(s), but was called 0 time(s)"),
    # -- matchers ---------------------------------------------------------------------------
    ("matchers in called_with",
     "local s = spy.new(); local ref = {}; s('x', {1}, 3, true, ref); "
     "assert.spy(s).was.called_with(match._, match._, match._, match._, match._); "
     "assert.spy(s).was.called_with(match.is_string(), match.is_table(), match.is_number(), "
     "match.is_true(), match.is_ref(ref)); "
     "assert.spy(s).was.called_with(match.matches('^x'), match.is_same({1}), match.is_equal(3), "
     "match.is_truthy(), match.is_not_nil()); "
     "assert.spy(s).was.called_with(match.any_of(match.is_number(), match.is_string()), "
     "match.all_of(match.is_table(), match.is_not_nil()), match.near(3.1, 0.2), "
     "match.none_of(match.is_false()), match.is_table())",
     "success", OK),
    ("matcher mismatch fails",
     "local s = spy.new(); s('x', 3); assert.spy(s).was.called_with(match.is_string(), match.is_string())",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ((string) 'x', (number) 3)\nExpected:\n"
     "(values list) ((matcher) is.string(), (matcher) is.string())"),
    ("ref matcher is by identity",
     "local s = spy.new(); s({}); assert.spy(s).was.called_with(match.is_ref({}))",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ((table: 0x…) { })\nExpected:\n(values list) ((matcher) is.ref((table: 0x…) { }))"),
    ("matchers are callable", "assert.is_true(match.is_string()('a')); assert.is_false(match.is_not_string()('a'))",
     "success", OK),
    # -- module identity ----------------------------------------------------------------
    ("modules are the exported ones",
     "assert.are.equal(assert, require('luassert')); assert.are.equal(spy, require('luassert.spy')); "
     "assert.are.equal(match, require('luassert.match')); assert.are.equal(stub, require('luassert.stub')); "
     "assert.are.equal(mock, require('luassert.mock'))",
     "success", OK),
    ("custom assertion via say",
     "local say = require('say'); "
     "say:set('assertion.has_key.positive', 'Expected key %s in:\\n%s'); "
     "say:set('assertion.has_key.negative', 'Expected key %s not in:\\n%s'); "
     "assert:register('assertion', 'has_key', function(state, args) return args[2][args[1]] ~= nil end, "
     "'assertion.has_key.positive', 'assertion.has_key.negative'); "
     "assert.has_key('a', {a = 1}); assert.has_key('b', {a = 1})",
     "failure", "Expected key (string) 'b' in:\n(table: 0x…) {\n  [a] = 1 }"),
    ("snapshot reverts spies",
     "local t = {f = function() return 1 end}; local snap = assert:snapshot(); stub(t, 'f'); "
     "assert.is_nil(t.f()); snap:revert(); assert.are.equal(1, t.f())",
     "success", OK),
    # -- stored chains: luassert runs the whole chain on every call, so a chain kept in a
    # local checks each call; the second call of each of these must fail (issue 14: it
    # used to pass, the worst defect a test tool can have)
    ("stored equal fails its second call", "local eq = assert.are.equal; eq(1, 1); eq(1, 2)", "failure",
     "Expected objects to be equal.\nPassed in:\n(number) 2\nExpected:\n(number) 1"),
    ("stored is_true fails its second call", "local t = assert.is_true; t(true); t(false)", "failure",
     "Expected objects to be the same.\nPassed in:\n(boolean) false\nExpected:\n(boolean) true"),
    ("stored called_with fails its second call",
     "local s = spy.new(); s(1); local c = assert.spy(s).was.called_with; c(1); c(2)", "failure",
     "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ((number) 1)\nExpected:\n(values list) ((number) 2)"),
    ("stored negation stays negated", "local ne = assert.is_not.equal; ne(1, 2); ne(3, 4); ne(5, 5)", "failure",
     "Expected objects to not be equal.\nPassed in:\n(number) 5\nDid not expect:\n(number) 5"),
    ("stored chains pass every passing call",
     "local eq, t = assert.are.equal, assert.is_true; for i = 1, 3 do eq(i, i); t(true) end", "success", OK),
    ("stored matcher makes a matcher per call",
     "local m = match.is_string; assert.is_true(m()('a')); assert.is_false(m()(1))", "success", OK),
    # -- spies' messages list the call seen: the newest matching one, else the last one
    ("called_with shows the last call", "local s = spy.new(); s('first'); s('last'); assert.spy(s).was.called_with('other')",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ((string) 'last')\nExpected:\n(values list) ((string) 'other')"),
    ("called_with on a spy never called shows nil", "local s = spy.new(); assert.spy(s).was.called_with(1)",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(nil)\nExpected:\n(values list) ((number) 1)"),
    ("called_with shows anything and negated matchers",
     "local s = spy.new(); s(); assert.spy(s).was.called_with(match._, match.is_not.truthy(), match.is_same(2))",
     "failure", "Function was never called with matching arguments.\nCalled with (last call if any):\n"
     "(values list) ()\nExpected:\n(values list) ((matcher) _ *anything*, (matcher) no.truthy(), "
     "(matcher) is.same((number) 2))"),
    ("format knows matchers and argument lists",
     "local out = assert:format({ match.is_equal('x'), n = 1 }); assert.are.equal(\"(matcher) is.equal((string) 'x')\", out[1])",
     "success", OK),
]


def _normalize(message: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x…", message)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, specrun.SpecResult]]:
    folder = tmp_path_factory.mktemp("luassert")
    spec = folder / "luassert_cases_spec.lua"
    lines = ['describe("luassert", function()']
    for name, body, _, _ in CASES:
        lines.append(f"  it({name!r}, function()")
        lines.append(f"    {body}")
        lines.append("  end)")
    lines.append("end)")
    spec.write_text("\n".join(lines) + "\n")
    tests = specrun.collect(spec)
    assert [t.name for t in tests] == [c[0] for c in CASES]
    return spec, specrun.run(spec, [t.id for t in tests])


@pytest.mark.parametrize(("name", "body", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_case(results: tuple[Path, dict[str, specrun.SpecResult]], name: str, body: str,
              status: str, message: str | None) -> None:
    spec, res = results
    r = res[f"luassert > {name}"]
    assert r.status == status, f"{name}: {r.status}: {r.message}\n{r.trace or ''}"
    if message is None:
        return
    assert r.message is not None
    # Every failure and error points at the case's own line of the spec file.
    line = next(i for i, text in enumerate(spec.read_text().splitlines(), 1) if text.strip() == body)
    prefix = f"{specrun.display_name(spec)}:{line}: "
    assert r.message.startswith(prefix), r.message
    assert _normalize(r.message[len(prefix):]) == message
    assert r.line == line


def test_function_formatting(tmp_path: Path) -> None:
    """Functions print with their address, definition line and chunk name."""
    spec = tmp_path / "fn_spec.lua"
    spec.write_text("local function f() end\nlocal function g() end\n"
                    "it('differs', function() assert.are.equal(f, g) end)\n")
    (t,) = specrun.collect(spec)
    r = specrun.run(spec, [t.id])[t.id]
    name = specrun.display_name(spec)
    assert r.status == "failure"
    assert _normalize(r.message) == (
        f"{name}:3: Expected objects to be equal.\nPassed in:\nfunction: 0x… @ line 2 in @{name}\n"
        f"Expected:\nfunction: 0x… @ line 1 in @{name}")


def test_failure_inside_a_driver_module_points_at_the_module(tmp_path: Path) -> None:
    """A failure in a required module (which requires luassert itself: modules see Lua's
    own assert, as under busted) reports that module's line; errors carry a traceback
    through the module and the spec, without library frames."""
    (tmp_path / "helper.lua").write_text(
        "local assert = require 'luassert'\nlocal M = {}\nfunction M.check(v)\n  assert.is_true(v)\nend\n"
        "function M.explode()\n  error('kaboom')\nend\nreturn M\n")
    (tmp_path / "spec").mkdir()
    spec = tmp_path / "spec" / "mod_spec.lua"
    spec.write_text(
        "local helper = require 'helper'\n"
        "it('fails in helper', function()\n  helper.check(false)\nend)\n"
        "it('errors in helper', function()\n  helper.explode()\nend)\n")
    tests = specrun.collect(spec)
    res = specrun.run(spec, [t.id for t in tests])
    helper = specrun.display_name(tmp_path / "helper.lua")
    name = specrun.display_name(spec)
    fail = res["fails in helper"]
    assert fail.status == "failure"
    assert fail.message == (f"{helper}:4: Expected objects to be the same.\nPassed in:\n(boolean) false\n"
                            "Expected:\n(boolean) true")
    assert (fail.file, fail.line) == (helper, 4)
    err = res["errors in helper"]
    assert err.status == "error"
    assert err.message == f"{helper}:7: kaboom"
    assert err.trace is not None
    lines = err.trace.splitlines()
    assert lines[0] == "stack traceback:"
    assert lines[1].startswith(f"\t{helper}:7: in function")
    assert lines[2].startswith(f"\t{name}:6: in function")
    assert len(lines) == 3, err.trace  # no busted, luassert or sandbox frames
