-- Chain words: is/are/was/has/does read well and change nothing; not/no
-- negate the assertion that follows.
local assert = require "luassert.assert"
local util = require "luassert.util"
util.mark_internal(function() end)

local function is(state) return state end

local function is_not(state)
  state.mod = not state.mod
  return state
end

for _, word in ipairs({ "is", "are", "was", "has", "does" }) do
  assert:register("modifier", word, is)
end
assert:register("modifier", "not", is_not)
assert:register("modifier", "no", is_not)

return true
