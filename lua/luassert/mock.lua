-- mock(t[, dostub]): every function reachable in t becomes a spy (or a
-- stub), so a whole module can be watched; mock.revert undoes it.
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local spy = require "luassert.spy"
local stub = require "luassert.stub"
local util = require "luassert.util"
util.mark_internal(function() end)

local function apply(object, action)
  if type(object) ~= "table" then return end
  if spy.is_spy(object) then return object[action](object) end
  for _, v in each_pair(object) do apply(v, action) end
  return object
end

local mock = {}

function mock.new(object, dostub, func, self, key)
  local visited = {}
  local function do_mock(obj, parent, k)
    local t = type(obj)
    if t == "table" then
      if spy.is_spy(obj) or visited[obj] then return obj end
      visited[obj] = true
      for k2, v in each_pair(obj) do obj[k2] = do_mock(v, obj, k2) end
      return obj
    elseif t == "function" then
      if dostub then return stub(parent, k, func) end
      if parent == nil then return spy.new(obj) end
      return spy.on(parent, k)
    end
    return obj
  end
  return do_mock(object, self, key)
end

function mock.clear(object) return apply(object, "clear") end
function mock.revert(object) return apply(object, "revert") end

return setmetatable(mock, { __call = function(_, ...) return mock.new(...) end })
