-- The assertion engine: assert.<modifiers>.<assertion>(...) chains, the
-- registry of assertions/modifiers, argument formatting and messages.
local say = require "say"
local astate = require "luassert.state"
local util = require "luassert.util"
local namespace = require "luassert.namespaces"
util.mark_internal(function() end)
util.mark_internal(say.get)

local obj -- the module table, referenced by the metatables below
local level_mt = {}

local function geterror(message_key, failure_message, args)
  if util.hastostring(failure_message) then
    failure_message = tostring(failure_message)
  elseif failure_message ~= nil then
    failure_message = astate.format_argument(failure_message)
  end
  local message = message_key and say(message_key, obj:format(args))
  if message and failure_message then
    message = failure_message .. "\n" .. message
  end
  return message or failure_message
end

local state_mt = {}

state_mt.__index = util.token_index

-- A chain is stored words plus what its calls set (assert.spy(s), assert.is_not(...)).
-- Calling the assertion runs the whole chain again each time, from the state the chain
-- had before its assertion words: `local eq = assert.are.equal; eq(1, 1); eq(1, 2)` fails
-- at the second call, and a stored `assert.is_not.equal` stays negated.
state_mt.__call = function(self, ...)
  local keys = util.extract_keys("assertion", self.tokens)
  local assertion
  for _, key in ipairs(keys) do
    assertion = namespace.assertion[key] or assertion
  end
  local arguments = util.make_arglist(...)
  if assertion then
    self.mod = rawget(self, "base_mod") ~= false
    for _, key in ipairs(keys) do
      local m = namespace.modifier[key]
      if m then m.callback(self) end
    end
    local ok, retargs = assertion.callback(self, arguments, 1)
    if (not ok) == self.mod then
      local key = self.mod and assertion.positive_message or assertion.negative_message
      local err = geterror(key, rawget(self, "failure_message"), arguments)
      util.fail(err or "assertion failed!", rawget(self, "level_skip"))
    end
    if retargs then return util.unpack(retargs) end
    return ...
  end
  self.tokens = {}
  self.mod = rawget(self, "base_mod") ~= false
  for _, key in ipairs(keys) do
    local m = namespace.modifier[key]
    if m then m.callback(self, arguments, 1) end
  end
  self.base_mod = self.mod
  return self
end

obj = {
  --- A fresh chain state (what assert.<anything> starts from).
  state = function() return setmetatable({ mod = true, base_mod = true, tokens = {} }, state_mt) end,

  --- Registers an assertion, modifier or matcher under name.
  register = function(self, nspace, name, callback, positive_message, negative_message)
    local lname = name:lower()
    namespace[nspace] = namespace[nspace] or {}
    namespace[nspace][lname] = {
      callback = callback,
      name = lname,
      positive_message = positive_message,
      negative_message = negative_message,
    }
  end,

  unregister = function(self, nspace, name)
    namespace[nspace] = namespace[nspace] or {}
    namespace[nspace][name:lower()] = nil
  end,

  add_formatter = function(self, callback) astate.add_formatter(callback) end,
  remove_formatter = function(self, callback) astate.remove_formatter(callback) end,

  --- Formats args[1..n] in place (unless listed in args.nofmt) for messages.
  format = function(self, args)
    local nofmt = args.nofmt or {}
    local fmtargs = args.fmtargs or {}
    for i = 1, (args.n or #args) do
      if not nofmt[i] then
        local val = args[i]
        local s = astate.format_argument(val, nil, fmtargs[i])
        if s == nil then s = tostring(val) end
        args[i] = s
      end
    end
    return args
  end,

  set_parameter = function(self, name, value) astate.set_parameter(name, value) end,
  get_parameter = function(self, name) return astate.get_parameter(name) end,
  add_spy = function(self, s) astate.add_spy(s) end,
  snapshot = function(self) return astate.snapshot() end,

  --- An error level for assert(v, msg, level): report that many frames out.
  level = function(self, level) return setmetatable({ level = level }, level_mt) end,
  get_level = function(self, level)
    if getmetatable(level) ~= level_mt then return nil end
    return level.level
  end,
}

local module_mt = {
  --- assert(v, message, level): Lua's assert, raising a failure.
  __call = function(self, ...)
    local v, message, level = ...
    if not v then
      local lvl = obj:get_level(level)
      util.fail(message == nil and "assertion failed!" or message, lvl and lvl - 1 or nil)
    end
    return ...
  end,
  __index = function(self, key)
    return obj.state()[key]
  end,
}

return setmetatable(obj, module_mt)
