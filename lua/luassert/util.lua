-- Helpers shared by luassert's modules: deep comparison, argument copies
-- for spies, token parsing and the one place where failures are raised.
-- Locations come from a host capability (no debug library in the sandbox).
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local util = {}

local unpack = unpack

-- Host capabilities, injected by the runner (see util.set_host).
local host = { getinfo = nil, prefixes = {}, fail = nil }

-- Library frames are recognised by chunk name: each library module marks
-- itself with a function of its own chunk (util.mark_internal), since the
-- host may name bundled chunks in more than one way.
local marked = {}
local internal_sources = {}

local function learn(fn)
  local info = host.getinfo and host.getinfo(fn)
  if info and info.source then internal_sources[info.source] = true end
end

--- Declares fn's chunk a library chunk: its frames are never "the caller".
function util.mark_internal(fn)
  marked[#marked + 1] = fn
  learn(fn)
end

--- Installs host capabilities: getinfo(level_or_fn) -> {source, short_src,
--- currentline, linedefined, what, name, namewhat} (level relative to its
--- caller, like debug.getinfo), fail(text, raw) to raise failures, and
--- lib_prefixes, chunk-name prefixes of the bundled library.
function util.set_host(caps)
  if caps.getinfo ~= nil then host.getinfo = caps.getinfo end
  if caps.fail ~= nil then host.fail = caps.fail end
  for _, p in ipairs(caps.lib_prefixes or {}) do
    if p ~= "" then host.prefixes[#host.prefixes + 1] = p end
  end
  if host.getinfo then
    for _, fn in ipairs(marked) do learn(fn) end
    -- our own chunk name ends in "luassert/util.lua": what precedes it is
    -- where this runtime's copy of the library lives.
    local info = host.getinfo(1)
    local src = info and info.source or ""
    local cut = src:find("luassert[/\\]util%.lua$")
    if cut and cut > 2 then host.prefixes[#host.prefixes + 1] = src:sub(1, cut - 1) end
  end
end

--- Debug information about a stack level (relative to the caller) or a
--- function; nil when the host gave no capability.
function util.getinfo(what)
  if not host.getinfo then return nil end
  if type(what) == "number" then return host.getinfo(what + 1) end
  return host.getinfo(what)
end

--- True when a chunk source belongs to the bundled library (spec files
--- never do, even when they live beside it).
function util.is_internal(source)
  if type(source) ~= "string" then return false end
  if internal_sources[source] then return true end
  if source:sub(-9) == "_spec.lua" then return false end
  for _, prefix in ipairs(host.prefixes) do
    if source:sub(1, #prefix) == prefix then return true end
  end
  return false
end

--- Name of a frame's file for messages: the full chunk name, untruncated.
function util.srcname(info)
  local src = info.source or ""
  if src:sub(1, 1) == "@" then return src:sub(2) end
  return info.short_src or src
end

--- The first frame outside the library and C, counted from the caller;
--- skip > 0 steps further out (assert:level support).
function util.where(skip)
  if not host.getinfo then return nil end
  skip = skip or 0
  for level = 2, 250 do
    local info = host.getinfo(level)
    if not info then return nil end
    if info.what ~= "C" and info.what ~= "tail" and not util.is_internal(info.source) then
      if skip <= 0 then return info end
      skip = skip - 1
    end
  end
  return nil
end

function util.callable(obj)
  if type(obj) == "function" then return true end
  local mt = getmetatable(obj)
  return type(mt) == "table" and type(rawget(mt, "__call")) == "function"
end

function util.hastostring(obj)
  if type(obj) == "string" then return true end
  local mt = getmetatable(obj)
  return type(mt) == "table" and type(rawget(mt, "__tostring")) == "function"
end

--- Raises an assertion failure whose message starts with the file:line of
--- the first frame outside the library (what error(msg, level) would give).
-- Bad arguments of assertions and matchers are reported like failed assertions, at the
-- caller's line; the two message forms come from say (luassert's language table).
-- No two entries of `list` are equal (deep: or the same by deepcompare); shared by the
-- `unique` assertion and matcher.
function util.is_unique(list, deep)
  for k, v in each_pair(list) do
    for k2, v2 in each_pair(list) do
      if k ~= k2 then
        if deep and util.deepcompare(v, v2, true) then return false end
        if v == v2 then return false end
      end
    end
  end
  return true
end

function util.check(cond, message)
  if not cond then util.fail(message) end
end

-- say as loaded with luassert: a spec may drop package.loaded.say to test its own copy
local say = require "say"

function util.argtolittle(name, min, n)
  return say("assertion.internal.argtolittle", { name, min, tostring(n) })
end

function util.badargtype(pos, name, expected, got)
  return say("assertion.internal.badargtype", { pos, name, expected, got })
end

-- __index of the chaining states of assert and match: `is_not_equal`, `.is.Not`, ... each
-- add their lower-cased words to the token list.
function util.token_index(self, key)
  for token in key:lower():gmatch("[^_]+") do
    self.tokens[#self.tokens + 1] = token
  end
  return self
end

function util.fail(msg, skip)
  local info = util.where(skip)
  local text = msg
  if util.hastostring(msg) or type(msg) == "number" then
    text = tostring(msg)
    if info then text = util.srcname(info) .. ":" .. tostring(info.currentline) .. ": " .. text end
  end
  if host.fail then return host.fail(text, msg) end
  if info then error(text, 0) end
  error(text, 3)
end

--- Raises a plain (non-assertion) error located like util.fail: for
--- misuse of the library, which busted reports as an error, not a failure.
function util.error(msg)
  local info = util.where()
  if info then error(util.srcname(info) .. ":" .. tostring(info.currentline) .. ": " .. msg, 0) end
  error(msg, 3)
end

--- Deep equality of t1 and t2. Returns false plus the path (innermost key
--- first) to the first difference. Cycles compare equal when they recur in
--- step; __eq is honoured unless ignore_mt.
function util.deepcompare(t1, t2, ignore_mt, cycles)
  if type(t1) ~= "table" or type(t2) ~= "table" then return t1 == t2 end
  if rawequal(t1, t2) then return true end
  local mt1, mt2 = getmetatable(t1), getmetatable(t2)
  if not ignore_mt and mt1 and mt1 == mt2 and type(mt1) == "table" and mt1.__eq then
    return t1 == t2
  end
  cycles = cycles or {}
  local seen = cycles[t1]
  if seen and seen[t2] then return true end
  if not seen then seen = {}; cycles[t1] = seen end
  seen[t2] = true
  for k1, v1 in each_next, t1 do
    local v2 = t2[k1]
    if v2 == nil then
      seen[t2] = nil
      return false, { k1 }
    end
    local same, crumbs = util.deepcompare(v1, v2, nil, cycles)
    if not same then
      seen[t2] = nil
      crumbs = crumbs or {}
      crumbs[#crumbs + 1] = k1
      return false, crumbs
    end
  end
  for k2 in each_next, t2 do
    if t1[k2] == nil then
      seen[t2] = nil
      return false, { k2 }
    end
  end
  seen[t2] = nil
  return true
end

--- A one-level copy; the metatable is shared (an argument list stays one).
function util.shallowcopy(t)
  if type(t) ~= "table" then return t end
  local copy = setmetatable({}, getmetatable(t))
  for k, v in each_next, t do copy[k] = v end
  return copy
end

--- Deep copy keeping spies as they are; metatables are shared, not copied.
function util.deepcopy(t, cache)
  if type(t) ~= "table" then return t end
  cache = cache or {}
  if cache[t] then return cache[t] end
  local spy = require "luassert.spy"
  if spy.is_spy(t) then return t end
  local copy = {}
  cache[t] = copy
  for k, v in each_next, t do copy[k] = util.deepcopy(v, cache) end
  local mt = getmetatable(t)
  if type(mt) == "table" then pcall(setmetatable, copy, mt) end
  return copy
end

--- Copies a call's arguments: values (deep, frozen at call time) and refs;
--- both stay argument lists when args is one.
function util.copyargs(args)
  local match = require "luassert.match"
  local spy = require "luassert.spy"
  local copy = setmetatable({}, getmetatable(args))
  for k, v in each_pair(args) do
    if match.is_matcher(v) or spy.is_spy(v) then copy[k] = v else copy[k] = util.deepcopy(v) end
  end
  return { vals = copy, refs = util.shallowcopy(args) }
end

local function args_match(t1, t2, t1refs)
  local match = require "luassert.match"
  for k1, v1 in each_pair(t1) do
    local v2 = t2[k1]
    if match.is_matcher(v1) then
      if not v1(v2) then return false end
    elseif match.is_matcher(v2) then
      if match.is_ref_matcher(v2) then v1 = t1refs[k1] end
      if not v2(v1) then return false end
    elseif v2 == nil or not util.deepcompare(v1, v2) then
      return false
    end
  end
  for k2, v2 in each_pair(t2) do
    if t1[k2] == nil then
      if match.is_matcher(v2) then
        if not v2(nil) then return false end
      else
        return false
      end
    end
  end
  return true
end

--- The newest recorded argument list (from copyargs) matching args, or nil:
--- searched last to first, so a failure can show the latest call.
function util.matchargs(argslist, args)
  for i = #argslist, 1, -1 do
    local v = argslist[i]
    if args_match(v.vals, args, v.refs) then return v end
  end
  return nil
end

--- The first on_call_with entry matching a call's args, or nil.
function util.matchoncalls(oncalls, args)
  for _, v in ipairs(oncalls) do
    if args_match(v.vals, args, v.refs) then return v end
  end
  return nil
end

-- Argument lists (a call's arguments or results, with n for trailing nils) carry a
-- metatable of their own, so messages can format them as "(values list) (...)".
local arglist_mt = {}

function util.make_arglist(...)
  return setmetatable({ n = select("#", ...), ... }, arglist_mt)
end

function util.is_arglist(obj)
  return getmetatable(obj) == arglist_mt
end

--- Empties an argument list in place (its n included).
function util.cleararglist(args)
  for i = (args.n or #args), 1, -1 do args[i] = nil end
  args.n = nil
end

function util.pack(...)
  return { n = select("#", ...), ... }
end

function util.unpack(t, i, j)
  return unpack(t, i or 1, j or t.n or #t)
end

--- table.insert that keeps trailing nils, using field n as the length.
function util.tinsert(t, ...)
  local pos, val
  if select("#", ...) < 2 then val = ... else pos, val = ... end
  local n = (t.n or #t) + 1
  t.n = n
  if pos == nil then
    t[n] = val
    return
  end
  if pos > n then
    t[pos] = val
    t.n = pos
    return
  end
  for i = n, pos + 1, -1 do t[i] = t[i - 1] end
  t[pos] = val
end

--- table.remove that keeps trailing nils, using field n as the length.
function util.tremove(t, pos)
  local n = t.n or #t
  t.n = n
  if pos == nil then pos = n end
  if pos > n then
    local removed = t[pos]
    t[pos] = nil
    return removed
  end
  local removed = t[pos]
  for i = pos, n do t[i] = t[i + 1] end
  t[n] = nil
  t.n = n - 1
  return removed
end

--- Splits the tokens of a chained name (assert.is_not.equal) into known
--- keys, preferring the longest key that ends at each position.
function util.extract_keys(nspace, tokens)
  local namespace = require "luassert.namespaces"
  local names, modifiers = namespace[nspace] or {}, namespace.modifier
  local keys = {}
  local i = #tokens
  while i >= 1 do
    local found
    for j = 1, i do
      local key = table.concat(tokens, "_", j, i)
      if names[key] or modifiers[key] then
        found = j
        table.insert(keys, 1, key)
        break
      end
    end
    if not found then
      local key = table.concat(tokens, "_", 1, i)
      util.error("luassert: unknown modifier/" .. nspace .. ": '" .. key .. "'")
    end
    i = found - 1
  end
  return keys
end

util.mark_internal(util.mark_internal)

return util
