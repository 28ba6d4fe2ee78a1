--[[
hubhost/sort.lua -- table.sort that the CPU hook can interrupt, O(n log n) in the worst case.

Why: LuaJIT's table.sort is C (Lua 5.1's quicksort). With the default `<` comparator no Lua
code runs inside it, so the instruction-count hook never fires, and an adversarial input (a
"quicksort killer") makes it quadratic: ~25 s for 100k numbers in one C call. A comparator
that sorts again also nests C calls without bound.

This is the same algorithm in Lua (median of three, the same partitioning and the same
"invalid order function for sorting" checks, so results and errors match the C function for
valid and for detectably invalid comparators), run interpreted so the hook fires, with an
introsort depth limit: a range still unsorted after 2*log2(n) partitioning levels is
finished by heapsort. Comparisons are at most ~ 2 n log2 n + O(n) whatever the input.

Interface: a chunk run in the privileged host environment; returns sort(t, cmp) with
table.sort's argument checks. Elements are read and written with ordinary indexing (for the
plain arrays sort is meant for that is the raw access of the C function).
]]

local jit = jit
if jit and jit.off then jit.off(true, true) end  -- everything below: interpreted, hookable

local type, error, pcall, floor = type, error, pcall, math.floor
local str_match = string.match

local function invalid() error("invalid order function for sorting", 0) end
-- The default order. One algorithm for both cases: a call per comparison costs ~1.5x over
-- an inline `<` here, but one copy of the code keeps the bytecode cached and small.
local function lt(a, b) return a < b end

-- Move v down from `root` in the heap t[o+1 .. o+size] until its children are not above it.
local function sift(t, o, root, size, v, cmp)
  while true do
    local child = 2 * root
    if child > size then break end
    local cv = t[o + child]
    if child < size then
      local c2 = t[o + child + 1]
      if cmp(cv, c2) then child, cv = child + 1, c2 end
    end
    if not cmp(v, cv) then break end
    t[o + root] = cv
    root = child
  end
  t[o + root] = v
end

local function heapsort(t, l, u, cmp)
  local o, n = l - 1, u - l + 1
  for start = floor(n / 2), 1, -1 do
    sift(t, o, start, n, t[o + start], cmp)
  end
  for last = n, 2, -1 do
    local v = t[o + last]
    t[o + last] = t[o + 1]
    sift(t, o, 1, last - 1, v, cmp)
  end
end

local function auxsort(t, l, u, cmp, depth)
  while l < u do
    if depth <= 0 then return heapsort(t, l, u, cmp) end
    depth = depth - 1
    -- sort a[l], a[(l+u)/2] and a[u]
    local a, b = t[l], t[u]
    if cmp(b, a) then t[l], t[u] = b, a end
    if u - l == 1 then break end
    local i = floor((l + u) / 2)
    a, b = t[i], t[l]
    if cmp(a, b) then
      t[i], t[l] = b, a
    else
      b = t[u]
      if cmp(b, a) then t[i], t[u] = b, a end
    end
    if u - l == 2 then break end
    local P = t[i]
    t[i], t[u - 1] = t[u - 1], P
    -- a[l] <= P == a[u-1] <= a[u]: partition a[l+1 .. u-2]
    local j = u - 1
    i = l
    while true do
      i = i + 1
      while cmp(t[i], P) do
        if i >= u then invalid() end
        i = i + 1
      end
      j = j - 1
      while cmp(P, t[j]) do
        if j <= l then invalid() end
        j = j - 1
      end
      if j < i then break end
      t[i], t[j] = t[j], t[i]
    end
    t[u - 1], t[i] = t[i], t[u - 1]
    -- a[l..i-1] <= a[i] == P <= a[i+1..u]: recurse into the smaller part, loop on the other
    if i - l < u - i then
      auxsort(t, l, i - 1, cmp, depth)
      l = i + 1
    else
      auxsort(t, i + 1, u, cmp, depth)
      u = i - 1
    end
  end
end

-- 2*floor(log2(n)) partitioning levels before heapsort takes over (introsort)
local function depth_for(n)
  local d = 0
  while n > 1 do n = floor(n / 2) d = d + 2 end
  return d + 2
end

-- Errors of the comparisons themselves ("attempt to compare number with nil") come out as
-- the C function's do: without a position inside this file.
local PREFIX = "^hubhost/sort%S*:%d+: (.*)$"
local function finish(ok, e)
  if ok then return end
  if type(e) == "string" then
    local m = str_match(e, PREFIX)
    if m then e = m end
  end
  error(e, 0)
end

local function sort(t, cmp)
  if type(t) ~= "table" then
    error("bad argument #1 to 'sort' (table expected, got " .. type(t) .. ")", 2)
  end
  if cmp ~= nil and type(cmp) ~= "function" then
    error("bad argument #2 to 'sort' (function expected, got " .. type(cmp) .. ")", 2)
  end
  local n = #t
  if n < 2 then return end
  if cmp == nil then
    cmp = lt
  end
  return finish(pcall(auxsort, t, 1, n, cmp, depth_for(n)))
end

if jit and jit.off then jit.off(sort, true) end
return { sort = sort }
