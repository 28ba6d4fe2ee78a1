--[[
hubhost/patterns.lua -- string.find / match / gmatch / gsub that can never stall the host.

Why: driver code runs with an instruction-count hook that aborts a handler after its CPU
budget, but a hook cannot interrupt a C function. LuaJIT's pattern matcher backtracks, so
`("a"):rep(5000):find(".-.-.-.-b")` would keep one core busy for hours with no hook firing.
These replacements call the original C function only when its worst case is provably small,
and otherwise run a pure-Lua port of the same matcher (LuaJIT 2.1 lib_string.c, itself from
Lua 5.1 lstrlib.c) that the hook can interrupt. Results, types, error messages and error
positions are those of LuaJIT 2.1.

Interface: a chunk run in the privileged host environment. It receives the original string
library as its first vararg and returns { find =, match =, gmatch =, gsub = }. It creates
no globals and never uses string methods through the (swappable) string metatable. An
optional second vararg overrides the tuning constants below (tests only).

Cost model, in units of one worst-case matcher step (~2.5 ns measured here, see below), for
a subject of n bytes and a pattern p:
  * Pattern matching. q = number of backtracking items: `*`, `+`, `-` (each may take up to
    n+1 repetition counts), `%b` and back-references `%1`-`%9` (each may scan up to n
    bytes); r = number of `?` items (two choices each). One start position costs at most
    (n+1)^q * 2^r * (#p+1) steps: every path through the backtracking tree chooses one
    count per item and walks at most #p pattern bytes. An unanchored find / match /
    gmatch step / gsub tries at most n+1 start positions, so it costs at most
    (n+1)^(q+1) * 2^r * (#p+1) steps; an anchored one (`^`) at most (n+1)^q * 2^r * (#p+1).
  * gsub also builds up to n+1 replacements: GSUB_MATCH units each, plus GSUB_BYTE per
    replacement byte, GSUB_REF per `%` in the replacement string (a `%1` of a position
    capture formats a number, ~0.3 us), GSUB_TABLE per table lookup. A function
    replacement is Lua, so the hook fires in it. Scan and replacements get half the budget
    each.
  * Plain find (4th argument true, or no special character in p) is LuaJIT's memchr+memcmp
    search: (n-#p+1) candidate starts at PLAIN_CANDIDATE units plus #p/PLAIN_BYTES each.
  The C function is used when the bound is at most MAX_C_STEPS = 1e6 units. Measured on the
  2-core AMD EPYC build host (lupa 2.8's LuaJIT 2.1, JIT off) at the largest n that still
  goes to C: q = 0 patterns of many `[set]` / `%a` items 2.4-2.6 ms (the worst shape),
  `.-b` / `a*b` 1.0 ms, `.-.-b` 0.24 ms, `%b()` 0.07 ms, back-references 0.02 ms. So one C
  call stays under ~2.5 ms here; a Raspberry Pi class hub is roughly 5-10x slower.
  Above the bound:
  * plain find scans overlapping windows with the C function from a Lua loop (the hook fires
    between windows); needles longer than PLAIN_PREFIX bytes are located by their prefix
    and verified VERIFY_CHUNK bytes at a time;
  * a well-formed pattern without `* + - %b %1..%9` matches at most #p bytes from a start,
    so the subject is scanned in overlapping windows with the C function, too;
  * everything else runs the Lua matcher below, whose functions run with the JIT off so the
    count hook fires inside them. Its start-position loop uses a windowed C search for the
    pattern's first mandatory single-character item to skip impossible starts.
  gmatch decides per step (on the remaining length); gsub's Lua loop finds each match by the
  same rules and builds the result in Lua.

gsub with a replacement function or table always takes the Lua path: called from the C
function, a replacement that calls gsub again nests C calls until the C stack overflows
(a segfault); from Lua, nesting ends in a "stack overflow" error.

Known difference: a gsub replacement function may yield (the C function would raise
"attempt to yield across C-call boundary"). Out-of-range numbers for
`init` are converted the way this platform's LuaJIT converts them (probed at load time).
]]

local string_lib = ...

local jit = jit
if jit and jit.off then jit.off(true, true) end  -- every function below: interpreted, hookable

local type, select, tonumber, error, setmetatable, next =
  type, select, tonumber, error, setmetatable, next
local unpack = unpack or table.unpack
local concat = table.concat
local floor, ceil, huge = math.floor, math.ceil, math.huge
local c_find, c_match = string_lib.find, string_lib.match
local c_gmatch, c_gsub = string_lib.gmatch, string_lib.gsub
local byte, sub, char = string_lib.byte, string_lib.sub, string_lib.char
local getinfo = debug and debug.getinfo

-- Tuning. The optional second vararg overrides these (tests use tiny values to drive every
-- path with short strings); the host passes only the string library.
local opts = select(2, ...) or {}
local MAX_C_STEPS = opts.max_c_steps or 1000000  -- cost units allowed in one C call (~2.5 ms)
local PLAIN_PREFIX = opts.plain_prefix or 256     -- longer needles: find the prefix, verify rest
local VERIFY_CHUNK = opts.verify_chunk or 65536   -- bytes compared per verification step
local MIN_WINDOW = opts.min_window or 64          -- fewer starts per window: not worth a copy
local CACHE_MAX = 512                             -- analysed patterns kept (strings never weak)
local CACHE_LEN = 4096                            -- longer patterns are analysed on every call
local SCAN_CHUNK = 65536                          -- bytes per C scan of a pattern or replacement

-- Cost units besides pattern steps (one unit ~ one worst-case pattern step, see the header).
local PLAIN_CANDIDATE = 3      -- plain find: per candidate start (memchr hit + memcmp call)
local PLAIN_BYTES = 128        -- plain find: compared bytes per unit
local GSUB_MATCH = 8           -- gsub: per match (buffer bookkeeping)
local GSUB_BYTE = 2            -- gsub: per replacement byte (added one at a time)
local GSUB_REF = 120           -- gsub: per % in the replacement (a position formats a number)
local GSUB_TABLE = 25          -- gsub: per table lookup

local MAXCAPTURES, MAXDEPTH = 32, 200          -- LUA_MAXCAPTURES, LJ_MAX_XLEVEL
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local INT_MIN = -2147483648

-- How this platform's lj_num2int turns huge positive `init` values into int32: x86 gives
-- INT_MIN (search from the start), saturating targets give INT_MAX (search from the end).
local BIG_POS_INIT = c_find("ab", "a", 2 ^ 40) and INT_MIN or 2147483647

-- Character classes exactly as the C matcher sees them: CLASS[byte of letter][byte] -> bool.
local CLASS = {}
do
  local letters = "acdglpsuwxz"
  for k = 1, #letters do
    local lower = byte(letters, k)
    local upper = lower - 32
    local pos, neg = {}, {}
    local set = "[%" .. char(lower) .. "]"
    for c = 0, 255 do
      local m = c_find(char(c), set) ~= nil
      pos[c], neg[c] = m, not m
    end
    CLASS[lower], CLASS[upper] = pos, neg
  end
end

-- Functions whose callers pattern errors are attributed to (the public entry points).
local entries = setmetatable({}, { __mode = "k" })

--- Raise a pattern error at the caller of the innermost public entry, like lj_err_caller.
local function fail(msg)
  if getinfo then
    local level = 2
    while true do
      local info = getinfo(level, "f")
      if info == nil then break end
      if entries[info.func] then error(msg, level + 1) end
      level = level + 1
    end
  end
  error(msg, 0)
end

local function pass(...) return ... end

local function pack(...) return { n = select("#", ...), ... } end

--- Pattern bytes with a 0 sentinel after the end (the C code relies on the NUL terminator).
local function pattern_bytes(p)
  local n, P = #p, {}
  local i = 1
  while i <= n do
    local j = i + 4095
    if j > n then j = n end
    local chunk = { byte(p, i, j) }
    for k = 1, #chunk do P[i + k - 1] = chunk[k] end
    i = j + 1
  end
  P[n + 1] = 0
  return P
end

---------------------------------------------------------------------------------------------
-- The Lua matcher: a line-by-line port of LuaJIT 2.1's match machinery. Positions are
-- 1-based; subject position N+1 is the end, pattern byte 0 is the end. Each engine owns its
-- state, so nested calls (a gsub callback calling find) and coroutines never share one.
---------------------------------------------------------------------------------------------

local function new_engine()
  local S, N, P = nil, 0, nil
  local level, depth = 0, 0
  local cinit, clen = {}, {}
  local match

  local function classend(j)
    local c = P[j]
    j = j + 1
    if c == 37 then                                   -- '%'
      if P[j] == 0 then fail("malformed pattern (ends with '%')") end
      return j + 1
    elseif c == 91 then                               -- '['
      if P[j] == 94 then j = j + 1 end
      repeat
        local cc = P[j]
        if cc == 0 then fail("malformed pattern (missing ']')") end
        j = j + 1
        if cc == 37 and P[j] ~= 0 then j = j + 1 end
      until P[j] == 93
      return j + 1
    end
    return j
  end

  local function match_class(c, cl)
    local t = CLASS[cl]
    if t then return t[c] end
    return cl == c
  end

  local function matchbracketclass(c, j, ec)
    local sig = true
    if P[j + 1] == 94 then sig = false; j = j + 1 end
    j = j + 1
    while j < ec do
      local pc = P[j]
      if pc == 37 then
        j = j + 1
        if match_class(c, P[j]) then return sig end
      elseif P[j + 1] == 45 and j + 2 < ec then
        if pc <= c and c <= P[j + 2] then return sig end
        j = j + 2
      elseif pc == c then
        return sig
      end
      j = j + 1
    end
    return not sig
  end

  local function singlematch(c, j, ep)
    local pc = P[j]
    if pc == 46 then return true end                  -- '.'
    if pc == 37 then return match_class(c, P[j + 1]) end
    if pc == 91 then return matchbracketclass(c, j, ep - 1) end
    return pc == c
  end

  local function matchbalance(i, j)
    local b = P[j]
    if b == 0 or P[j + 1] == 0 then fail("unbalanced pattern") end
    if i > N or byte(S, i) ~= b then return nil end
    local e, cont = P[j + 1], 1
    i = i + 1
    while i <= N do
      local c = byte(S, i)
      if c == e then
        cont = cont - 1
        if cont == 0 then return i + 1 end
      elseif c == b then
        cont = cont + 1
      end
      i = i + 1
    end
    return nil
  end

  local function max_expand(i, j, ep)
    local k = 0
    if P[j] == 46 then
      k = N - i + 1
    else
      while i + k <= N and singlematch(byte(S, i + k), j, ep) do k = k + 1 end
    end
    while k >= 0 do
      local res = match(i + k, ep + 1)
      if res then return res end
      k = k - 1
    end
    return nil
  end

  local function min_expand(i, j, ep)
    while true do
      local res = match(i, ep + 1)
      if res then return res end
      if i <= N and singlematch(byte(S, i), j, ep) then
        i = i + 1
      else
        return nil
      end
    end
  end

  local function start_capture(i, j, what)
    if level >= MAXCAPTURES then fail("too many captures") end
    level = level + 1
    cinit[level], clen[level] = i, what
    local res = match(i, j)
    if not res then level = level - 1 end
    return res
  end

  local function end_capture(i, j)
    local l = level
    while l >= 1 and clen[l] ~= CAP_UNFINISHED do l = l - 1 end
    if l < 1 then fail("invalid pattern capture") end
    clen[l] = i - cinit[l]
    local res = match(i, j)
    if not res then clen[l] = CAP_UNFINISHED end
    return res
  end

  local function match_capture(i, d)
    local l = d - 48                                  -- 1-based capture index
    if l < 1 or l > level or clen[l] == CAP_UNFINISHED then
      fail("invalid capture index")
    end
    local len = clen[l]
    if len == CAP_POSITION then return nil end        -- (size_t)-2: never fits
    if N - i + 1 >= len then
      local init = cinit[l]
      if len == 0 or sub(S, init, init + len - 1) == sub(S, i, i + len - 1) then
        return i + len
      end
    end
    return nil
  end

  match = function(i, j)
    depth = depth + 1
    if depth > MAXDEPTH then fail("pattern too complex") end
    while true do
      local pc = P[j]
      if pc == 40 then                                -- '('
        if P[j + 1] == 41 then
          i = start_capture(i, j + 2, CAP_POSITION)
        else
          i = start_capture(i, j + 1, CAP_UNFINISHED)
        end
        break
      elseif pc == 41 then                            -- ')'
        i = end_capture(i, j + 1)
        break
      elseif pc == 0 then                             -- end of pattern
        break
      end
      local pn = P[j + 1]
      if pc == 37 and pn == 98 then                   -- %b
        i = matchbalance(i, j + 2)
        if not i then break end
        j = j + 4
      elseif pc == 37 and pn == 102 then              -- %f
        j = j + 2
        if P[j] ~= 91 then fail("missing '[' after '%f' in pattern") end
        local ep = classend(j)
        local prev = (i == 1) and 0 or byte(S, i - 1)
        local cur = (i <= N) and byte(S, i) or 0
        if matchbracketclass(prev, j, ep - 1) or not matchbracketclass(cur, j, ep - 1) then
          i = nil
          break
        end
        j = ep
      elseif pc == 37 and pn >= 48 and pn <= 57 then  -- %0-%9
        i = match_capture(i, pn)
        if not i then break end
        j = j + 2
      elseif pc == 36 and pn == 0 then                -- '$' at the end
        if i ~= N + 1 then i = nil end
        break
      else                                            -- a single-character item
        local ep = classend(j)
        local m = i <= N and singlematch(byte(S, i), j, ep)
        local q = P[ep]
        if q == 63 then                               -- '?'
          local res = m and match(i + 1, ep + 1)
          if res then i = res; break end
          j = ep + 1
        elseif q == 42 then                           -- '*'
          i = max_expand(i, j, ep)
          break
        elseif q == 43 then                           -- '+'
          i = m and max_expand(i + 1, j, ep) or nil
          break
        elseif q == 45 then                           -- '-'
          i = min_expand(i, j, ep)
          break
        elseif m then
          i = i + 1
          j = ep
        else
          i = nil
          break
        end
      end
    end
    depth = depth - 1
    return i
  end

  local eng = {}

  function eng.setup(s, n, pbytes)
    S, N, P = s, n, pbytes
  end

  function eng.clear()
    S, P = nil, nil
  end

  --- Try one start position; returns the exclusive end of the match or nil.
  function eng.try(i)
    level, depth = 0, 0
    return match(i, 1)
  end

  function eng.level()
    return level
  end

  --- push_onecapture: capture k (0-based) of the match [s, e).
  function eng.capture(k, s, e)
    if k >= level then
      if k == 0 then return sub(S, s, e - 1) end
      fail("invalid capture index")
    end
    local len = clen[k + 1]
    if len == CAP_UNFINISHED then fail("unfinished capture") end
    if len == CAP_POSITION then return cinit[k + 1] end
    local init = cinit[k + 1]
    return sub(S, init, init + len - 1)
  end

  return eng
end

local pool, npool = {}, 0

local function acquire(s, n, P)
  local eng
  if npool > 0 then
    eng = pool[npool]
    pool[npool] = nil
    npool = npool - 1
  else
    eng = new_engine()
  end
  eng.setup(s, n, P)
  return eng
end

local function release(eng)
  eng.clear()
  if npool < 8 then
    npool = npool + 1
    pool[npool] = eng
  end
end

---------------------------------------------------------------------------------------------
-- Pattern analysis: the quantities of the cost model, whether the pattern is well formed
-- (then no C call on it can raise an error, so C may be called from inside this module),
-- and the first mandatory single-character item used to skip impossible start positions.
---------------------------------------------------------------------------------------------

--- classend without errors: the index after the item at j, or nil if it is malformed.
local function item_end(P, j)
  local c = P[j]
  j = j + 1
  if c == 37 then
    if P[j] == 0 then return nil end
    return j + 1
  elseif c == 91 then
    if P[j] == 94 then j = j + 1 end
    repeat
      local cc = P[j]
      if cc == 0 then return nil end
      j = j + 1
      if cc == 37 and P[j] ~= 0 then j = j + 1 end
    until P[j] == 93
    return j + 1
  end
  return j
end

--- Largest n >= -1 with (n+1)^e * k <= limit.
local function max_len(e, k, limit)
  if k > limit then return -1 end
  if e == 0 then return huge end
  local x = floor((limit / k) ^ (1 / e)) - 1
  while x >= 0 and (x + 1) ^ e * k > limit do x = x - 1 end
  while (x + 2) ^ e * k <= limit do x = x + 1 end
  return x
end

--- Analyse a pattern body as match() sees it (anchor already removed).
local function analyse_body(body)
  local z = c_find(body, "\0", 1, true)
  if z then body = sub(body, 1, z - 1) end
  local P = pattern_bytes(body)
  local plen = #body
  local U, R, maxlen, ncap, depth = 0, 0, 0, 0, 1
  local open, poscap = {}, {}
  local ok = true
  local pre, in_prefix = nil, true
  local j = 1
  while true do
    local c = P[j]
    if c == 0 then break end
    local pn = P[j + 1]
    if c == 40 then                                   -- '(' or '()'
      if ncap >= MAXCAPTURES then ok = false; break end
      ncap = ncap + 1
      depth = depth + 1
      if pn == 41 then
        poscap[ncap] = true
        j = j + 2
      else
        open[#open + 1] = ncap
        j = j + 1
      end
    elseif c == 41 then                               -- ')'
      if #open == 0 then ok = false; break end
      open[#open] = nil
      depth = depth + 1
      in_prefix = false
      j = j + 1
    elseif c == 37 and pn == 98 then                  -- %b
      in_prefix = false
      if P[j + 2] == 0 or P[j + 3] == 0 then ok = false; break end
      U = U + 1
      j = j + 4
    elseif c == 37 and pn == 102 then                 -- %f
      in_prefix = false
      if P[j + 2] ~= 91 then ok = false; break end
      local ep = item_end(P, j + 2)
      if not ep then ok = false; break end
      j = ep
    elseif c == 37 and pn >= 48 and pn <= 57 then     -- back-reference
      in_prefix = false
      local l = pn - 48
      local closed = l >= 1 and l <= ncap
      for k = 1, #open do
        if open[k] == l then closed = false end
      end
      if not closed then ok = false; break end
      U = U + 1
      j = j + 2
    elseif c == 36 and pn == 0 then                   -- '$' at the end
      in_prefix = false
      j = j + 1
    else
      local ep = item_end(P, j)
      if not ep then ok = false; break end
      local q = P[ep]
      if in_prefix then
        in_prefix = false
        if q ~= 63 and q ~= 42 and q ~= 45 and c ~= 46 then
          if c == 37 or c == 91 then
            pre = { item = sub(body, j, ep - 1), cost = ep - j + 1 }
          else
            pre = { char = char(c) }
          end
        end
      end
      if q == 63 then
        R = R + 1
        depth = depth + 1
        maxlen = maxlen + 1
        j = ep + 1
      elseif q == 42 or q == 43 or q == 45 then
        U = U + 1
        depth = depth + 1
        j = ep + 1
      else
        maxlen = maxlen + 1
        j = ep
      end
    end
  end
  if #open > 0 or depth >= MAXDEPTH - 10 then ok = false end
  local K = 2 ^ R * (plen + 1)
  return {
    body = body,
    P = P,
    ok = ok,
    U = U,
    K = K,
    ncap = ncap,
    poscap = poscap,
    maxlen = maxlen,
    pre = pre,
    lit = (byte(body, 1) == 94) and ("%" .. body) or body,
    maxn = max_len(U + 1, K, MAX_C_STEPS),            -- unanchored scan fits one C call
  }
end

--- Cost of a plain find over `starts` candidate starts with a needle of m bytes.
local function plain_cost(starts, m)
  return starts * (PLAIN_CANDIDATE + m / PLAIN_BYTES)
end

--- Largest subject length for which a plain find of an m-byte needle fits one C call.
local function plain_maxn(m)
  if m == 0 then return huge end
  return floor(MAX_C_STEPS / (PLAIN_CANDIDATE + m / PLAIN_BYTES)) + m - 1
end

local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]"

--- lj_str_haspattern, in bounded C calls.
local function has_specials(p)
  for i = 1, #p, SCAN_CHUNK do
    if c_find(sub(p, i, i + SCAN_CHUNK - 1), SPECIALS) then return true end
  end
  return false
end

local cache, cache_n = {}, 0

--- Analysis for find / match / gsub (a leading '^' anchors).
local function analyse(p)
  local info = cache[p]
  if info then return info end
  local anchored = byte(p, 1) == 94
  local a = analyse_body(anchored and sub(p, 2) or p)
  a.anchored = anchored
  a.haspattern = has_specials(p)
  a.plain_m = #p
  a.maxn_plain = plain_maxn(#p)
  a.maxn_pat = anchored and max_len(a.U, a.K, MAX_C_STEPS) or a.maxn
  a.maxn_find = a.haspattern and a.maxn_pat or a.maxn_plain
  -- gsub: half the budget for the scan, half for the replacements (checked per call)
  a.maxn_gsub = anchored and max_len(a.U, a.K, MAX_C_STEPS / 2)
                or max_len(a.U + 1, a.K, MAX_C_STEPS / 2)
  if #p <= CACHE_LEN then
    if cache_n >= CACHE_MAX then cache, cache_n = {}, 0 end
    cache[p] = a
    cache_n = cache_n + 1
  end
  return a
end

--- Analysis for gmatch (a leading '^' is a literal character there).
local function analyse_gmatch(p)
  local info = analyse(p)
  local g = info.gmatch
  if not g then
    g = info.anchored and analyse_body(p) or info
    info.gmatch = g
  end
  return g
end

---------------------------------------------------------------------------------------------
-- Searching: the first match at or after a start position, by the cheapest safe means.
---------------------------------------------------------------------------------------------

--- Plain search for p (length m >= 1) in s from position a, in bounded C calls.
local function plain_search(s, n, p, m, a)
  local last = n - m + 1                              -- last possible start
  if a > last then return nil end
  if plain_cost(last - a + 1, m) <= MAX_C_STEPS then
    return c_find(s, p, a, true)
  end
  local k = m < PLAIN_PREFIX and m or PLAIN_PREFIX
  local pre = (k == m) and p or sub(p, 1, k)
  local width = floor(MAX_C_STEPS / (PLAIN_CANDIDATE + k / PLAIN_BYTES))
  if width > 4194304 then width = 4194304 elseif width < 1 then width = 1 end
  while a <= last do
    local b = a + width - 1                           -- starts a..b in this window
    if b > last then b = last end
    local w = sub(s, a, b + k - 1)
    local init = 1
    while true do
      local f = c_find(w, pre, init, true)
      if not f then break end
      local c = a + f - 1
      if k == m then return c, c + m - 1 end
      local same, off = true, k
      while off < m do                                -- verify the rest, one chunk a step
        local e = off + VERIFY_CHUNK
        if e > m then e = m end
        if sub(s, c + off, c + e - 1) ~= sub(p, off + 1, e) then same = false; break end
        off = e
      end
      if same then return c, c + m - 1 end
      init = f + 1
    end
    a = b + 1
  end
  return nil
end

--- Windowed C search for a well-formed pattern whose matches are at most maxlen long.
-- Returns a find-style result table {st, fe, caps..., n = ncaps} or nil.
local function window_search(s, n, lit, a, per_start, maxlen, poscap)
  local width = floor(MAX_C_STEPS / per_start)
  if width < 1 then width = 1 end
  while a <= n + 1 do
    local last = a + width - 1
    local hi = last + maxlen                          -- context a match from `last` may see
    if hi >= n then
      local r = pack(c_find(s, lit, a))
      if r[1] == nil then return nil end
      return r
    end
    local lo = (a > 1) and a - 1 or 1                 -- keep the previous byte for %f
    local off = lo - 1
    local r = pack(c_find(sub(s, lo, hi), lit, a - off))
    if r[1] ~= nil and r[1] + off <= last then
      r[1], r[2] = r[1] + off, r[2] + off
      for k = 3, r.n do
        if poscap[k - 2] then r[k] = r[k] + off end
      end
      return r
    end
    a = last + 1
  end
  return nil
end

local NO_CAPTURES = {}

--- Next start position >= a where the pattern's first mandatory item can match.
local function prefilter_next(s, n, pre, a)
  if a > n then return nil end
  if pre.char then return (plain_search(s, n, pre.char, 1, a)) end
  local r = window_search(s, n, pre.item, a, pre.cost, 1, NO_CAPTURES)
  return r and r[1]
end

--- The first match at or after a. Returns start, exclusive end, and either a find-style
-- result table (C did the work) or nil (the engine `eng` holds the captures).
local function search(s, n, info, a, anchored, eng)
  local m = n - a + 1
  if info.ok then
    local r
    if anchored then
      if (m + 1) ^ info.U * info.K <= MAX_C_STEPS then
        r = pack(c_find(s, "^" .. info.body, a))
        if r[1] == nil then return nil end
      end
    elseif (m + 1) ^ (info.U + 1) * info.K <= MAX_C_STEPS then
      r = pack(c_find(s, info.lit, a))
      if r[1] == nil then return nil end
    elseif info.U == 0 and info.K * MIN_WINDOW <= MAX_C_STEPS then
      r = window_search(s, n, info.lit, a, info.K, info.maxlen, info.poscap)
      if r == nil then return nil end
    end
    if r then
      r.n = r.n - 2
      return r[1], r[2] + 1, r
    end
  end
  if anchored then
    local e = eng.try(a)
    if e then return a, e end
    return nil
  end
  local pre = info.pre
  while a <= n + 1 do
    if pre then
      a = prefilter_next(s, n, pre, a)
      if not a then return nil end
    end
    local e = eng.try(a)
    if e then return a, e end
    a = a + 1
  end
  return nil
end

--- Capture k (0-based) of the match [ms, me): from C results or from the engine.
local function get_capture(s, eng, r, k, ms, me)
  if r then
    if k < r.n then return r[k + 3] end
    if k == 0 then return sub(s, ms, me - 1) end
    fail("invalid capture index")
  end
  return eng.capture(k, ms, me)
end

--- All captures of a match (whole match if none and whole is true) into t; returns count.
local function get_captures(s, eng, r, ms, me, whole, t)
  local cnt = r and r.n or eng.level()
  if cnt == 0 and whole then
    t[1] = sub(s, ms, me - 1)
    return 1
  end
  for k = 0, cnt - 1 do t[k + 1] = get_capture(s, eng, r, k, ms, me) end
  return cnt
end

---------------------------------------------------------------------------------------------
-- Argument handling, matching lj_lib_checkstr / lj_lib_optint / luaL_optint.
---------------------------------------------------------------------------------------------

local function tostr(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return v .. "" end
  return nil
end

local function tonum(v)
  local t = type(v)
  if t == "number" then return v end
  if t == "string" then return tonumber(v) end
  return nil
end

--- lj_num2int: truncation, platform conversion for values outside int32.
local function toint32(x)
  if x ~= x then return INT_MIN end
  if x >= 2147483648 then return BIG_POS_INIT end
  if x <= -2147483649 then return INT_MIN end
  if x >= 0 then return floor(x) end
  return ceil(x)
end

--- (int)luaL_optinteger: truncation to int64, then the low 32 bits.
local function toint_gsub(x)
  if x ~= x or x >= 9223372036854775808 or x < -9223372036854775808 then return 0 end
  local t = (x >= 0) and floor(x) or ceil(x)
  t = t % 4294967296
  if t >= 2147483648 then t = t - 4294967296 end
  return t
end

--- str_find_aux's start position, as a 1-based index in 1..n+1.
local function first_start(init, n)
  local start = (init == nil) and 1 or toint32(init)
  if start < 0 then start = start + n else start = start - 1 end
  if start < 0 then start = 0 end
  if start > n then start = n end
  return start + 1
end

---------------------------------------------------------------------------------------------
-- find and match
---------------------------------------------------------------------------------------------

local function find_work(isfind, s, p, info, a, plain)
  local n = #s
  if isfind and (plain or not info.haspattern) then
    local m = #p
    if m == 0 then return a, a - 1 end
    return plain_search(s, n, p, m, a)
  end
  local eng = acquire(s, n, info.P)
  local ms, me, r = search(s, n, info, a, info.anchored, eng)
  if not ms then
    release(eng)
    return nil
  end
  local t = {}
  local cnt
  if isfind then
    cnt = get_captures(s, eng, r, ms, me, false, t)
  else
    cnt = get_captures(s, eng, r, ms, me, true, t)
  end
  release(eng)
  if isfind then return ms, me - 1, unpack(t, 1, cnt) end
  return unpack(t, 1, cnt)
end

local function find(...)
  local s, p, init, plain = ...
  local info = cache[p]
  if info ~= nil and type(s) == "string" then
    if plain then
      if #s <= info.maxn_plain then return c_find(...) end
    elseif #s <= info.maxn_find then
      return c_find(...)
    end
  end
  s, p = tostr(s), tostr(p)
  if s == nil or p == nil or (init ~= nil and tonum(init) == nil) then
    return c_find(...)                                -- raises LuaJIT's own argument error
  end
  info = analyse(p)
  local n = #s
  if plain then
    if n <= info.maxn_plain then return c_find(...) end
  elseif n <= info.maxn_find then
    return c_find(...)
  end
  return pass(find_work(true, s, p, info, first_start(tonum(init), n), plain))
end

local function match(...)
  local s, p, init = ...
  local info = cache[p]
  if info ~= nil and type(s) == "string" and #s <= info.maxn_pat then
    return c_match(...)
  end
  s, p = tostr(s), tostr(p)
  if s == nil or p == nil or (init ~= nil and tonum(init) == nil) then
    return c_match(...)
  end
  info = analyse(p)
  local n = #s
  if n <= info.maxn_pat then return c_match(...) end
  return pass(find_work(false, s, p, info, first_start(tonum(init), n), false))
end

---------------------------------------------------------------------------------------------
-- gmatch
---------------------------------------------------------------------------------------------

local function gmatch(...)
  local s, p = ...
  s, p = tostr(s), tostr(p)
  if s == nil or p == nil then return c_gmatch(...) end
  local info = analyse_gmatch(p)
  local n = #s
  if n <= info.maxn then return c_gmatch(s, p) end
  local pos = 1                                       -- next start position
  local iter
  local function step()
    if pos > n + 1 then return end
    local eng = acquire(s, n, info.P)
    local ms, me, r = search(s, n, info, pos, false, eng)
    if not ms then
      release(eng)
      return
    end
    pos = (me == ms) and me + 1 or me
    local t = {}
    local cnt = get_captures(s, eng, r, ms, me, true, t)
    release(eng)
    return unpack(t, 1, cnt)
  end
  iter = function()
    return pass(step())
  end
  entries[iter] = true
  return iter
end

---------------------------------------------------------------------------------------------
-- gsub
---------------------------------------------------------------------------------------------

--- Split a replacement string into literal pieces and capture references (add_s).
local function parse_repl(repl)
  local pieces, np = {}, 0
  local lit_start, i, l = 1, 1, #repl
  while i <= l do
    if byte(repl, i) == 37 then
      if i > lit_start then np = np + 1; pieces[np] = sub(repl, lit_start, i - 1) end
      local d = byte(repl, i + 1)                     -- nil past the end: the C code reads NUL
      if d == nil then
        np = np + 1; pieces[np] = "\0"
      elseif d >= 48 and d <= 57 then
        np = np + 1; pieces[np] = d - 49             -- -1: whole match; 0..8: capture index
      else
        np = np + 1; pieces[np] = char(d)
      end
      i = i + 2
      lit_start = i
    else
      i = i + 1
    end
  end
  if lit_start <= l then np = np + 1; pieces[np] = sub(repl, lit_start, l) end
  return pieces, np
end

local function gsub_work(s, p, info, repl, tr, max_s)
  local n = #s
  local anchored = info.anchored
  local eng = acquire(s, n, info.P)
  local out, no = {}, 0                               -- pieces of the result
  local done, nd = {}, 0                              -- pieces collapsed 1024 at a time
  local pieces, np
  if tr == "string" then pieces, np = parse_repl(repl) end
  local args = {}
  local src, copied, count = 1, 1, 0
  while count < max_s do
    local ms, me, r = search(s, n, info, src, anchored, eng)
    if not ms then break end
    count = count + 1
    if ms > copied then no = no + 1; out[no] = sub(s, copied, ms - 1) end
    if tr == "string" then
      for k = 1, np do
        local piece = pieces[k]
        if type(piece) == "number" then
          if piece < 0 then
            piece = sub(s, ms, me - 1)
          else
            piece = get_capture(s, eng, r, piece, ms, me)
          end
          if type(piece) == "number" then piece = piece .. "" end
        end
        no = no + 1
        out[no] = piece
      end
    else
      local v
      if tr == "function" then
        local cnt = get_captures(s, eng, r, ms, me, true, args)
        v = repl(unpack(args, 1, cnt))
      else
        v = repl[get_capture(s, eng, r, 0, ms, me)]
      end
      if not v then
        v = sub(s, ms, me - 1)
      else
        local tv = type(v)
        if tv == "number" then
          v = v .. ""
        elseif tv ~= "string" then
          fail("invalid replacement value (a " .. tv .. ")")
        end
      end
      no = no + 1
      out[no] = v
    end
    if no >= 1024 then
      nd = nd + 1
      done[nd] = concat(out, "", 1, no)
      no = 0
    end
    if me > ms then
      src, copied = me, me
    elseif ms <= n then
      src, copied = ms + 1, ms
    else
      copied = ms
      break
    end
    if anchored then break end
  end
  release(eng)
  if copied <= n then no = no + 1; out[no] = sub(s, copied, n) end
  nd = nd + 1
  done[nd] = concat(out, "", 1, no)
  return concat(done, "", 1, nd), count
end

local rcache, rcache_n = {}, 0

--- Number of '%' bytes in s, in bounded C calls.
local function count_escapes(s)
  local refs = 0
  for i = 1, #s, SCAN_CHUNK do
    local _, k = c_gsub(sub(s, i, i + SCAN_CHUNK - 1), "%%", "")
    refs = refs + k
  end
  return refs
end

--- Cost units of building one replacement string in C (add_s); cached per string.
local function repl_string_cost(repl)
  local c = rcache[repl]
  if c then return c end
  c = GSUB_MATCH + #repl * GSUB_BYTE + count_escapes(repl) * GSUB_REF
  if #repl <= CACHE_LEN then
    if rcache_n >= CACHE_MAX then rcache, rcache_n = {}, 0 end
    rcache[repl] = c
    rcache_n = rcache_n + 1
  end
  return c
end

--- Cost units of building one replacement in C (add_value).
local function repl_cost(repl, tr)
  if tr == "string" then return repl_string_cost(repl) end
  if tr == "table" then return GSUB_MATCH + GSUB_TABLE end
  if tr == "number" then return GSUB_MATCH + 24 * GSUB_BYTE end
  return GSUB_MATCH                                   -- function: the call itself is hookable
end

local function gsub(...)
  local s, p, repl, max_s = ...
  local info = cache[p]
  local tr = type(repl)
  -- A replacement function or table (its __index) runs driver code from inside the C
  -- function: a replacement that calls gsub again would nest C calls until the C stack
  -- overflows (a crash, not an error). Those always take the Lua path, where the calls are
  -- plain Lua calls and deep nesting ends in "stack overflow".
  local callback = tr == "function" or tr == "table"
  if info ~= nil and not callback and type(s) == "string" then
    local n = #s
    if n <= info.maxn_gsub
       and (n + 1) * (rcache[repl] or repl_cost(repl, type(repl))) <= MAX_C_STEPS / 2 then
      return c_gsub(...)
    end
  end
  s, p = tostr(s), tostr(p)
  if s == nil or p == nil or (max_s ~= nil and tonum(max_s) == nil)
     or not (tr == "string" or tr == "number" or callback) then
    return c_gsub(...)   -- a bad argument: the C function raises the error
  end
  if tr == "number" then repl, tr = repl .. "", "string" end
  info = analyse(p)
  local n = #s
  if n <= info.maxn_gsub and not callback then
    local pm = repl_cost(repl, tr)
    if tr == "string" and next(info.poscap) == nil then
      pm = pm - count_escapes(repl) * (GSUB_REF - GSUB_BYTE)  -- no positions: %n is a memcpy
    end
    if (n + 1) * pm <= MAX_C_STEPS / 2 then return c_gsub(...) end
  end
  local mx = (max_s == nil) and n + 1 or toint_gsub(tonum(max_s))
  return pass(gsub_work(s, p, info, repl, tr, mx))
end

entries[find] = true
entries[match] = true
entries[gsub] = true

if jit and jit.off then
  jit.off(find, true)
  jit.off(match, true)
  jit.off(gmatch, true)
  jit.off(gsub, true)
end

return { find = find, match = match, gmatch = gmatch, gsub = gsub }
