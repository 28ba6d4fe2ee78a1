-- The standard matchers (types, truthy/falsy, equals, same, ref, matches,
-- near, unique) and the composites all_of/any_of/none_of.
local assert = require "luassert.assert"
local astate = require "luassert.state"
local match = require "luassert.match"
local util = require "luassert.util"
util.mark_internal(function() end)

local function format(val)
  return astate.format_argument(val) or tostring(val)
end

local check, argtolittle, badargtype = util.check, util.argtolittle, util.badargtype

local function unique(state, arguments)
  local deep = arguments[1]
  return function(list) return util.is_unique(list, deep) end
end

local function near(state, arguments)
  check(arguments.n > 1, argtolittle("near", 2, arguments.n))
  local expected, tolerance = tonumber(arguments[1]), tonumber(arguments[2])
  local numbertype = "number or object convertible to a number"
  check(expected, badargtype(1, "near", numbertype, format(arguments[1])))
  check(tolerance, badargtype(2, "near", numbertype, format(arguments[2])))
  return function(value)
    local actual = tonumber(value)
    if not actual then return false end
    return actual >= expected - tolerance and actual <= expected + tolerance
  end
end

local function matches(state, arguments)
  check(arguments.n > 0, argtolittle("matches", 1, arguments.n))
  local pattern, init, plain = arguments[1], arguments[2], arguments[3]
  check(type(pattern) == "string", badargtype(1, "matches", "string", type(arguments[1])))
  check(init == nil or tonumber(init), badargtype(2, "matches", "number", type(arguments[2])))
  return function(value)
    local t = type(value)
    if t == "string" or t == "number" or (t == "table" and util.hastostring(value)) then
      return tostring(value):find(pattern, init, plain) ~= nil
    end
    return false
  end
end

local function equals(state, arguments)
  check(arguments.n > 0, argtolittle("equals", 1, arguments.n))
  local expected = arguments[1]
  return function(value) return value == expected end
end

local function same(state, arguments)
  check(arguments.n > 0, argtolittle("same", 1, arguments.n))
  local expected = arguments[1]
  return function(value)
    if type(value) == "table" and type(expected) == "table" then
      return (util.deepcompare(value, expected, true))
    end
    return value == expected
  end
end

local function ref(state, arguments)
  local t = type(arguments[1])
  check(arguments.n > 0, argtolittle("ref", 1, arguments.n))
  check(t == "table" or t == "function" or t == "thread" or t == "userdata",
    badargtype(1, "ref", "object", t))
  local expected = arguments[1]
  return function(value) return value == expected end
end

local function truthy() return function(v) return v ~= false and v ~= nil end end
local function falsy() return function(v) return v == false or v == nil end end
local function is_true() return function(v) return v == true end end
local function is_false() return function(v) return v == false end end

local function composite(name, decide)
  return function(state, arguments)
    check(arguments.n > 0, argtolittle(name, 1, arguments.n))
    for i = 1, arguments.n do
      check(match.is_matcher(arguments[i]), badargtype(1, name, "matcher", type(arguments[i])))
    end
    return function(value) return decide(arguments, value) end
  end
end

assert:register("matcher", "true", is_true)
assert:register("matcher", "false", is_false)
for _, t in ipairs({ "nil", "boolean", "number", "string", "table", "function", "userdata", "thread" }) do
  assert:register("matcher", t, function() return function(v) return type(v) == t end end)
end
assert:register("matcher", "ref", ref)
assert:register("matcher", "same", same)
assert:register("matcher", "matches", matches)
assert:register("matcher", "match", matches)
assert:register("matcher", "near", near)
assert:register("matcher", "equals", equals)
assert:register("matcher", "equal", equals)
assert:register("matcher", "unique", unique)
assert:register("matcher", "truthy", truthy)
assert:register("matcher", "falsy", falsy)

assert:register("matcher", "none_of", composite("none", function(ms, v)
  for _, m in ipairs(ms) do if m(v) then return false end end
  return true
end))
assert:register("matcher", "any_of", composite("any", function(ms, v)
  for _, m in ipairs(ms) do if m(v) then return true end end
  return false
end))
assert:register("matcher", "all_of", composite("all", function(ms, v)
  for _, m in ipairs(ms) do if not m(v) then return false end end
  return true
end))

return true
