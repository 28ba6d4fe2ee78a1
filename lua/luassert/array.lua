-- assert.array(t).has.no.holes([length]): checks a list for nil gaps.
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local assert = require "luassert.assert"
local util = require "luassert.util"
util.mark_internal(function() end)

local KEY = "__array_state"

local function array(state, args)
  if args.n < 1 then error("No array provided to the array-modifier", 3) end
  if rawget(state, KEY) ~= nil then error("Array already set", 3) end
  rawset(state, KEY, args[1])
  return state
end

local function holes(state, args)
  local length = args[1]
  local arr = rawget(state, KEY)
  if arr == nil then error("No array set, please use the array modifier to set the array to validate", 3) end
  if length == nil then
    length = 0
    for i in each_pair(arr) do
      if type(i) == "number" and i > length and math.floor(i) == i then length = i end
    end
  end
  if type(length) ~= "number" then
    error("expected array length to be of type 'number', got: " .. tostring(length), 3)
  end
  local missing
  for i = 1, length do
    if arr[i] == nil then
      missing = i
      break
    end
  end
  args[1] = missing
  args.n = missing and 1 or 0
  return missing ~= nil, { missing }
end

assert:register("assertion", "holes", holes, "assertion.array_holes.positive", "assertion.array_holes.negative")
assert:register("modifier", "array", array)

return true
