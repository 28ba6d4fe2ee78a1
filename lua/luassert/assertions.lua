-- The standard assertions (same, equal, truthy, error, near, matches, ...).
-- Each takes (state, arguments) and returns whether it holds; it may
-- reorder/annotate arguments so the message shows "Passed in" first.
local assert = require "luassert.assert"
local astate = require "luassert.state"
local util = require "luassert.util"
util.mark_internal(function() end)

local function format(val)
  return astate.format_argument(val) or tostring(val)
end

local function set_failure_message(state, message)
  if message ~= nil then state.failure_message = message end
end

local check, argtolittle, badargtype = util.check, util.argtolittle, util.badargtype

local function unique(state, arguments)
  local list = arguments[1]
  local deep
  if type(arguments[2]) == "boolean" or (arguments[2] == nil and arguments.n > 2) then
    deep = arguments[2]
    set_failure_message(state, arguments[3])
  else
    if type(arguments[3]) == "boolean" then deep = arguments[3] end
    set_failure_message(state, arguments[2])
  end
  return util.is_unique(list, deep)
end

local function near(state, arguments)
  check(arguments.n > 2, argtolittle("near", 3, arguments.n))
  local expected = tonumber(arguments[1])
  local actual = tonumber(arguments[2])
  local tolerance = tonumber(arguments[3])
  local numbertype = "number or object convertible to a number"
  check(expected, badargtype(1, "near", numbertype, format(arguments[1])))
  check(actual, badargtype(2, "near", numbertype, format(arguments[2])))
  check(tolerance, badargtype(3, "near", numbertype, format(arguments[3])))
  util.tinsert(arguments, 1, util.tremove(arguments, 2))
  arguments[3] = tolerance
  arguments.nofmt = arguments.nofmt or {}
  arguments.nofmt[3] = true
  set_failure_message(state, arguments[4])
  return actual >= expected - tolerance and actual <= expected + tolerance
end

-- Pulls an optional failure message out of the (init, plain) tail.
local function take_message(arguments)
  local argnum = 3
  for i = 3, arguments.n do
    local a = arguments[i]
    if a and type(a) ~= "boolean" and not tonumber(a) then
      if i == 3 then argnum = argnum + 1 end
      return util.tremove(arguments, i), argnum
    end
  end
  return nil, argnum
end

local function matches(state, arguments)
  check(arguments.n > 1, argtolittle("matches", 2, arguments.n))
  local pattern = arguments[1]
  local actual
  if util.hastostring(arguments[2]) or type(arguments[2]) == "number" then
    actual = tostring(arguments[2])
  end
  local message, argnum = take_message(arguments)
  local init, plain = arguments[3], arguments[4]
  check(type(pattern) == "string", badargtype(1, "matches", "string", type(arguments[1])))
  check(actual, badargtype(2, "matches", "string or object convertible to a string", format(arguments[2])))
  check(init == nil or tonumber(init), badargtype(argnum, "matches", "number", type(arguments[3])))
  util.tinsert(arguments, 1, util.tremove(arguments, 2))
  set_failure_message(state, message)
  if plain then
    local ok = actual:find(pattern, init, plain) ~= nil
    return ok, ok and { pattern } or {}
  end
  local retargs = { actual:match(pattern, init) }
  return retargs[1] ~= nil, retargs
end

local function equals(state, arguments)
  check(arguments.n > 1, argtolittle("equals", 2, arguments.n))
  local result = arguments[1] == arguments[2]
  util.tinsert(arguments, 1, util.tremove(arguments, 2))
  set_failure_message(state, arguments[3])
  return result
end

local function same(state, arguments)
  check(arguments.n > 1, argtolittle("same", 2, arguments.n))
  if type(arguments[1]) == "table" and type(arguments[2]) == "table" then
    local result, crumbs = util.deepcompare(arguments[1], arguments[2], true)
    util.tinsert(arguments, 1, util.tremove(arguments, 2))
    arguments.fmtargs = arguments.fmtargs or {}
    arguments.fmtargs[1] = { crumbs = crumbs }
    arguments.fmtargs[2] = { crumbs = crumbs }
    set_failure_message(state, arguments[3])
    return result
  end
  local result = arguments[1] == arguments[2]
  util.tinsert(arguments, 1, util.tremove(arguments, 2))
  set_failure_message(state, arguments[3])
  return result
end

local function truthy(state, arguments)
  set_failure_message(state, arguments[2])
  return arguments[1] ~= false and arguments[1] ~= nil
end

local function falsy(state, arguments)
  return not truthy(state, arguments)
end

-- Error values with a "file:line: " prefix are compared without it.
local function strip_position(err)
  if type(err) == "string" then return (err:gsub("^.-:%d+: ", "", 1)) end
  return err
end

local function has_error(state, arguments)
  local retargs = util.shallowcopy(arguments)
  local func, err_expected, failure_message = arguments[1], arguments[2], arguments[3]
  check(util.callable(func), badargtype(1, "error", "function or callable object", type(func)))
  local ok, err_actual = pcall(func)
  err_actual = strip_position(err_actual)
  retargs[1] = err_actual
  arguments.nofmt = {}
  arguments.n = 2
  arguments[1] = ok and "(no error)" or err_actual
  arguments[2] = err_expected == nil and "(error)" or err_expected
  arguments.nofmt[1] = ok
  arguments.nofmt[2] = err_expected == nil
  set_failure_message(state, failure_message)
  if ok or err_expected == nil then return not ok, retargs end
  if type(err_expected) == "string" then
    if util.hastostring(err_actual) then
      err_actual = tostring(err_actual)
      retargs[1] = err_actual
    end
    if type(err_actual) == "string" then return err_expected == err_actual, retargs end
  elseif type(err_expected) == "number" then
    if type(err_actual) == "string" then
      return tostring(err_expected) == tostring(tonumber(err_actual)), retargs
    end
  end
  return same(state, { err_expected, err_actual, n = 2 }), retargs
end

local function error_matches(state, arguments)
  local retargs = util.shallowcopy(arguments)
  local func, pattern = arguments[1], arguments[2]
  check(arguments.n > 1, argtolittle("error_matches", 2, arguments.n))
  check(util.callable(func), badargtype(1, "error_matches", "function or callable object", type(func)))
  check(pattern == nil or type(pattern) == "string", badargtype(2, "error", "string", type(pattern)))
  local failure_message, argnum = take_message(arguments)
  local init, plain = arguments[3], arguments[4]
  check(init == nil or tonumber(init), badargtype(argnum, "matches", "number", type(arguments[3])))
  local ok, err_actual = pcall(func)
  err_actual = strip_position(err_actual)
  retargs[1] = err_actual
  arguments.nofmt = {}
  arguments.n = 2
  arguments[1] = ok and "(no error)" or err_actual
  arguments[2] = pattern
  arguments.nofmt[1] = ok
  arguments.nofmt[2] = false
  set_failure_message(state, failure_message)
  if ok then return false, retargs end
  if err_actual == nil and pattern == nil then return true, {} end
  if util.hastostring(err_actual) then
    err_actual = tostring(err_actual)
    retargs[1] = err_actual
  end
  if type(err_actual) == "string" then
    local found, caps
    if plain then
      caps = { pattern }
      found = err_actual:find(pattern, init, plain) ~= nil
    else
      caps = { err_actual:match(pattern, init) }
      found = caps[1] ~= nil
    end
    if found then retargs = caps end
    return found, retargs
  end
  return false, retargs
end

local function is_true(state, arguments)
  util.tinsert(arguments, 2, true)
  set_failure_message(state, arguments[3])
  return arguments[1] == arguments[2]
end

local function is_false(state, arguments)
  util.tinsert(arguments, 2, false)
  set_failure_message(state, arguments[3])
  return arguments[1] == arguments[2]
end

local function is_type(state, arguments, etype)
  util.tinsert(arguments, 2, "type " .. etype)
  arguments.nofmt = arguments.nofmt or {}
  arguments.nofmt[2] = true
  set_failure_message(state, arguments[3])
  return arguments.n > 1 and type(arguments[1]) == etype
end

local function returned_arguments(state, arguments)
  arguments[1] = tostring(arguments[1])
  arguments[2] = tostring(arguments.n - 1)
  arguments.nofmt = arguments.nofmt or {}
  arguments.nofmt[1] = true
  arguments.nofmt[2] = true
  if arguments.n < 2 then arguments.n = 2 end
  return arguments[1] == arguments[2]
end

local function set_message(state, arguments)
  state.failure_message = arguments[1]
end

local same_msgs = { "assertion.same.positive", "assertion.same.negative" }
assert:register("modifier", "message", set_message)
assert:register("assertion", "true", is_true, same_msgs[1], same_msgs[2])
assert:register("assertion", "false", is_false, same_msgs[1], same_msgs[2])
for _, t in ipairs({ "boolean", "number", "string", "table", "nil", "userdata", "function", "thread" }) do
  assert:register("assertion", t, function(state, arguments) return is_type(state, arguments, t) end,
    same_msgs[1], same_msgs[2])
end
assert:register("assertion", "returned_arguments", returned_arguments,
  "assertion.returned_arguments.positive", "assertion.returned_arguments.negative")
assert:register("assertion", "same", same, same_msgs[1], same_msgs[2])
for _, name in ipairs({ "matches", "match" }) do
  assert:register("assertion", name, matches, "assertion.matches.positive", "assertion.matches.negative")
end
assert:register("assertion", "near", near, "assertion.near.positive", "assertion.near.negative")
for _, name in ipairs({ "equals", "equal" }) do
  assert:register("assertion", name, equals, "assertion.equals.positive", "assertion.equals.negative")
end
assert:register("assertion", "unique", unique, "assertion.unique.positive", "assertion.unique.negative")
for _, name in ipairs({ "error", "errors" }) do
  assert:register("assertion", name, has_error, "assertion.error.positive", "assertion.error.negative")
end
for _, name in ipairs({ "error_matches", "error_match", "matches_error", "match_error" }) do
  assert:register("assertion", name, error_matches, "assertion.error.positive", "assertion.error.negative")
end
assert:register("assertion", "truthy", truthy, "assertion.truthy.positive", "assertion.truthy.negative")
assert:register("assertion", "falsy", falsy, "assertion.falsy.positive", "assertion.falsy.negative")

return true
