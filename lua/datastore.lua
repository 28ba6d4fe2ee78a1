--- datastore: the driver's persistent table (DESIGN section 4).
--
-- `require("datastore").init()` and `driver.datastore` return the root of the store;
-- `device.persistent_store` is the node at "__" .. device.id. Every table in the store is a
-- *node*: an empty proxy table whose own small metatable (hidden: __metatable = false) holds
--   __index    = the backing table with the data (reads stay a C-level lookup),
--   __newindex = the guard: a closure bound to this node, made on its first write,
--   __ext      = the shared __len/__pairs/__ipairs/__next/__insert/... the sandbox honours.
-- LuaJIT calls __newindex only for keys absent from the proxy; the proxy stays empty, so
-- every write at any depth is checked before anything changes.
--
-- Assigning a plain table *moves* it in: the table itself becomes the node (its contents go
-- to a fresh backing table), so later writes through the caller's reference are guarded.
-- A node that lives in the store elsewhere is deep-copied; a node that was removed from the
-- store (detached) is moved back. Writes to detached nodes are still checked but do not make
-- the store dirty.
--
-- Persistence belongs to the host (hubhost/datastore.py): it loads the file through
-- `caps.datastore_host.load`, takes JSON snapshots, and reports which snapshot reached the
-- disk. `is_dirty()` is "changed since the last snapshot, or that snapshot is not on disk
-- yet". Snapshots are encoded here (JIT-compiled); each top-level subtree keeps its JSON
-- text until something below it changes, so a flush re-encodes only what changed.
--
-- This file never uses `#` (the loader would rewrite it into a metamethod-aware call): the
-- raw primitives come from caps.raw.
local caps = select(2, ...)
local json = require "hubhost.json"
local raw = caps.raw

local type, tostring, error, select, setmetatable, getmetatable, tonumber =
  type, tostring, error, select, setmetatable, getmetatable, tonumber
local next, rawget, rawlen = raw.next, raw.rawget, raw.len
-- Every traversal below iterates with `walk`, never with a variable named `next` or
-- `pairs`: LuaJIT turns loops over those names into ITERN, and this LuaJIT (lupa 2.8's
-- 2.1.1774896198) can silently drop an element from such a loop when a trace records
-- next() right after the loop was despecialized, e.g. blacklisted (LuaJIT issue #1510,
-- fixed upstream in 27f169c6, 2026-08-18). Here a dropped element would be a member
-- missing from the file, or a valid array refused as "sparse". tests/test_json.py checks
-- that no loop of this file or the encoder is an ITERN loop.
local walk = raw.next
local tnew, tclear = raw.table_new, raw.table_clear
local tsort, tconcat = raw.sort, raw.concat
local new_buffer = raw.buffer.new
local S = raw.string
local byte, sub, find, format, slen, gsub, char = S.byte, S.sub, S.find, S.format, S.len, S.gsub, S.char
local floor = math.floor

local PREFIX = "Data store keys and values must be JSON encodable: "
local MAX_DEPTH = 100            -- levels below the root; the file must stay loadable
local NODE = {}                  -- private key: proxy[NODE] = the node's metatable
local IN_PROGRESS, MOVED = -1, -2

local M = {}
local methods = {}
local H = {}                     -- host interface (caps.datastore_host)

local changed = false            -- a live node was written since the last snapshot
local snap_seq, disk_seq = 0, 0  -- last snapshot taken / last snapshot known on disk
local root = nil

---------------------------------------------------------------------------------------------
-- Errors.
local show = json.show   -- the encoder's way of showing a refused value

local function fail(what) error(PREFIX .. what, 0) end
local function fail_type(v) fail(tostring(v) .. " is of unsupported type " .. type(v)) end
local function bad_number(v) fail(tostring(v) .. " is not a finite number") end
local function fail_depth(t) fail(tostring(t) .. " is nested deeper than " .. MAX_DEPTH .. " levels") end
local function fail_index(k)
  fail("key " .. tostring(k) .. " is not an array index (keys are strings, or exactly 1..n in arrays)")
end

---------------------------------------------------------------------------------------------
-- Strings must be valid UTF-8 (JSON text). ASCII-only strings take one C scan; strings seen
-- recently are remembered so the common write of a known key or value costs one lookup.
local utf8_ok = json.utf8_ok   -- the one UTF-8 check (lua/hubhost/json.lua)

local function has_high_byte(s, n)
  if n > 32 then return find(s, "[\128-\255]") ~= nil end   -- C scan (not compiled)
  for i = 1, n do                                             -- short: a compiled loop
    if byte(s, i) >= 128 then return true end
  end
  return false
end

local ok_strings, ok_count = {}, 0
local function check_string(s, is_key, no_cache)
  local n = slen(s)
  if has_high_byte(s, n) and not utf8_ok(s) then
    fail((is_key and "key " or "") .. show(s) .. " is not valid UTF-8")
  end
  if n <= 64 and not no_cache then
    if ok_count >= 4096 then ok_strings, ok_count = {}, 0 end
    ok_strings[s] = true
    ok_count = ok_count + 1
  end
end

---------------------------------------------------------------------------------------------
-- Nodes. A proxy holds one private key, NODE (its metatable). The metatable `mt` holds:
--   __index = b (the backing table; the root's b has the methods behind it),
--   __newindex (the guard), __metatable = false, __ext = the shared metamethods,
--   depth (0 = root), live (in the store), top (the cache cell of the node's depth-1
--   subtree: { json = true while its text is in root_json, rkey = its key in the root },
--   shared by every node of that subtree, so a write below knows what to invalidate).
local make_guard, prepare, detach, lazy_guard
local EXT = {}
-- root key -> cached `"key":<json>` text of the depth-1 node stored there. Kept flat (not
-- in the nodes) so a flush walks one table instead of chasing two pointers per entry.
local root_json = {}

local function backing(p) return rawget(p, NODE).__index end

function EXT.__len(p) return rawlen(backing(p)) end
function EXT.__next(p, k) return next(backing(p), k) end
local node_next = EXT.__next
function EXT.__pairs(p) return node_next, p, nil end
local function ipairs_step(p, i)
  i = i + 1
  local v = backing(p)[i]
  if v ~= nil then return i, v end
end
function EXT.__ipairs(p) return ipairs_step, p, 0 end
function EXT.__rawget(p, k) return rawget(backing(p), k) end
function EXT.__rawset(p, k, v) return rawget(p, NODE).__newindex(p, k, v) end
EXT.__backing = backing

local function new_mt(b, depth, live, top)
  local mt = { __index = b, __newindex = lazy_guard, __metatable = false, __ext = EXT,
               depth = depth, live = live, top = top }
  if depth == 1 then mt.top = {} end
  return mt
end

local function wrap(mt)
  local p = {}
  p[NODE] = mt
  return setmetatable(p, mt)
end

local function is_node(v) return type(v) == "table" and rawget(v, NODE) ~= nil end

local function drop_cache(top)
  top.json = nil
  local rk = top.rkey
  if rk ~= nil then root_json[rk] = nil end
end

local function invalidate(mt)
  local top = mt.top
  if top ~= nil and top.json ~= nil then drop_cache(top) end
end

-- Re-home a subtree: live state, depth and cache cell. Guards are re-made lazily (they
-- capture these). A depth-1 node that stays at depth 1 keeps its cell.
local function set_state(p, live, depth, top)
  local mt = rawget(p, NODE)
  if depth == 1 then top = (mt.depth == 1 and mt.top) or {} end
  if mt.live == live and mt.depth == depth and mt.top == top then return end
  mt.live, mt.depth, mt.top = live, depth, top
  mt.__newindex = lazy_guard
  for _, x in walk, mt.__index do
    if type(x) == "table" then set_state(x, live, depth + 1, top) end
  end
end

-- A node left the store: it and its subtree are detached (writes no longer mark dirty).
local function detach_walk(p)
  local mt = rawget(p, NODE)
  if not mt.live then return end
  mt.live = false
  mt.__newindex = lazy_guard
  for _, x in walk, mt.__index do
    if type(x) == "table" then detach_walk(x) end
  end
end
detach = detach_walk

local function copy_node(p, depth, live, top)
  local smt = rawget(p, NODE)
  local src = smt.__index
  local b = tnew(rawlen(src), 0)
  local mt = new_mt(b, depth, live, top)
  local ctop = mt.top
  for k, x in walk, src do
    if type(x) == "table" then x = copy_node(x, depth + 1, live, ctop) end
    b[k] = x
  end
  return wrap(mt)
end

---------------------------------------------------------------------------------------------
-- The guard.
local function fail_reserved(k)
  fail("key " .. show(k) .. " is reserved: ds:" .. tostring(k) .. "() is a method of the datastore")
end

local function check_key(b, mt, p, k)
  local tk = type(k)
  if tk == "string" then
    if mt.depth == 0 then
      if methods[k] then fail_reserved(k) end
    elseif b[1] ~= nil then
      fail("key " .. show(k) .. " would mix a string key into array " .. tostring(p))
    end
    if not ok_strings[k] then check_string(k, true) end
  elseif tk == "number" then
    if mt.depth == 0 then
      fail("key " .. tostring(k) .. " is of unsupported type number (the datastore root holds named keys only)")
    end
    if k - k ~= 0 or k < 1 or k ~= floor(k) then fail_index(k) end
    if k == 1 then
      if next(b) ~= nil then
        fail("index 1 would mix an array index into object " .. tostring(p))
      end
    elseif b[k - 1] == nil then
      if b[1] == nil and next(b) ~= nil then
        fail("index " .. tostring(k) .. " would mix an array index into object " .. tostring(p))
      end
      fail("index " .. tostring(k) .. " would make " .. tostring(p) .. " a sparse array (length "
        .. rawlen(b) .. ")")
    end
  else
    fail("key " .. tostring(k) .. " is of unsupported type " .. tk)
  end
end

local function check_value(v)
  local tv = type(v)
  if tv == "number" then
    if v - v ~= 0 then bad_number(v) end
  elseif tv == "string" then
    if not ok_strings[v] then check_string(v) end
  elseif tv ~= "boolean" then
    fail_type(v)
  end
end

-- Everything that is not "scalar over an existing key": new keys, deletes, tables, errors.
local function set_slow(p, b, mt, k, v, old, tv)
  local to = type(old)
  if to == "function" then return fail_reserved(k) end   -- only the root's methods
  if v == old then return end                             -- nothing changes (also nil over nil)
  if old == nil then check_key(b, mt, p, k) end
  if tv == "table" then
    v = prepare(v, mt, p)
  elseif tv == "nil" then
    if type(k) == "number" and b[k + 1] ~= nil then
      fail("removing index " .. tostring(k) .. " would leave a hole in array " .. tostring(p)
        .. " (use table.remove)")
    end
  else
    check_value(v)
  end
  if to == "table" then detach(old) end
  b[k] = v
  if mt.live then changed = true end
  if mt.depth == 0 then
    root_json[k] = nil
    if tv == "table" then rawget(v, NODE).top.rkey = k end
  else
    invalidate(mt)
  end
end

-- One closure per written node (made on its first write, see lazy_guard): the hot path, a
-- scalar over an existing key, touches only upvalues and the backing table, allocates
-- nothing, and costs one more table read to drop the cached JSON of its subtree.
function make_guard(b, mt, live, top)
  return function(p, k, v)
    local old = b[k]
    local tv = type(v)
    if old ~= nil and tv ~= "table" then
      if tv == "number" then
        if v - v ~= 0 then return bad_number(v) end
      elseif tv == "string" then
        if not ok_strings[v] then check_string(v) end
      elseif tv ~= "boolean" then
        return set_slow(p, b, mt, k, v, old, tv)
      end
      local to = type(old)
      if to == "table" then detach(old) elseif to == "function" then return fail_reserved(k) end
      b[k] = v
      if live then changed = true end
      if top ~= nil and top.json ~= nil then drop_cache(top) end
      return
    end
    return set_slow(p, b, mt, k, v, old, tv)
  end
end

-- The guard every node starts with: makes the node's own closure on its first write, so
-- building nodes in bulk (load, assignment) creates no closures and stays JIT-compiled.
function lazy_guard(p, k, v)
  local mt = rawget(p, NODE)
  local g = make_guard(mt.__index, mt, mt.live, mt.top)
  mt.__newindex = g
  return g(p, k, v)
end

-- Walk a node's subtree: depth limit, and `target` must not be inside (a cycle).
local function check_subtree(p, depth, target)
  if p == target then fail(tostring(p) .. " would contain itself (a cycle)") end
  if depth > MAX_DEPTH then fail_depth(p) end
  for _, x in walk, backing(p) do
    if type(x) == "table" then check_subtree(x, depth + 1, target) end
  end
end

-- Validate a table that is about to be placed at `depth` under `target`; changes nothing.
-- seen[t] = depth already validated at (a DAG is fine), IN_PROGRESS on the current path.
local function check_table(v, depth, target, seen, sizes)
  local d = seen[v]
  if d == IN_PROGRESS then fail(tostring(v) .. " contains itself (a cycle)") end
  if d and d >= depth then return end
  local mt = rawget(v, NODE)
  if mt then
    seen[v] = depth
    return check_subtree(v, depth, (not mt.live) and target or nil)
  end
  if depth > MAX_DEPTH then fail_depth(v) end
  if getmetatable(v) ~= nil then
    fail(tostring(v) .. " has a metatable (only plain tables can be stored)")
  end
  seen[v] = IN_PROGRESS
  local nidx, nstr, maxi = 0, 0, 0
  for k, x in walk, v do
    local tk = type(k)
    if tk == "string" then
      if not ok_strings[k] then check_string(k, true) end
      nstr = nstr + 1
    elseif tk == "number" then
      if k - k ~= 0 or k < 1 or k ~= floor(k) then fail_index(k) end
      nidx = nidx + 1
      if k > maxi then maxi = k end
    else
      fail("key " .. tostring(k) .. " is of unsupported type " .. tk)
    end
    local tx = type(x)
    if tx == "table" then
      check_table(x, depth + 1, target, seen, sizes)
    elseif tx == "number" then
      if x - x ~= 0 then bad_number(x) end
    elseif tx == "string" then   -- values in bulk are mostly distinct: not worth caching
      if not ok_strings[x] then check_string(x, false, true) end
    elseif tx ~= "boolean" then
      fail_type(x)
    end
  end
  if nidx > 0 then
    if nstr > 0 then fail(tostring(v) .. " mixes array indices and string keys") end
    if maxi ~= nidx then fail(tostring(v) .. " is a sparse array (keys must be exactly 1..n)") end
  end
  seen[v] = depth
  sizes[v] = nstr
end

-- Turn a validated value into what the store holds: plain tables become nodes in place,
-- detached nodes are moved back, live nodes (and anything placed twice) are copied.
local function place(v, depth, live, top, seen, sizes)
  local mt = rawget(v, NODE)
  if mt then
    if mt.live or seen[v] == MOVED then return copy_node(v, depth, live, top) end
    seen[v] = MOVED
    set_state(v, live, depth, top)
    return v
  end
  local n = rawlen(v)
  local b = tnew(n, sizes[v] or 0)
  local nmt = new_mt(b, depth, live, top)
  local ctop = nmt.top
  if n > 0 then
    for i = 1, n do
      local x = v[i]
      if type(x) == "table" then x = place(x, depth + 1, live, ctop, seen, sizes) end
      b[i] = x
    end
  else
    for k, x in walk, v do
      if type(x) == "table" then x = place(x, depth + 1, live, ctop, seen, sizes) end
      b[k] = x
    end
  end
  tclear(v)
  v[NODE] = nmt
  setmetatable(v, nmt)
  seen[v] = MOVED
  return v
end

function prepare(v, pmt, target)
  local seen, sizes = {}, {}
  local depth = pmt.depth + 1
  check_table(v, depth, target, seen, sizes)
  return place(v, depth, pmt.live, pmt.top, seen, sizes)
end

---------------------------------------------------------------------------------------------
-- table.insert / table.remove / table.sort on nodes (called by the sandbox's table.*).
function EXT.__insert(p, ...)
  local nargs = select("#", ...)
  local mt = rawget(p, NODE)
  local b = mt.__index
  local n = rawlen(b)
  local pos, v
  if nargs == 1 then
    pos, v = n + 1, ...
  elseif nargs == 2 then
    pos, v = ...
    if type(pos) ~= "number" then
      error("bad argument #2 to 'insert' (number expected, got " .. type(pos) .. ")", 2)
    end
    if pos ~= floor(pos) or pos < 1 or pos > n + 1 then
      fail("table.insert position " .. tostring(pos) .. " would make " .. tostring(p)
        .. " a sparse array (length " .. n .. ")")
    end
  else
    error("wrong number of arguments to 'insert'", 2)
  end
  if v == nil then
    if pos <= n then
      fail("inserting nil at " .. pos .. " would leave a hole in array " .. tostring(p))
    end
    return
  end
  if mt.depth == 0 then
    fail("table.insert: the datastore root holds named keys only")
  end
  if n == 0 and next(b) ~= nil then
    fail("table.insert would mix an array index into object " .. tostring(p))
  end
  if type(v) == "table" then v = prepare(v, mt, p) else check_value(v) end
  for i = n, pos, -1 do b[i + 1] = b[i] end
  b[pos] = v
  if mt.live then changed = true end
  invalidate(mt)
end

function EXT.__remove(p, pos)
  local mt = rawget(p, NODE)
  local b = mt.__index
  local len = rawlen(b)
  local old
  if pos == nil then
    if len == 0 then return end
    old = b[len]
    b[len] = nil
  else
    if type(pos) ~= "number" then
      error("bad argument #2 to 'remove' (number expected, got " .. type(pos) .. ")", 2)
    end
    if not (pos >= 1 and pos <= len) then return end
    old = b[pos]
    for i = pos + 1, len do b[i - 1] = b[i] end
    b[len] = nil
  end
  if mt.live then changed = true end
  invalidate(mt)
  if type(old) == "table" then detach(old) end
  return old
end

function EXT.__sort(p, cmp)
  local mt = rawget(p, NODE)
  if rawlen(mt.__index) > 1 then   -- marked before sorting: a failing comparator may
    if mt.live then changed = true end   -- leave the order half changed
    invalidate(mt)
  end
  return tsort(mt.__index, cmp)
end

---------------------------------------------------------------------------------------------
-- JSON encoding (JIT-compiled; runs on the driver's thread, the host writes the bytes).
-- Integral numbers below 2^53 are written as integers, others with %.17g (exact round
-- trip), -0 as -0.0; empty tables as {}. Each depth-1 node keeps its JSON text until a
-- write below it, so a flush re-encodes only what changed.
local ESC, NEEDS_ESCAPE = json.ESC, json.NEEDS_ESCAPE

local function put_string(buf, s)
  for i = 1, slen(s) do
    local c = byte(s, i)
    if c < 32 or c == 34 or c == 92 then
      s = gsub(s, NEEDS_ESCAPE, ESC)
      break
    end
  end
  buf:put('"', s, '"')
end

local function put_number(buf, x)
  if x == floor(x) and x > -9007199254740992 and x < 9007199254740992 then
    if x == 0 and 1 / x < 0 then buf:put("-0.0") else buf:putf("%d", x) end
  else
    buf:putf("%.17g", x)
  end
end

local encode_node

local function put_value(buf, x)
  local tx = type(x)
  if tx == "string" then put_string(buf, x)
  elseif tx == "number" then put_number(buf, x)
  elseif tx == "boolean" then buf:put(x and "true" or "false")
  else encode_node(buf, x) end
end

function encode_node(buf, p)
  local b = backing(p)
  local x = b[1]
  if x ~= nil then
    buf:put("[")
    local i = 1
    while true do
      put_value(buf, x)
      i = i + 1
      x = b[i]
      if x == nil then break end
      buf:put(",")
    end
    buf:put("]")
    return
  end
  local sep = "{"
  for k, v in walk, b do
    buf:put(sep)
    sep = ","
    put_string(buf, k)
    buf:put(":")
    put_value(buf, v)
  end
  if sep == "{" then buf:put("{}") else buf:put("}") end
end

local top_buf = new_buffer()

-- `"key":<json>` of a depth-1 node, encoded once into root_json until a write below it
local function encode_top(k, p)
  top_buf:reset()
  put_string(top_buf, k)
  top_buf:put(":")
  encode_node(top_buf, p)
  local j = top_buf:tostring()
  local cell = rawget(p, NODE).top
  cell.json, cell.rkey = true, k
  root_json[k] = j
  return j
end

local out_buf = new_buffer()   -- kept between snapshots: no regrowth of a ~store-sized buffer

local function encode_root(r)
  local buf = out_buf
  buf:reset()
  local sep = "{"
  for k, v in walk, backing(r) do
    if type(v) == "table" then
      buf:put(sep, root_json[k] or encode_top(k, v))
    else
      buf:put(sep)
      put_string(buf, k)
      buf:put(":")
      put_value(buf, v)
    end
    sep = ","
  end
  if sep == "{" then buf:put("{}") else buf:put("}") end
  local s = buf:tostring()
  buf:reset()
  top_buf:reset()
  return s
end

---------------------------------------------------------------------------------------------
-- JSON decoding straight into nodes. The host has already checked the text with a strict
-- parser (orjson: syntax, UTF-8, surrogates, finite numbers), so this only has to be fast
-- and correct on valid JSON. What the guard would refuse is dropped and counted: `null`
-- members and array elements, the root's method names, nesting deeper than MAX_DEPTH.
local DROP = {}
local dropped, drop_note = 0, nil
local function note_drop(what)
  dropped = dropped + 1
  if drop_note == nil then drop_note = what end
end

local UNESC = { [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n",
                [114] = "\r", [116] = "\t" }

local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 + floor(cp / 64), 0x80 + cp % 64) end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
              0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

local function skip_ws(s, pos)
  local c = byte(s, pos)
  while c == 32 or c == 10 or c == 13 or c == 9 do
    pos = pos + 1
    c = byte(s, pos)
  end
  return pos, c
end

local function dec_string_escaped(s, pos)
  local parts, np = {}, 0
  local i = pos + 1
  local start = i
  while true do
    local c = byte(s, i)
    if c == nil then error("datastore file: unterminated string", 0) end
    if c == 34 then
      np = np + 1
      parts[np] = sub(s, start, i - 1)
      return tconcat(parts), i + 1
    elseif c == 92 then
      np = np + 1
      parts[np] = sub(s, start, i - 1)
      local e = byte(s, i + 1)
      if e == 117 then
        local cp = tonumber(sub(s, i + 2, i + 5), 16)
        i = i + 6
        if cp >= 0xD800 and cp <= 0xDBFF and byte(s, i) == 92 and byte(s, i + 1) == 117 then
          local lo = tonumber(sub(s, i + 2, i + 5), 16)
          if lo and lo >= 0xDC00 and lo <= 0xDFFF then
            cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)
            i = i + 6
          end
        end
        np = np + 1
        parts[np] = utf8_char(cp)
      else
        np = np + 1
        parts[np] = UNESC[e] or error("datastore file: bad escape", 0)
        i = i + 2
      end
      start = i
    else
      i = i + 1
    end
  end
end

local function dec_string(s, pos)
  local i = pos + 1
  local c = byte(s, i)
  while c ~= 34 and c ~= 92 and c ~= nil do
    i = i + 1
    c = byte(s, i)
  end
  if c == 34 then return sub(s, pos + 1, i - 1), i + 1 end
  return dec_string_escaped(s, pos)
end

local dec_members, dec_elements

-- Returns value, next position; nil for null, DROP for something dropped.
local function dec_value(s, pos, c, depth, top)
  if c == 34 then return dec_string(s, pos) end
  if c == 123 or c == 91 then
    local b = {}
    local mt = new_mt(b, depth, true, top)
    if c == 123 then pos = dec_members(s, pos + 1, depth, b, mt.top)
    else pos = dec_elements(s, pos + 1, depth, b, mt.top) end
    if depth > MAX_DEPTH then   -- counted once, at the outermost level that is too deep
      if depth == MAX_DEPTH + 1 then note_drop("a value nested deeper than " .. MAX_DEPTH .. " levels") end
      return DROP, pos
    end
    return wrap(mt), pos
  end
  if c == 116 then return true, pos + 4 end
  if c == 102 then return false, pos + 5 end
  if c == 110 then return nil, pos + 4 end
  local i = pos + 1
  c = byte(s, i)
  while c and ((c >= 48 and c <= 57) or c == 46 or c == 101 or c == 69 or c == 45 or c == 43) do
    i = i + 1
    c = byte(s, i)
  end
  local x = tonumber(sub(s, pos, i - 1))
  if x == nil or x - x ~= 0 then error("datastore file: bad number at byte " .. pos, 0) end
  return x, i
end

function dec_members(s, pos, depth, b, top)
  local c
  pos, c = skip_ws(s, pos)
  if c == 125 then return pos + 1 end
  while true do
    if c ~= 34 then error("datastore file: expected a key at byte " .. pos, 0) end
    local k, v
    local kpos, drops = pos, dropped
    k, pos = dec_string(s, pos)
    pos, c = skip_ws(s, pos)
    pos, c = skip_ws(s, pos + 1)
    v, pos = dec_value(s, pos, c, depth + 1, top)
    if v == nil then
      note_drop("null (the value of key " .. show(k) .. ")")
    elseif v ~= DROP then
      if depth == 0 and methods[k] then
        note_drop("the reserved root key " .. show(k))
      else
        b[k] = v
        if depth == 0 and type(v) == "table" then
          local cell = rawget(v, NODE).top
          cell.rkey = k
          if dropped == drops then
            -- the file's own text of this entry is valid JSON for exactly what was loaded:
            -- it seeds the cache, so the first flush after a start is as cheap as the rest
            root_json[k] = sub(s, kpos, pos - 1)
            cell.json = true
          end
        end
      end
    end
    pos, c = skip_ws(s, pos)
    if c == 125 then return pos + 1 end
    pos, c = skip_ws(s, pos + 1)
  end
end

function dec_elements(s, pos, depth, b, top)
  local n = 0
  local c
  pos, c = skip_ws(s, pos)
  if c == 93 then return pos + 1 end
  while true do
    local v
    v, pos = dec_value(s, pos, c, depth + 1, top)
    if v == nil then
      note_drop("null in an array")
    elseif v ~= DROP then
      n = n + 1
      b[n] = v
    end
    pos, c = skip_ws(s, pos)
    if c == 93 then return pos + 1 end
    pos, c = skip_ws(s, pos + 1)
  end
end

---------------------------------------------------------------------------------------------
-- The root and its methods.
local root_methods = {}
local function new_root_backing() return setmetatable({}, { __index = root_methods }) end

local function get_root()
  if root == nil then root = wrap(new_mt(new_root_backing(), 0, true, nil)) end
  return root
end

local function dirty() return changed or disk_seq < snap_seq end

local pcall = pcall
local function snapshot()
  local ok, json = pcall(encode_root, get_root())
  if not ok then
    -- out of memory, most likely: give the half-grown buffers back before reporting it
    out_buf:free()
    top_buf:free()
    error(json, 0)
  end
  snap_seq = snap_seq + 1
  changed = false
  return json, snap_seq
end

local function written(seq)
  if seq > disk_seq then disk_seq = seq end
end

local function check_self(self, name)
  if self ~= root then
    error("datastore: call " .. name .. " as ds:" .. name .. "() on the datastore root", 3)
  end
end

--- true after any change, false after a save that reached the disk.
function methods.is_dirty(self)
  check_self(self, "is_dirty")
  return dirty()
end

--- Write the store now. In a handler, the handler waits (yields) until the file is on disk;
-- elsewhere (the entry chunk) the write is synchronous. Returns true, or nil and a message.
function methods.save(self)
  check_self(self, "save")
  if not dirty() then return true end
  local json, seq = snapshot()
  local ok, err
  if caps.can_wait() then
    ok, err = caps.host_wait("save", { seq, json })
  else
    local write = caps.host.datastore_write
    if not write then
      return nil, "datastore: no datastore file is attached to this runtime"
    end
    ok, err = write(seq, json)
  end
  if ok then
    written(seq)
    return true
  end
  return nil, err
end
root_methods.save, root_methods.is_dirty = methods.save, methods.is_dirty

--- The driver's datastore (the same table as driver.datastore).
function M.init() return get_root() end

---------------------------------------------------------------------------------------------
-- Capabilities for driver_helper / runtime.lua and the host.
caps.datastore = get_root

function caps.device_store(id)
  local key = "__" .. tostring(id)
  local r = get_root()
  local b = backing(r)
  local node = rawget(b, key)
  if node == nil then
    r[key] = {}
    node = rawget(b, key)
  elseif type(node) ~= "table" then
    error("device.persistent_store: the datastore key " .. show(key) .. " holds a "
      .. type(node) .. ", not a table", 3)
  end
  return node
end

function caps.drop_device_store(id)
  local key = "__" .. tostring(id)
  local r = get_root()
  if rawget(backing(r), key) ~= nil then r[key] = nil end
end

--- Replace the store's contents with the JSON object text `json`. Returns the number of
-- dropped values and a description of the first one.
function H.load(json)
  dropped, drop_note = 0, nil
  local pos, c = skip_ws(json, 1)
  if c ~= 123 then error("datastore file: the top level is not a JSON object", 0) end
  local r = get_root()
  local mt = rawget(r, NODE)
  for _, x in walk, mt.__index do
    if type(x) == "table" then detach(x) end
  end
  local b = new_root_backing()
  root_json = {}
  dec_members(json, pos + 1, 0, b, nil)
  mt.__index, mt.__newindex = b, lazy_guard   -- the root proxy keeps its identity
  changed, snap_seq, disk_seq = false, 0, 0
  return dropped, drop_note
end

--- (json, seq) of the store now, or nil when it is not dirty.
function H.snapshot()
  if not dirty() then return nil end
  return snapshot()
end

H.written = written
H.is_dirty = dirty
function H.encode()
  local ok, s = pcall(encode_root, get_root())
  if not ok then
    out_buf:free()
    top_buf:free()
    error(s, 0)
  end
  return s
end
H.is_node = is_node

caps.datastore_host = H
return M
