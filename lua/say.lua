-- say: tiny message registry used by luassert (and by specs that register
-- their own assertions), so assertion texts live in one table per language.
local say = {}

local registry = { en = {} }
local current = "en"
local fallback = "en"

--- Selects the language used by later lookups; creates it when new.
function say:set_namespace(ns)
  current = ns
  if registry[ns] == nil then registry[ns] = {} end
end

--- Registers (or replaces) the template for key in the current language.
function say:set(key, value)
  registry[current][key] = value
end

--- Changes the language used when a key is missing in the current one.
function say:set_fallback(ns)
  fallback = ns
  if registry[ns] == nil then registry[ns] = {} end
end

--- Returns the raw template for key, or nil.
function say:get(key)
  local str = registry[current][key]
  if str == nil then str = registry[fallback][key] end
  return str
end

local function render(self, key, vars)
  local str = self:get(key)
  if str == nil then return nil end
  str = tostring(str)
  if vars == nil then return str end
  local strings = {}
  local n = vars.n or #vars
  for i = 1, n do
    strings[i] = tostring(vars[i])
  end
  if n == 0 then return str end
  return (str:format(unpack(strings, 1, n)))
end

return setmetatable(say, { __call = render })
