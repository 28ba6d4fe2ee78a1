--- json: the one encoder for Lua values that leave a driver (status values, function
-- results and arguments, the interface document).
--
-- It checks what it encodes by the datastore guard's rules (DESIGN section 4): nil is
-- JSON null (callers that mean "delete" test for nil first), booleans, finite numbers,
-- valid UTF-8 strings, and tables that are arrays (keys exactly 1..n) or objects (string
-- keys), recursively. Refused values raise
--   <What> must be JSON encodable: <tostring(v)> is of unsupported type <type>
-- or a message of the same form naming the precise problem, followed by where the value
-- sits when that is not the root: " (at result.list[2])".
--
-- Tables are read through `pairs` (the sandbox's, which honours __pairs), so datastore
-- nodes encode like the plain tables they stand for. Object keys come out sorted (byte
-- order): equal values give equal text, and status compares by text.
-- Numbers: integral values below 2^53 in magnitude as integers, others in the shortest of
-- %.15g/%.16g/%.17g that reads back as the same number.
local caps = select(2, ...)
local raw = caps.raw

local type, tostring, error, tonumber, pairs, pcall =
  type, tostring, error, tonumber, pairs, pcall
local floor, huge = math.floor, math.huge
local S = raw.string
local byte, sub, find, format, slen, gsub, char = S.byte, S.sub, S.find, S.format, S.len, S.gsub, S.char
local tsort, tclear = raw.sort, raw.table_clear
local new_buffer = raw.buffer.new

local MAX_DEPTH = 100    -- as the datastore: deeper values could not be stored either

-- Tables are traversed with `iterate(t)`, never `pairs(t)`: LuaJIT compiles loops over a
-- variable named `pairs` or `next` as ITERN, and this LuaJIT can drop an element from such
-- a loop when a trace records next() right after the loop was despecialized (LuaJIT issue
-- #1510; see lua/datastore.lua). That is how `[x, x, y]` was once refused as a "sparse
-- array" and accepted on the retry (issue 12's hypothesis FlakyFailure).
local iterate = pairs

local M = {}

---------------------------------------------------------------------------------------------
-- Errors. The encoder keeps the keys from the root to the value being encoded in `where`
-- and builds a path only when it refuses something.
local what_text, root_name = "Values", nil
local where = {}

local function show(v)
  if type(v) ~= "string" then return tostring(v) end
  local s = v
  if slen(s) > 60 then s = sub(s, 1, 57) .. "..." end
  s = format("%q", s)
  s = gsub(s, "\\\n", "\\n")
  return (gsub(s, "[\128-\255]", function(c) return format("\\%d", byte(c)) end))
end

local function path_text(depth)
  local parts = { root_name or "value" }
  for i = 1, depth do
    local k = where[i]
    if type(k) == "number" then
      parts[#parts + 1] = "[" .. k .. "]"
    elseif find(k, "^[%a_][%w_]*$") then
      parts[#parts + 1] = "." .. k
    else
      parts[#parts + 1] = "[" .. show(k) .. "]"
    end
  end
  return raw.concat(parts)
end

local function fail(depth, problem)
  local at = ""
  if depth > 0 or root_name then at = " (at " .. path_text(depth) .. ")" end
  error(what_text .. " must be JSON encodable: " .. problem .. at, 0)
end

---------------------------------------------------------------------------------------------
-- Scalars.
local function utf8_ok(s)
  local i, n = 1, slen(s)
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    elseif c < 0xC2 then
      return false
    elseif c < 0xE0 then
      local c2 = byte(s, i + 1)
      if c2 == nil or c2 < 0x80 or c2 > 0xBF then return false end
      i = i + 2
    elseif c < 0xF0 then
      local c2, c3 = byte(s, i + 1, i + 2)
      if c3 == nil or c3 < 0x80 or c3 > 0xBF then return false end
      local lo, hi = 0x80, 0xBF
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
      if c2 < lo or c2 > hi then return false end
      i = i + 3
    elseif c < 0xF5 then
      local c2, c3, c4 = byte(s, i + 1, i + 3)
      if c4 == nil or c3 < 0x80 or c3 > 0xBF or c4 < 0x80 or c4 > 0xBF then return false end
      local lo, hi = 0x80, 0xBF
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
      if c2 < lo or c2 > hi then return false end
      i = i + 4
    else
      return false
    end
  end
  return true
end

local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
              ["\r"] = "\\r", ["\t"] = "\\t" }
for i = 0, 31 do
  local c = char(i)
  if not ESC[c] then ESC[c] = format("\\u%04x", i) end
end
local NEEDS_ESCAPE = '[%z\1-\31"\\]'

--- A JSON string literal for `s`, escaped but NOT checked for UTF-8: for text the caller
-- knows to be valid (identifiers, type names).
local function quote(s)
  if find(s, NEEDS_ESCAPE) then s = gsub(s, NEEDS_ESCAPE, ESC) end
  return '"' .. s .. '"'
end
M.quote = quote
M.utf8_ok = utf8_ok            -- shared with the datastore's guard and encoder
M.show = show                  -- how a refused value is shown in messages (datastore too)
M.ESC, M.NEEDS_ESCAPE = ESC, NEEDS_ESCAPE

-- quote() after the UTF-8 check; nil for invalid text
local function string_text(s)
  if find(s, "[\128-\255]") and not utf8_ok(s) then return nil end
  return quote(s)
end

--- JSON text of a finite number, nil for NaN and +-inf.
local function number_text(v)
  if v == floor(v) then
    if v > -9007199254740992 and v < 9007199254740992 then return format("%d", v) end
    if v == huge or v == -huge then return nil end
  elseif v ~= v then
    return nil
  end
  local s = format("%.15g", v)
  if tonumber(s) ~= v then
    s = format("%.16g", v)
    if tonumber(s) ~= v then s = format("%.17g", v) end
  end
  return s
end
M.number = number_text

---------------------------------------------------------------------------------------------
-- Tables.
local path_seen = {}         -- tables on the path from the root (cycle check)
local keys_pool = {}         -- key lists, one per depth, reused between calls
local pool_depth = 0         -- deepest key list in use so far
local aborted = false        -- the last table encoding raised: the scratch state is stale

-- "array", "object" or "empty" and the count, or raises naming the problem.
local function table_kind(t, depth)
  local n, nstr, maxi = 0, 0, 0
  for k in iterate(t) do
    n = n + 1
    local tk = type(k)
    if tk == "string" then
      nstr = nstr + 1
    elseif tk == "number" then
      if k - k ~= 0 or k < 1 or k ~= floor(k) then
        fail(depth, "key " .. tostring(k) .. " is not an array index (keys are strings, or exactly 1..n in arrays)")
      end
      if k > maxi then maxi = k end
    else
      fail(depth, "key " .. tostring(k) .. " is of unsupported type " .. tk)
    end
  end
  if n == 0 then return "empty", 0 end
  if nstr == n then return "object", n end
  if nstr > 0 then fail(depth, tostring(t) .. " mixes array indices and string keys") end
  if maxi ~= n then fail(depth, tostring(t) .. " is a sparse array (keys must be exactly 1..n)") end
  return "array", n
end

local put_value

local function put_table(buf, t, depth)
  if path_seen[t] then fail(depth, tostring(t) .. " contains itself (a cycle)") end
  if depth >= MAX_DEPTH then fail(depth, tostring(t) .. " is nested deeper than " .. MAX_DEPTH .. " levels") end
  local kind, n = table_kind(t, depth)
  if kind == "empty" then buf:put("{}") return end
  path_seen[t] = true
  local d1 = depth + 1
  if kind == "array" then
    buf:put("[")
    for i = 1, n do
      if i > 1 then buf:put(",") end
      where[d1] = i
      put_value(buf, t[i], d1)
    end
    buf:put("]")
  else
    local keys = keys_pool[d1]
    if keys == nil then
      keys = {}
      keys_pool[d1] = keys
      if d1 > pool_depth then pool_depth = d1 end
    end
    local nk = 0
    for k in iterate(t) do nk = nk + 1 keys[nk] = k end
    if nk > 1 then tsort(keys) end
    buf:put("{")
    for i = 1, nk do
      local k = keys[i]
      keys[i] = nil
      where[d1] = k
      local ks = string_text(k)
      if ks == nil then fail(depth, "key " .. show(k) .. " is not valid UTF-8") end
      if i > 1 then buf:put(",") end
      buf:put(ks, ":")
      put_value(buf, t[k], d1)
    end
    buf:put("}")
  end
  path_seen[t] = nil
end

function put_value(buf, v, depth)
  local tv = type(v)
  if tv == "string" then
    local s = string_text(v)
    if s == nil then fail(depth, show(v) .. " is not valid UTF-8") end
    buf:put(s)
  elseif tv == "number" then
    local s = number_text(v)
    if s == nil then fail(depth, tostring(v) .. " is not a finite number") end
    buf:put(s)
  elseif tv == "boolean" then
    buf:put(v and "true" or "false")
  elseif tv == "table" then
    put_table(buf, v, depth)
  elseif v == nil then   -- a value that vanished while being read (only via __pairs)
    buf:put("null")
  else
    fail(depth, tostring(v) .. " is of unsupported type " .. tv)
  end
end

local out = new_buffer()

local function encode_table(t)
  if aborted then
    tclear(path_seen)
    for i = 1, pool_depth do
      local keys = keys_pool[i]
      if keys then tclear(keys) end
    end
  end
  aborted = true
  out:reset()
  put_table(out, t, 0)
  aborted = false
  local s = out:tostring()
  out:reset()
  return s
end

---------------------------------------------------------------------------------------------
-- The interface.

--- JSON text of `v` ("null" for nil). Raises "<what> must be JSON encodable: ..." (what
-- defaults to "Values"); `name`, when given, starts the path in the message (e.g. the
-- status name), else paths start at "value" and the root itself is not located.
function M.encode(v, what, name)
  local tv = type(v)
  what_text, root_name = what or "Values", name
  if tv == "number" then
    local s = number_text(v)
    if s == nil then fail(0, tostring(v) .. " is not a finite number") end
    return s
  elseif tv == "string" then
    local s = string_text(v)
    if s == nil then fail(0, show(v) .. " is not valid UTF-8") end
    return s
  elseif tv == "boolean" then
    return v and "true" or "false"
  elseif v == nil then
    return "null"
  elseif tv == "table" then
    return encode_table(v)
  end
  fail(0, tostring(v) .. " is of unsupported type " .. tv)
end
local encode = M.encode

--- Like encode, but returns nil and the message instead of raising (scalars take no pcall).
function M.try_encode(v, what, name)
  local tv = type(v)
  if tv == "number" then
    local s = number_text(v)
    if s ~= nil then return s end
  elseif tv == "boolean" then
    return v and "true" or "false"
  elseif tv == "string" then
    local s = string_text(v)
    if s ~= nil then return s end
  end
  local ok, s = pcall(encode, v, what, name)
  if ok then return s end
  return nil, s
end

--- "array", "object" or "empty" for a table whose keys JSON can carry (values are not
-- looked at); nil and the message otherwise.
function M.kind(t, what)
  what_text, root_name = what or "Values", nil
  local ok, kind = pcall(table_kind, t, 0)
  if ok then return kind end
  return nil, kind
end

return M
