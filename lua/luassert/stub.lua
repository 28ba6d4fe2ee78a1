-- Stubs: spies that replace t[key] with canned behaviour (returns, invokes,
-- on_call_with) until revert() restores the original value.
local assert = require "luassert.assert"
local spy = require "luassert.spy"
local util = require "luassert.util"
util.mark_internal(function() end)

local stub = {}

--- stub.new(t, key, ...): t[key] becomes a spy returning ... (or calling
--- the single callable argument). Without t and key, a blank stub.
function stub.new(object, key, ...)
  if object == nil and key == nil then
    object, key = {}, ""
  end
  local return_values = util.pack(...)
  if type(object) ~= "table" or key == nil then
    util.fail("stub.new(): Can only create stub on a table key, call with 2 params; table, key")
  end
  if object[key] ~= nil and not util.callable(object[key]) then
    util.fail("stub.new(): The element for which to create a stub must either be callable, or be nil")
  end
  local old_elem = object[key]

  local fn = return_values.n == 1 and util.callable(return_values[1]) and return_values[1]
  local defaultfunc = fn or function() return util.unpack(return_values) end
  local oncalls, callbacks = {}, {}

  object[key] = function(...)
    local found = util.matchoncalls(oncalls, util.make_arglist(...))
    if found then return callbacks[found](...) end
    return defaultfunc(...)
  end
  local s = spy.on(object, key)
  local spy_revert = s.revert

  s.revert = function(self)
    if not self.reverted then
      spy_revert(self)
      object[key] = old_elem
      self.reverted = true
    end
    return old_elem
  end

  s.returns = function(...)
    local values = util.pack(...)
    defaultfunc = function() return util.unpack(values) end
    return s
  end

  s.invokes = function(func)
    defaultfunc = function(...) return func(...) end
    return s
  end

  s.by_default = { returns = s.returns, invokes = s.invokes }

  s.on_call_with = function(...)
    local match_args = util.copyargs(util.make_arglist(...))
    return {
      returns = function(...)
        local values = util.pack(...)
        oncalls[#oncalls + 1] = match_args
        callbacks[match_args] = function() return util.unpack(values) end
        return s
      end,
      invokes = function(func)
        oncalls[#oncalls + 1] = match_args
        callbacks[match_args] = function(...) return func(...) end
        return s
      end,
    }
  end

  return s
end

local function set_stub(state, arguments)
  state.payload = arguments[1]
  state.failure_message = arguments[2]
end

assert:register("modifier", "stub", set_stub)

return setmetatable(stub, { __call = function(_, ...) return stub.new(...) end })
