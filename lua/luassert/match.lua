-- Argument matchers for called_with/returned_with: match._ (anything),
-- match.is_string(), match.is_not_nil(), match.is_same(x), ...
local namespace = require "luassert.namespaces"
local util = require "luassert.util"
util.mark_internal(function() end)

local matcher_mt = {
  __call = function(self, value) return self.callback(value) == self.mod end,
}

local state_mt = {}

state_mt.__index = util.token_index

-- Like assert's chains: a stored `local m = match.is_string` makes a matcher per call.
state_mt.__call = function(self, ...)
  local keys = util.extract_keys("matcher", self.tokens)
  local matcher
  for _, key in ipairs(keys) do
    matcher = namespace.matcher[key] or matcher
  end
  local arguments = util.make_arglist(...)
  self.mod = rawget(self, "base_mod") ~= false
  if matcher then
    for _, key in ipairs(keys) do
      local m = namespace.modifier[key]
      if m then m.callback(self) end
    end
    local fn = matcher.callback(self, arguments, 1)
    return setmetatable({ name = matcher.name, mod = self.mod, callback = fn, arguments = arguments },
      matcher_mt)
  end
  self.tokens = {}
  for _, key in ipairs(keys) do
    local m = namespace.modifier[key]
    if m then m.callback(self, arguments, 1) end
  end
  self.base_mod = self.mod
  return self
end

local match = {
  _ = setmetatable({ name = "_", mod = true, callback = function() return true end,
                    arguments = util.make_arglist() }, matcher_mt),

  state = function() return setmetatable({ mod = true, base_mod = true, tokens = {} }, state_mt) end,

  is_matcher = function(obj)
    return type(obj) == "table" and getmetatable(obj) == matcher_mt
  end,

  is_ref_matcher = function(obj)
    return type(obj) == "table" and getmetatable(obj) == matcher_mt and obj.name == "ref"
  end,
}

return setmetatable(match, {
  __index = function(self, key) return self.state()[key] end,
})
