-- Spies: callables that record their calls and return values, and the
-- assertions that inspect them (assert.spy(s).was.called_with(...)).
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local assert = require "luassert.assert"
local util = require "luassert.util"
util.mark_internal(function() end)

local spy_mt = {
  __call = function(self, ...)
    local arguments = util.make_arglist(...)
    self.calls[#self.calls + 1] = util.copyargs(arguments)
    local function record(...)
      local returned = util.make_arglist(...)
      self.returnvals[#self.returnvals + 1] = util.copyargs(returned)
      return ...
    end
    return record(self.callback(...))
  end,
}

local spy = {}

local methods = {
  revert = function(self)
    if not self.reverted then
      if self.target_table ~= nil and self.target_key ~= nil then
        self.target_table[self.target_key] = self.callback
      end
      self.reverted = true
    end
    return self.callback
  end,

  clear = function(self)
    self.calls = {}
    self.returnvals = {}
    return self
  end,

  called = function(self, times, compare)
    local n = #self.calls
    if times or compare then
      compare = compare or function(count, expected) return count == expected end
      return compare(n, times), n
    end
    return n > 0, n
  end,

  --- true and the newest matching call's arguments, or false and the last call's (nil
  --- when never called): what the failure message shows.
  called_with = function(self, args)
    local found = util.matchargs(self.calls, args)
    if found then return true, found.vals end
    local last = self.calls[#self.calls]
    return false, last and last.vals
  end,

  returned_with = function(self, args)
    local found = util.matchargs(self.returnvals, args)
    if found then return true, found.vals end
    local last = self.returnvals[#self.returnvals]
    return false, last and last.vals
  end,
}

--- A spy wrapping callback (a no-op when nil).
function spy.new(callback)
  if callback == nil then callback = function() end end
  if not util.callable(callback) then
    util.error("Cannot spy on type '" .. type(callback) .. "', only on functions or callable elements")
  end
  local s = setmetatable({ calls = {}, returnvals = {}, callback = callback }, spy_mt)
  for name, fn in each_pair(methods) do s[name] = fn end
  assert:add_spy(s)
  return s
end

function spy.is_spy(obj)
  return type(obj) == "table" and getmetatable(obj) == spy_mt
end

--- Replaces t[key] by a spy on it; revert() puts the original back.
function spy.on(target_table, target_key)
  local s = spy.new(target_table[target_key])
  target_table[target_key] = s
  s.target_table = target_table
  s.target_key = target_key
  return s
end

local function set_spy(state, arguments)
  state.payload = arguments[1]
  if arguments[2] ~= nil then state.failure_message = arguments[2] end
end

local function payload_of(state, name)
  local payload = rawget(state, "payload")
  if type(payload) == "table" and payload[name] then return payload end
  if type(payload) == "function" then
    util.error("When calling 'spy(aspy)', 'aspy' must not be the original function, but the spy function replacing the original")
  end
  util.error("'" .. name .. "' must be chained after 'spy(aspy)'")
end

-- The message shows (seen, expected): the call that matched or the last one, and the
-- arguments asked for; both as "(values list) (...)".
local function with_seen(state, arguments, name)
  local s = payload_of(state, name)
  local holds, seen = s[name](s, arguments)
  local expected = util.shallowcopy(arguments)
  util.cleararglist(arguments)
  util.tinsert(arguments, 1, seen)
  util.tinsert(arguments, 2, expected)
  return holds
end

local function returned_with(state, arguments)
  return with_seen(state, arguments, "returned_with")
end

local function called_with(state, arguments)
  return with_seen(state, arguments, "called_with")
end

local function called(state, arguments, _, compare)
  local times = arguments[1]
  if not times and not state.mod then
    state.mod = true
    times = 0
  end
  local ok, count = payload_of(state, "called"):called(times, compare)
  arguments[1] = tostring(times or ">0")
  util.tinsert(arguments, 2, tostring(count))
  arguments.nofmt = arguments.nofmt or {}
  arguments.nofmt[1] = true
  arguments.nofmt[2] = true
  return ok
end

local function comparing(cmp)
  return function(state, arguments, level) return called(state, arguments, level, cmp) end
end

assert:register("modifier", "spy", set_spy)
assert:register("assertion", "returned_with", returned_with,
  "assertion.returned_with.positive", "assertion.returned_with.negative")
assert:register("assertion", "called_with", called_with,
  "assertion.called_with.positive", "assertion.called_with.negative")
assert:register("assertion", "called", called, "assertion.called.positive", "assertion.called.negative")
assert:register("assertion", "called_at_least", comparing(function(c, e) return c >= e end),
  "assertion.called_at_least.positive", "assertion.called_less_than.positive")
assert:register("assertion", "called_at_most", comparing(function(c, e) return c <= e end),
  "assertion.called_at_most.positive", "assertion.called_more_than.positive")
assert:register("assertion", "called_more_than", comparing(function(c, e) return c > e end),
  "assertion.called_more_than.positive", "assertion.called_at_most.positive")
assert:register("assertion", "called_less_than", comparing(function(c, e) return c < e end),
  "assertion.called_less_than.positive", "assertion.called_at_least.positive")

return setmetatable(spy, { __call = function(_, ...) return spy.new(...) end })
