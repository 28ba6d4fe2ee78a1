-- How values appear in assertion messages: "(number) 1", "(string) 'x'",
-- "(table: 0x...) { ... }" with the first difference marked by "*".
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local assert = require "luassert.assert"
local util = require "luassert.util"
util.mark_internal(function() end)

-- tostring, but numbers with full precision (and NaN/Inf spelled out).
local function tostr(v)
  if type(v) ~= "number" then return tostring(v) end
  if v ~= v then return "NaN" end
  if v == 1 / 0 then return "Inf" end
  if v == -1 / 0 then return "-Inf" end
  return string.format("%.20g", v)
end

local function fmt_string(v)
  if type(v) == "string" then return string.format("(string) '%s'", v) end
end

local function fmt_number(v)
  if type(v) == "number" then return "(number) " .. tostr(v) end
end

local function fmt_boolean(v)
  if type(v) == "boolean" then return "(boolean) " .. tostring(v) end
end

local function fmt_nil(v)
  if v == nil then return "(nil)" end
end

local type_priorities = {
  number = 1, boolean = 2, string = 3, table = 4, ["function"] = 5, userdata = 6, thread = 7,
}

local function sorted_keys(t)
  local keys, n = {}, 0
  for k in each_pair(t) do
    n = n + 1
    keys[n] = k
  end
  local length = #t
  local function priority(k)
    if type(k) == "number" and k >= 1 and k <= length and math.floor(k) == k then return 0 end
    return type_priorities[type(k)] or 8
  end
  table.sort(keys, function(a, b)
    local pa, pb = priority(a), priority(b)
    if pa ~= pb then return pa < pb end
    local ta = type(a)
    if ta == "string" or ta == "number" then return a < b end
    if ta == "boolean" then return a == true and b == false end
    return false
  end)
  return keys, n
end

-- "(table: 0x...) " with the raw address even when __tostring is set.
local function table_desc(t)
  local mt = getmetatable(t)
  if mt == nil then return "(" .. tostring(t) .. ") " end
  if type(mt) ~= "table" or not pcall(setmetatable, t, mt) then return "(table) " end
  setmetatable(t, nil)
  local desc = "(" .. tostring(t) .. ") "
  setmetatable(t, mt)
  return desc
end

local function fmt_table(arg, fmtargs)
  if type(arg) ~= "table" then return end
  local tmax = assert:get_parameter("TableFormatLevel")
  local showrec = assert:get_parameter("TableFormatShowRecursion")
  local errchar = assert:get_parameter("TableErrorHighlightCharacter") or ""
  local crumbs = fmtargs and fmtargs.crumbs or {}
  local cache = {}

  local function ft(t, l, with_crumbs)
    if showrec and cache[t] and cache[t] > 0 then return "{ ... recursive }" end
    if next(t) == nil then return "{ }" end
    if l > tmax and tmax >= 0 then return "{ ... more }" end
    local parts = { "{" }
    local keys, n = sorted_keys(t)
    cache[t] = (cache[t] or 0) + 1
    local crumb = crumbs[#crumbs - l + 1]
    for i = 1, n do
      local k = keys[i]
      local v = t[k]
      local marked = with_crumbs and k == crumb
      if type(v) == "table" then
        v = ft(v, l + 1, marked)
      elseif type(v) == "string" then
        v = "'" .. v .. "'"
      end
      local ch = marked and errchar or ""
      parts[#parts + 1] = string.format("\n%s%s[%s] = %s", string.rep(" ", l * 2 - #ch), ch, tostr(k), tostr(v))
    end
    cache[t] = cache[t] - 1
    return table.concat(parts) .. " }"
  end

  return table_desc(arg) .. ft(arg, 1, true)
end

local function fmt_function(v)
  if type(v) ~= "function" then return end
  local info = util.getinfo(v)
  if not info then return tostring(v) end
  return string.format("%s @ line %s in %s", tostring(v), tostring(info.linedefined), tostring(info.source))
end

local function fmt_userdata(v)
  if type(v) == "userdata" then return string.format("(userdata) '%s'", tostring(v)) end
end

local function fmt_thread(v)
  if type(v) == "thread" then return string.format("(thread) '%s'", tostring(v)) end
end

local function format_one(v)
  return assert:format({ v, n = 1 })[1]
end

-- "(matcher) is.same((number) 1)", "(matcher) no.truthy()", "(matcher) _ *anything*"
local function fmt_matcher(v)
  local match = require "luassert.match"
  if not match.is_matcher(v) then return end
  if v.name == "_" then return "(matcher) _ *anything*" end
  local args, list = {}, v.arguments or { n = 0 }
  for i = 1, list.n or #list do args[i] = format_one(list[i]) end
  return "(matcher) " .. (v.mod and "is." or "no.") .. tostring(v.name) .. "(" .. table.concat(args, ", ") .. ")"
end

-- A spy's call or results: "(values list) ((number) 1, (string) 'x')"
local function fmt_arglist(v)
  if not util.is_arglist(v) then return end
  local parts = {}
  for i = 1, v.n or #v do parts[i] = format_one(v[i]) end
  return "(values list) (" .. table.concat(parts, ", ") .. ")"
end

assert:add_formatter(fmt_string)
assert:add_formatter(fmt_number)
assert:add_formatter(fmt_boolean)
assert:add_formatter(fmt_nil)
assert:add_formatter(fmt_table)
assert:add_formatter(fmt_function)
assert:add_formatter(fmt_userdata)
assert:add_formatter(fmt_thread)
assert:add_formatter(fmt_matcher)
assert:add_formatter(fmt_arglist)
assert:set_parameter("TableFormatLevel", 3)
assert:set_parameter("TableFormatShowRecursion", false)
assert:set_parameter("TableErrorHighlightCharacter", "*")
assert:set_parameter("TableErrorHighlightColor", "none")

return true
