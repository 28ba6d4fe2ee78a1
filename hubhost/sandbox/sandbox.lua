-- hubhost/sandbox.lua: the privileged bootstrap of one driver runtime.
--
-- Runs once, with the full standard library, before any driver or library code. It keeps
-- the dangerous functions (debug, jit, loadstring, setfenv, ...) in locals of this chunk and
-- hands out only what DESIGN section 2 allows. Nothing here is reachable from driver code
-- except through the functions it deliberately exports into sandbox environments.
--
-- Arguments: host (a table of Python callables, see sandbox.py), patterns (the budgeted
-- string pattern functions from patterns.lua, or nil) and sorter (sort.lua: a table.sort
-- the hook can interrupt).
--
-- Driver code is untrusted, and so is every value it made: host code here never calls a
-- metamethod, __tostring or message handler of the driver's outside the CPU budget, never
-- lets driver code nest C calls without a bound, and never hands driver code the private
-- values (WAIT, DONE, handler coroutines) that host waits are made of.

-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local host, patterns, sorter = ...

local type, pairs, ipairs, next, tostring, tonumber, select, error, pcall, xpcall =
  type, pairs, ipairs, next, tostring, tonumber, select, error, pcall, xpcall
local rawget, rawset, rawequal, setmetatable, getmetatable, unpack, assert =
  rawget, rawset, rawequal, setmetatable, getmetatable, unpack, assert
local loadstring, setfenv = loadstring, setfenv
local string, table, math, coroutine, os, bit = string, table, math, coroutine, os, bit
local dgetmetatable, sethook, traceback = debug.getmetatable, debug.sethook, debug.traceback
local jit_off = jit.off
local str_byte, str_sub, str_format, str_find, str_gsub = string.byte, string.sub, string.format, string.find, string.gsub
local tconcat, tinsert, tremove, tsort = table.concat, table.insert, table.remove, table.sort
local co_create, co_resume, co_yield, co_status, co_running, co_wrap =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.status, coroutine.running, coroutine.wrap
local co_isyieldable = coroutine.isyieldable
local floor, huge = math.floor, math.huge
-- The monotonic clock, read through the FFI (privileged code only): the budget is armed for
-- every event, and a call into Python for the time cost a lock round trip each time.
local host_clock
-- The deadline of the running handler, in a C double that the worker's heartbeat thread
-- reads (hubhost/worker/main.py): the supervisor sees a handler stuck in C from outside.
local busy_cell, busy_address = nil, 0
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    busy_cell = ffi.new("double[1]")
    busy_address = tonumber(ffi.cast("intptr_t", busy_cell))
  end
  if ok and ffi.os == "Linux" then
    ffi.cdef [[
      typedef struct { long tv_sec; long tv_nsec; } hubhost_timespec;
      int clock_gettime(int clk_id, hubhost_timespec *tp);
    ]]
    local ts = ffi.new("hubhost_timespec")
    local clock_gettime, CLOCK_MONOTONIC = ffi.C.clock_gettime, 1
    host_clock = function()
      clock_gettime(CLOCK_MONOTONIC, ts)
      return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
  else
    host_clock = host.clock
  end
end
local host_find_module = host.find_module
local host_rewrite = host.rewrite

local M = {}
M.busy_address = busy_address
M.busy_cell = busy_cell     -- kept referenced here: the heartbeat thread reads its address

---------------------------------------------------------------------------------------------
-- The string metatable is shared by every string in the runtime: point it at a private,
-- dump-free string table and hide it behind __metatable.
local safe_string = {}
for k, v in each_pair(string) do safe_string[k] = v end
safe_string.dump = nil
if patterns then
  safe_string.find, safe_string.match = patterns.find, patterns.match
  safe_string.gmatch, safe_string.gsub = patterns.gmatch, patterns.gsub
end
-- string.format calls a table's __tostring from C for %s (nested C calls, see below):
-- tables and userdata are turned into text in Lua first (tostring tail-calls __tostring).
do
  local c_format = safe_string.format
  local function has_object(n, ...)
    for i = 1, n do
      local tv = type((select(i, ...)))
      if tv == "table" or tv == "userdata" then return true end
    end
    return false
  end
  local function convert(n, ...)
    local args = { ... }
    for i = 1, n do
      local v = args[i]
      local tv = type(v)
      if tv == "table" or tv == "userdata" then args[i] = tostring(v) end
    end
    return unpack(args, 1, n)
  end
  safe_string.format = function(fmt, ...)
    local n = select("#", ...)
    if n == 0 or not has_object(n, ...) then return c_format(fmt, ...) end
    return c_format(fmt, convert(n, ...))
  end
end
string.dump = nil
do
  local smt = dgetmetatable("")
  smt.__index = safe_string
  smt.__metatable = false
end

---------------------------------------------------------------------------------------------
-- CPU budget: an instruction-count hook compares the clock with the deadline of the handler
-- that is running. Driver chunks run interpreted (jit.off) so the hook fires. The clock is
-- monotonic wall time spent running (a parked handler is not running): on a loaded hub a
-- handler is cut at its limit of elapsed time rather than allowed more than that.
local deadline = nil          -- monotonic seconds; nil while idle
local abort_message = nil     -- set once the budget is spent; pcall cannot swallow it

local function cpu_hook()
  if deadline and host_clock() > deadline then
    abort_message = abort_message or "cpu limit exceeded"
    error(abort_message, 0)
  end
end
sethook(cpu_hook, "", 20000)

function M.arm(limit_seconds, label)
  abort_message = nil
  c_depth = 0
  deadline = host_clock() + limit_seconds
  if busy_cell then busy_cell[0] = deadline end
end

function M.armed() return deadline ~= nil end

function M.disarm()
  deadline = nil
  if busy_cell then busy_cell[0] = 0 end
  local m = abort_message
  abort_message = nil
  return m
end

-- After the budget is spent, any error caught by driver code is turned back into the abort.
local function recheck(ok, ...)
  if abort_message then error(abort_message, 0) end
  return ok, ...
end

local function safe_pcall(f, ...)
  return recheck(pcall(f, ...))
end

-- xpcall: LuaJIT runs the message handler for an error raised by the hook with the hook
-- disabled, so a driver's handler would run unbudgeted (`xpcall(spin, spin)` spun forever).
-- Once the budget is spent the driver's handler is not called at all; for other errors it
-- runs with the hook on (a handler that spins is cut and the abort re-raised).
local function safe_xpcall(f, handler, ...)
  if type(handler) ~= "function" then
    error("bad argument #2 to 'xpcall' (function expected, got " .. type(handler) .. ")", 2)
  end
  local function guard(m)
    if abort_message then return abort_message end
    return handler(m)
  end
  if select("#", ...) == 0 then return recheck(xpcall(f, guard)) end
  local args, n = { ... }, select("#", ...)
  return recheck(xpcall(function() return f(unpack(args, 1, n)) end, guard))
end

-- The bundled library's xpcall: its message handlers are ours (bounded), and they must run
-- even for the abort (driver_functions reports a function call's failure from one).
local function library_xpcall(f, handler, ...)
  if select("#", ...) == 0 then return recheck(xpcall(f, handler)) end
  local args, n = { ... }, select("#", ...)
  return recheck(xpcall(function() return f(unpack(args, 1, n)) end, handler))
end

-- The text of an error object, computed while the handler's budget is still armed: a
-- driver's __tostring runs under the hook (and what is left of the budget), never after.
local function error_text(e)
  local te = type(e)
  if te == "string" then return e end
  if te == "number" then return tostring(e) end
  if te == "nil" or te == "boolean" then return "(error object is a " .. te .. " value: " .. tostring(e) .. ")" end
  local ok, s = pcall(tostring, e)
  if abort_message then return abort_message end
  if not ok then
    return "(error object of type " .. te .. "; its __tostring failed: " .. (type(s) == "string" and s or type(s)) .. ")"
  end
  if type(s) ~= "string" then return "(error object of type " .. te .. ")" end
  return s
end
M.error_text = error_text

---------------------------------------------------------------------------------------------
-- Nested C calls. A C function that calls back into Lua keeps its C frame while the callback
-- runs; a callback that calls the same function again nests C frames until the C stack
-- overflows, which is a segfault, not an error. coroutine.resume is such a function (a
-- chain of resumes); the others are avoided: gsub with a function or table replacement
-- takes the Lua matcher (patterns.lua), table.sort is Lua (sort.lua), string.format and
-- os.time get the driver's values converted in Lua first.
local MAX_C_DEPTH = 200      -- LUAI_MAXCCALLS of Lua 5.1
local c_depth = 0            -- nested driver resumes; reset whenever the budget is armed
M.MAX_C_DEPTH = MAX_C_DEPTH

local function depth_error(what)
  error(str_format("%s: too many nested coroutine resumes: limit of %d levels of C calls reached "
    .. "(each coroutine.resume/wrap call inside another one's coroutine is one level)", what, MAX_C_DEPTH), 3)
end

---------------------------------------------------------------------------------------------
-- Tables with 5.2-style __len / __pairs / __ipairs (datastore nodes use them). LuaJIT here
-- ignores those metamethods on tables, so the sandbox honours them in its own functions and
-- the loader rewrites `#x` into `__hh_len(x)`.
local function meta(t, name)
  local mt = dgetmetatable(t)
  if not mt or type(mt) ~= "table" then return nil end
  local f = rawget(mt, name)
  if f == nil then
    -- metatables may share these extra metamethods through one table at __ext (datastore
    -- nodes: one small metatable per node instead of a dozen entries each)
    local ext = rawget(mt, "__ext")
    if type(ext) == "table" then f = rawget(ext, name) end
  end
  return f
end

local function hh_len(x)
  local tx = type(x)
  if tx == "string" then return #x end
  if tx == "table" then
    local f = meta(x, "__len")
    if f then return f(x) end
    return #x
  end
  local f = tx == "userdata" and meta(x, "__len")
  if f then return f(x) end
  error("attempt to get length of a " .. tx .. " value", 2)
end

local function safe_next(t, k)
  local f = type(t) == "table" and meta(t, "__next")
  if f then return f(t, k) end
  return next(t, k)
end

local function safe_pairs(t)
  local f = meta(t, "__pairs")
  if f then return f(t) end
  if type(t) ~= "table" then
    error("bad argument #1 to 'pairs' (table expected, got " .. type(t) .. ")", 2)
  end
  return next, t, nil
end

local function ipairs_step(t, i)
  i = i + 1
  local v = t[i]
  if v ~= nil then return i, v end
end

local function safe_ipairs(t)
  local f = meta(t, "__ipairs")
  if f then return f(t) end
  if type(t) ~= "table" then
    error("bad argument #1 to 'ipairs' (table expected, got " .. type(t) .. ")", 2)
  end
  return ipairs(t)
end

local function safe_rawget(t, k)
  local f = type(t) == "table" and meta(t, "__rawget")
  if f then return f(t, k) end
  return rawget(t, k)
end

local function safe_rawset(t, k, v)
  local f = type(t) == "table" and meta(t, "__rawset")
  if f then f(t, k, v) return t end
  return rawset(t, k, v)
end

local function safe_unpack(t, i, j)
  local f = type(t) == "table" and meta(t, "__backing")
  if f then t = f(t) end
  return unpack(t, i or 1, j or #t)
end

-- table.* on proxies: read-only functions work on the backing table; mutating ones go
-- through the proxy so every write is checked.
local safe_table = {}
for k, v in each_pair(table) do safe_table[k] = v end
safe_table.unpack = safe_unpack

function safe_table.concat(t, sep, i, j)
  local f = type(t) == "table" and meta(t, "__backing")
  if f then t = f(t) end
  return tconcat(t, sep, i, j)
end

function safe_table.insert(t, ...)
  local f = type(t) == "table" and meta(t, "__insert")
  if f then return f(t, ...) end
  return tinsert(t, ...)
end

function safe_table.remove(t, ...)
  local f = type(t) == "table" and meta(t, "__remove")
  if f then return f(t, ...) end
  return tremove(t, ...)
end

-- LuaJIT's C sort is quadratic on adversarial input with no hook firing inside it, and a
-- comparator that sorts nests C calls: sort.lua's introsort is Lua, interruptible, and
-- O(n log n) in the worst case.
local lua_sort = sorter and sorter.sort or tsort
M.sort = lua_sort

function safe_table.sort(t, cmp)
  local f = type(t) == "table" and meta(t, "__sort")
  if f then return f(t, cmp) end
  return lua_sort(t, cmp)
end

function safe_table.maxn(t)
  local f = type(t) == "table" and meta(t, "__backing")
  if f then t = f(t) end
  return table.maxn(t)
end

safe_table.getn = function(t) return hh_len(t) end
safe_table.foreach, safe_table.foreachi, safe_table.setn = nil, nil, nil

---------------------------------------------------------------------------------------------
-- Loading code: text only, rewritten for __hh_len, run in a given environment.
local function compile(src, chunkname, env, interpreted, rewritten)
  if type(src) ~= "string" then
    return nil, "chunk must be a string, got " .. type(src)
  end
  if str_byte(src, 1) == 27 then
    return nil, "attempt to load a binary chunk: only Lua source text may be loaded"
  end
  if not rewritten then src = host_rewrite(src) end
  local fn, err = loadstring(src, chunkname)
  if not fn then return nil, err end
  setfenv(fn, env)
  if interpreted then jit_off(fn, true) end
  return fn, nil
end
M.compile = compile

local function make_load(env_of_caller)
  local function safe_load(chunk, chunkname, mode, env)
    if type(chunk) == "function" then
      local parts = {}
      while true do
        local piece = chunk()
        if piece == nil or piece == "" then break end
        if type(piece) ~= "string" then return nil, "reader function must return a string" end
        parts[#parts + 1] = piece
      end
      chunk = tconcat(parts)
    end
    if mode ~= nil and type(mode) ~= "string" then return nil, "bad load mode" end
    if mode and not str_find(mode, "t", 1, true) then
      return nil, "attempt to load a text chunk (mode is '" .. mode .. "')"
    end
    if env ~= nil and type(env) ~= "table" then return nil, "load: env must be a table" end
    local name = chunkname
    if type(name) ~= "string" then name = "=(load)" end
    return compile(chunk, name, env or env_of_caller, true)
  end
  local function safe_loadstring(s, chunkname)
    return safe_load(s, chunkname)
  end
  return safe_load, safe_loadstring
end

---------------------------------------------------------------------------------------------
-- Environments.
local banned_modules = {
  ffi = true, jit = true, debug = true, io = true, os = true, package = true,
  python = true, ["jit.util"] = true, ["jit.profile"] = true, ["table.new"] = true,
  ["table.clear"] = true, ["string.buffer"] = true,
}

local library_caps = nil   -- capabilities handed to bundled library modules (set by host)
function M.set_library_caps(caps) library_caps = caps end

local loaded = {}          -- module name -> value, shared by this runtime's environments
local loading = {}
M.loaded = loaded          -- the spec runner's package.loaded (hubhost/testing/specenv.lua)

local function copy(t)
  local c = {}
  for k, v in each_pair(t) do c[k] = v end
  return c
end

local function safe_collectgarbage(opt, ...)
  if opt == "count" then return collectgarbage("count") end
  if opt == nil then opt = "collect" end
  error("collectgarbage('" .. tostring(opt) .. "') is not allowed in the sandbox; only 'count' is", 2)
end

local safe_debug_traceback = function(msg, level)
  if msg ~= nil and type(msg) ~= "string" and type(msg) ~= "number" then return msg end
  return traceback(msg, (tonumber(level) or 1) + 1)
end

---------------------------------------------------------------------------------------------
-- Coroutines made by driver code. Host waits (sleep, device:request, datastore saves) yield
-- the private WAIT value up to the runtime's own resume. A driver coroutine that waits
-- passes the wait on through every driver resume above it, so the resume that driver code
-- called never returns WAIT (the token and the request stay private), and the coroutine
-- continues when the host answers. Handler coroutines belong to the host: driver code may
-- see them (coroutine.running) but not resume them (that would forge a host answer).
local WAIT = {}
local DONE = {}
local handler_cos = setmetatable({}, { __mode = "k" })

local driver_resume
local function after_driver_resume(co, depth, ok, a, ...)
  c_depth = depth
  if ok and a == WAIT then
    if not co_isyieldable() then
      return false, "host waits (sleep, device:request, datastore saves, calls) can only be used inside a handler"
    end
    return driver_resume(co, co_yield(WAIT, ...))
  end
  if abort_message then error(abort_message, 0) end
  return ok, a, ...
end

function driver_resume(co, ...)
  if type(co) ~= "thread" then
    error("bad argument #1 to 'resume' (coroutine expected, got " .. type(co) .. ")", 2)
  end
  if handler_cos[co] then
    return false, "cannot resume a handler's coroutine: the host resumes it"
  end
  local depth = c_depth
  if depth >= MAX_C_DEPTH then depth_error("coroutine.resume") end
  c_depth = depth + 1
  return after_driver_resume(co, depth, co_resume(co, ...))
end

local function wrap_results(ok, ...)
  if not ok then
    local e = ...
    if type(e) == "string" then error(e, 2) end
    error(e, 0)
  end
  return ...
end

local function driver_wrap(f)
  if type(f) ~= "function" then
    error("bad argument #1 to 'wrap' (function expected, got " .. type(f) .. ")", 2)
  end
  local co = co_create(f)
  return function(...)
    if c_depth >= MAX_C_DEPTH then depth_error("coroutine.wrap") end
    return wrap_results(driver_resume(co, ...))
  end
end

-- os.time reads its table's fields from C (a driver's __index would run nested in C): the
-- fields are read here, in Lua, into a plain table.
local DATE_FIELDS = { "year", "month", "day", "hour", "min", "sec", "isdst" }
local function safe_os_time(t)
  if t == nil then return os.time() end
  if type(t) ~= "table" then return os.time(t) end
  local plain = {}
  for i = 1, #DATE_FIELDS do
    local k = DATE_FIELDS[i]
    plain[k] = t[k]
  end
  return os.time(plain)
end

local new_env

local function safe_require_for(env)
  return function(name)
    if type(name) ~= "string" then
      error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
    end
    local v = loaded[name]
    if v ~= nil then return v end
    if banned_modules[name] then
      error("module '" .. name .. "' is not available in the sandbox", 2)
    end
    if name == "string" or name == "table" or name == "math" or name == "coroutine" or name == "bit" then
      return env[name]
    end
    if loading[name] then error("loop or previous error loading module '" .. name .. "'", 2) end
    local src, chunkname, kind = host_find_module(name)
    if not src then error(chunkname, 2) end
    local is_lib = kind == "lib"
    local fn, err
    if is_lib then
      -- bundled library: bytecode compiled by the host from our own files (never from
      -- driver input), loaded with the JIT on in an environment of its own
      fn, err = loadstring(src, chunkname)
      if fn then setfenv(fn, new_env(true)) end
    else
      fn, err = compile(src, chunkname, env, true, true)
    end
    if not fn then error(err, 2) end
    loading[name] = true
    local ok, res = pcall(fn, name, is_lib and library_caps or nil)
    loading[name] = nil
    if not ok then error(res, 0) end
    if res == nil then res = true end
    loaded[name] = res
    return res
  end
end

function new_env(library)
  local env = {
    assert = assert, error = error, ipairs = safe_ipairs, next = safe_next, pairs = safe_pairs,
    pcall = safe_pcall, xpcall = safe_xpcall, rawequal = rawequal, rawget = safe_rawget,
    rawset = safe_rawset, select = select, setmetatable = setmetatable,
    getmetatable = getmetatable, tonumber = tonumber, tostring = tostring, type = type,
    unpack = safe_unpack, _VERSION = _VERSION, collectgarbage = safe_collectgarbage,
    __hh_len = hh_len,
    string = copy(safe_string), table = copy(safe_table), math = copy(math),
    bit = copy(bit),
    coroutine = copy(coroutine),
    os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime },
    debug = { traceback = safe_debug_traceback },
  }
  if library then env.xpcall = library_xpcall end
  env.coroutine.resume = driver_resume
  env.coroutine.wrap = driver_wrap
  env.os.time = safe_os_time
  env.os.date = function(fmt, t)
    if type(fmt) == "string" and str_find(fmt, "%%[^aAbBcdHIjmMpSUwWxXyYZ%%]") then
      error("os.date: unsupported conversion in format '" .. fmt .. "'", 2)
    end
    return os.date(fmt, t)
  end
  env.load, env.loadstring = make_load(env)
  env.require = safe_require_for(env)
  env.print = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    host.print(tconcat(parts, "\t"))
  end
  env._G = env
  return env
end
M.new_env = function() return new_env(false) end   -- driver environments


---------------------------------------------------------------------------------------------
-- Running handlers: each event runs in a coroutine; host waits (sleep, request, save)
-- yield a private token (WAIT, above) so a driver's own coroutine.yield cannot impersonate
-- them, and driver code never sees it.

local parked = {}        -- token -> coroutine waiting for the host
local next_token = 0
local current_label = {} -- coroutine -> label for logs

function M.wait(kind, ...)
  local co, is_main = co_running()
  if co == nil or is_main then
    return nil, "cannot wait outside a handler"
  end
  return co_yield(WAIT, kind, ...)
end

function M.can_wait()
  local co, is_main = co_running()
  return co ~= nil and not is_main
end

local on_wait   -- function(token, kind, ...) set by the host glue
local on_done   -- function(label, ok, err, traceback_text)
function M.set_wait_handler(f) on_wait = f end
function M.set_done_handler(f) on_done = f end

-- Finished handler coroutines go back to a small pool: creating a coroutine per event was
-- most of the cost of dispatching one.
local pool, pool_n = {}, 0
local function run_jobs(fn, ...)
  fn(...)
  return run_jobs(co_yield(DONE))   -- a proper tail call: the stack does not grow
end

local function step(co, label, ok, a, b, ...)
  -- ok, a, b, ... are the results of co_resume; a failed handler's `a` is text already
  if not ok then
    local tb = traceback(co, a)
    current_label[co] = nil
    return on_done(label, false, a, tb)
  end
  if a == DONE then
    current_label[co] = nil
    if pool_n < 16 then
      pool_n = pool_n + 1
      pool[pool_n] = co
    end
    return on_done(label, true)
  end
  if a == WAIT then
    next_token = next_token + 1
    parked[next_token] = co
    current_label[co] = label
    return on_wait(next_token, b, ...)
  end
  -- a bare coroutine.yield() from driver code at handler level: finish the handler (the
  -- coroutine is left suspended, never reused)
  current_label[co] = nil
  return on_done(label, true)
end

-- Disarm the budget after a resume and hand the results on (no table per event).
local function after_resume(co, label, ok, ...)
  if not ok and abort_message == nil then
    -- still armed: a driver's __tostring on the error object runs under the budget
    local text = error_text((...))
    local abort = M.disarm()
    return step(co, label, false, abort or text)
  end
  local abort = M.disarm()
  if abort then return step(co, label, false, abort) end
  return step(co, label, ok, ...)
end

-- Start fn(...) as a new handler coroutine under the CPU budget.
-- A host function called by a running handler that starts or resumes another handler of
-- the same runtime synchronously would re-arm the budget and, when that one ends, leave the
-- first handler running disarmed: refused (hosts post such work instead).
local function reentered(label)
  return on_done(label, false, "handler " .. tostring(label) .. " not run: the host started it "
    .. "from inside another running handler of this driver (host functions must post it)", "")
end

function M.spawn(label, limit, fn, ...)
  if deadline ~= nil then return reentered(label) end
  local co
  if pool_n > 0 then
    co = pool[pool_n]
    pool[pool_n] = nil
    pool_n = pool_n - 1
  else
    co = co_create(run_jobs)
    handler_cos[co] = true
  end
  M.arm(limit, label)
  return after_resume(co, label, co_resume(co, fn, ...))
end

-- Resume a parked handler with the host's answer.
function M.resume(token, limit, ...)
  local co = parked[token]
  if not co then return end
  if deadline ~= nil then return reentered(current_label[co]) end   -- stays parked
  parked[token] = nil
  local label = current_label[co]
  M.arm(limit, label)
  return after_resume(co, label, co_resume(co, ...))
end

-- Drop a parked handler coroutine: it is never resumed again (a timed-out function call,
-- lua/driver_functions.lua). Returns true if it was parked.
function M.drop(co)
  for token, c in each_pair(parked) do
    if c == co then
      parked[token] = nil
      current_label[co] = nil
      return true
    end
  end
  return false
end

return M
