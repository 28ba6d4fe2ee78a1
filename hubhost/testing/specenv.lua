-- hubhost/testing/specenv.lua: what a spec file sees besides the driver sandbox.
--
-- Privileged (full standard library), run once per spec runtime by specrun.py before busted.
-- Spec files keep running in the driver sandbox, because they load untrusted drivers; this
-- adds the stand-ins ordinary busted suites need, and only spec code sees them:
--
--   package      loaded (the runtime's module table), preload, loaders, path/cpath strings,
--                searchpath, loadlib (refused); require honours all of them
--   loadfile, dofile   source files inside the driver folder only
--   io           write, stdout, stderr (the test's captured output); open, lines, read-only
--                inside the driver folder
--   arg          busted's command line: { [0] = "busted" }
--   collectgarbage     every option (it only touches this spec's own runtime)
--   debug        traceback, getmetatable, getinfo (plain data only)
--   _G           the spec's view of the globals: reads see all of the above, writes go to
--                the driver's globals as they would under busted
--
-- The driver's own code keeps the environment the hub gives it; its require is the one
-- below in its driver flavour: the same module table, preload and path, but no stand-ins
-- (`require "io"` is still refused there).
--
-- Arguments: host (Python callables, see specrun.py), sandbox (sandbox.lua's module), base
-- (the driver environment the spec falls back to). Returns the spec globals table and a
-- function binding the runner's environment (where test-side modules and loadfile run).

local host, sandbox, base = ...

local type, tostring, tonumber, error, pcall, select, setmetatable, getmetatable, unpack =
  type, tostring, tonumber, error, pcall, select, setmetatable, getmetatable, unpack
local tconcat, str_find, str_sub, str_gsub, str_format =
  table.concat, string.find, string.sub, string.gsub, string.format
local dgetmetatable, dgetinfo, collectgarbage = debug.getmetatable, debug.getinfo, collectgarbage
local compile = sandbox.compile
local loaded = sandbox.loaded
local driver_require = base.require    -- the sandbox's own require (bundled library, driver)

local spec_env = base                  -- set by bind() to the runner's environment

local M = {}

---------------------------------------------------------------------------------------------
-- package and require
local DEFAULT_PATH = "./src/?.lua;./src/?/?.lua;./src/?/init.lua;./?.lua;./?/init.lua"

local package = {
  loaded = loaded,
  preload = {},
  path = DEFAULT_PATH,
  cpath = "",
  config = "/\n;\n?\n!\n-\n",
}

local function chunk_env(is_test)
  return is_test and spec_env or base
end

local function preload_loader(name)
  local f = package.preload[name]
  if f == nil then return "\n\tno field package.preload['" .. name .. "']" end
  return f
end

local function library_loader(name)
  if not host.in_library(name) then return "\n\tno module '" .. name .. "' in the hubhost library" end
  return function() return driver_require(name) end
end

local function path_loader(name)
  local src, chunkname, is_test = host.search_path(name, tostring(package.path))
  if src == nil then return chunkname end     -- the "no file ..." lines
  local fn, err = compile(src, chunkname, chunk_env(is_test), true, true)
  if not fn then error("error loading module '" .. name .. "' from file '" .. str_sub(chunkname, 2)
    .. "':\n\t" .. tostring(err), 3) end
  return fn, str_sub(chunkname, 2)
end

-- busted reads the project's .busted file; its default task's lpath goes in front of
-- package.path, as `busted --lpath` would put it (other settings are busted's CLI's)
do
  local src, chunkname = host.read_source(".busted")
  local fn = src and compile(src, chunkname, {}, true, true)
  local ok, conf = false, nil
  if fn then
    sandbox.arm(5, ".busted")       -- the CPU budget: a looping config cannot hang the run
    ok, conf = pcall(fn)
    sandbox.disarm()
  end
  local lpath = ok and type(conf) == "table" and type(conf.default) == "table" and conf.default.lpath
  if type(lpath) == "string" and lpath ~= "" then
    package.path = str_gsub(lpath .. ";" .. package.path, ";;", ";")
  end
end

package.loaders = { preload_loader, library_loader, path_loader }
package.searchers = package.loaders

function package.searchpath(name, path)
  local file, msg = host.searchpath(name, tostring(path))
  if file == nil then return nil, msg end
  return file
end

function package.loadlib(lib)
  return nil, "C libraries are not available in specs (package.loadlib '" .. tostring(lib) .. "')", "absent"
end

local loading = {}

-- builtin: what `require "io"` and friends give (nil: refused, as the sandbox does)
local function make_require(builtin)
  return function(name)
    if type(name) ~= "string" then
      error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
    end
    local v = loaded[name]
    if v then return v end      -- false counts as not loaded, as in Lua
    local b = builtin and builtin(name)
    if b ~= nil then return b end
    if loading[name] then error("loop or previous error loading module '" .. name .. "'", 2) end
    local tried = {}
    local loaders = package.loaders
    for i = 1, #loaders do
      local f, extra = loaders[i](name)
      if type(f) == "function" then
        loading[name] = true
        local ok, res = pcall(f, name, extra)
        loading[name] = nil
        if not ok then error(res, 0) end
        if res ~= nil then
          loaded[name] = res
        elseif not loaded[name] then
          loaded[name] = true
        end
        return loaded[name]
      elseif type(f) == "string" then
        tried[#tried + 1] = f
      end
    end
    error("module '" .. name .. "' not found:" .. tconcat(tried), 2)
  end
end

---------------------------------------------------------------------------------------------
-- loadfile / dofile: source text from the driver folder, run in the spec's environment.
local function spec_loadfile(path, mode, env)
  if path == nil then return nil, "loadfile: reading standard input is not available in specs" end
  if type(path) ~= "string" then
    error("bad argument #1 to 'loadfile' (string expected, got " .. type(path) .. ")", 2)
  end
  local src, chunkname = host.read_source(path)
  if src == nil then return nil, chunkname end
  if mode ~= nil and type(mode) == "string" and not str_find(mode, "t", 1, true) then
    return nil, "attempt to load a text chunk (mode is '" .. mode .. "')"
  end
  if env ~= nil and type(env) ~= "table" then return nil, "loadfile: env must be a table" end
  return compile(src, chunkname, env or spec_env, true, true)
end

local function spec_dofile(path)
  local fn, err = spec_loadfile(path)
  if not fn then error(err, 2) end
  return fn()
end

---------------------------------------------------------------------------------------------
-- io: output to the test's captured output, files read-only from the driver folder.
-- Files are userdata, as Lua's are (suites check type(io.stdout) == "userdata"); their
-- state lives in a weak table keyed by the userdata.
local newproxy = newproxy
local state = setmetatable({}, { __mode = "k" })
local methods = {}
local file_mt = { __index = methods, __metatable = "file" }
file_mt.__tostring = function(f)
  local st = state[f]
  if st.closed then return "file (closed)" end
  return st.label
end

local function new_file(st)
  local f = newproxy(true)
  local mt = getmetatable(f)
  mt.__index, mt.__tostring, mt.__metatable = methods, file_mt.__tostring, "file"
  state[f] = st
  return f
end

local function get(f, what)
  local st = state[f]
  if st == nil then error("bad argument #1 to '" .. what .. "' (FILE* expected, got " .. type(f) .. ")", 3) end
  if st.closed then error("attempt to use a closed file", 3) end
  return st
end

local function read_one(st, fmt)
  local data, pos = st.data, st.pos
  if type(fmt) == "number" then
    if pos > #data then return nil end
    st.pos = pos + fmt
    return str_sub(data, pos, pos + fmt - 1)
  end
  fmt = str_gsub(tostring(fmt), "^%*", "")
  local c = str_sub(fmt, 1, 1)
  if c == "a" then
    st.pos = #data + 1
    return str_sub(data, pos)
  elseif c == "l" or c == "L" then
    if pos > #data then return nil end
    local nl = str_find(data, "\n", pos, true)
    local stop = nl or #data
    st.pos = stop + 1
    if c == "L" or not nl then return str_sub(data, pos, stop) end
    return str_sub(data, pos, stop - 1)
  elseif c == "n" then
    local s, e = str_find(data, "^%s*[-+]?[%x%.xXeEpP]+", pos)
    if not s then return nil end
    local n = tonumber((str_sub(data, s, e)))
    if n == nil then return nil end
    st.pos = e + 1
    return n
  end
  error("bad argument #1 to 'read' (invalid format)", 3)
end

function methods.read(f, ...)
  local st = get(f, "read")
  if st.output then return nil, "standard output cannot be read" end
  local n = select("#", ...)
  if n == 0 then return read_one(st, "l") end
  local out = {}
  for i = 1, n do
    local v = read_one(st, (select(i, ...)))
    out[i] = v
    if v == nil then return unpack(out, 1, i) end
  end
  return unpack(out, 1, n)
end

function methods.lines(f, fmt)
  local st = get(f, "lines")
  if st.output then error("standard output cannot be read", 2) end
  return function() return read_one(st, fmt or "l") end
end

function methods.seek(f, whence, offset)
  local st = get(f, "seek")
  if st.output then return nil, "Illegal seek", 29 end
  whence, offset = whence or "cur", offset or 0
  local from = whence == "set" and 0 or whence == "end" and #st.data or st.pos - 1
  st.pos = from + offset + 1
  return st.pos - 1
end

function methods.write(f, ...)
  local st = get(f, "write")
  if not st.output then return nil, st.name .. ": files opened in a spec are read-only", 9 end
  local parts = {}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if type(v) ~= "string" and type(v) ~= "number" then
      error("bad argument #" .. i .. " to 'write' (string expected, got " .. type(v) .. ")", 2)
    end
    parts[i] = tostring(v)
  end
  host.write(tconcat(parts))
  return f
end

function methods.close(f)
  local st = get(f, "close")
  if st.output then return nil, "cannot close standard file" end
  st.closed = true
  return true
end

function methods.flush() return true end
function methods.setvbuf() return true end

-- io.stdout / io.stderr both go to the test's captured output
local stdout = new_file({ label = "file (stdout)", output = true, name = "stdout" })
local stderr = new_file({ label = "file (stderr)", output = true, name = "stderr" })
local stdin = new_file({ label = "file (stdin)", data = "", pos = 1, name = "stdin" })
local current_output, current_input = stdout, stdin

local io = { stdout = stdout, stderr = stderr, stdin = stdin }

function io.open(path, mode)
  if type(path) ~= "string" then
    error("bad argument #1 to 'open' (string expected, got " .. type(path) .. ")", 2)
  end
  mode = mode or "r"
  if mode ~= "r" and mode ~= "rb" then
    return nil, path .. ": io.open in a spec is read-only (mode '" .. tostring(mode) .. "' refused)", 13
  end
  local data, err = host.read_bytes(path)
  if data == nil then return nil, err, 2 end
  return new_file({ data = data, pos = 1, name = path, label = str_format("file (%s)", path) })
end

function io.lines(path, fmt)
  if path == nil then return current_input:lines(fmt) end
  local f, err = io.open(path)
  if not f then error(err, 2) end
  local st = state[f]
  return function()
    local line = read_one(st, fmt or "l")
    if line == nil then st.closed = true end
    return line
  end
end

function io.write(...) return current_output:write(...) end
function io.read(...) return current_input:read(...) end
function io.close(f)
  if f == nil then return true end
  return f:close()
end
function io.type(f)
  local st = state[f]
  if st == nil then return nil end
  return st.closed and "closed file" or "file"
end
function io.output(f)
  if f ~= nil then
    local st = state[f]
    if not (st and st.output) then error("io.output in a spec takes io.stdout or io.stderr only", 2) end
    current_output = f
  end
  return current_output
end
function io.input(f)
  if type(f) == "string" then
    local g, err = io.open(f)
    if not g then error(err, 2) end
    f = g
  end
  if f ~= nil then
    if state[f] == nil or state[f].output then error("io.input in a spec takes a file opened with io.open", 2) end
    current_input = f
  end
  return current_input
end
io.popen = function() error("io.popen is not available in specs", 2) end
io.tmpfile = function() return nil, "io.tmpfile is not available in specs (files are read-only)" end

---------------------------------------------------------------------------------------------
-- debug: a traceback, getmetatable, and getinfo as plain data (never functions or locals).
local function spec_getinfo(what, fields)
  if type(what) == "number" then
    if what < 0 then return nil end
    what = what + 1
  elseif type(what) ~= "function" then
    error("bad argument #1 to 'getinfo' (function or level expected)", 2)
  end
  local i = dgetinfo(what, type(fields) == "string" and str_gsub(fields, "[fL]", "") or "Slnu")
  if not i then return nil end
  return { source = i.source, short_src = i.short_src, currentline = i.currentline,
           linedefined = i.linedefined, lastlinedefined = i.lastlinedefined, what = i.what,
           name = i.name, namewhat = i.namewhat, nups = i.nups }
end

local debug = {
  traceback = base.debug.traceback,
  getmetatable = dgetmetatable,
  getinfo = spec_getinfo,
}

---------------------------------------------------------------------------------------------
local builtins = {}
local function spec_builtin(name) return builtins[name] end

local globals = {
  package = package,
  require = make_require(spec_builtin),
  loadfile = spec_loadfile,
  dofile = spec_dofile,
  io = io,
  arg = { [0] = "busted" },
  collectgarbage = collectgarbage,
  debug = debug,
}
builtins.package, builtins.io, builtins.debug = package, io, debug
builtins.string, builtins.table, builtins.math = base.string, base.table, base.math
builtins.coroutine, builtins.bit, builtins.os = base.coroutine, base.bit, base.os

-- the driver's require: same table, preload and path; the sandbox's answers for the rest
local SANDBOX_NAMES = { string = true, table = true, math = true, coroutine = true, bit = true }
local REFUSED = {
  ffi = true, jit = true, debug = true, io = true, os = true, package = true, python = true,
  ["jit.util"] = true, ["jit.profile"] = true, ["table.new"] = true, ["table.clear"] = true,
  ["string.buffer"] = true,
}
local function driver_builtin(name)
  if SANDBOX_NAMES[name] then return base[name] end
  if REFUSED[name] then error("module '" .. name .. "' is not available in the sandbox", 3) end
  return nil
end
base.require = make_require(driver_builtin)

--- Binds the runner's environment: where spec-side modules and loadfile'd chunks run,
--- and what the spec's _G reads.
function M.bind(env)
  spec_env = env
end

globals._G = setmetatable({}, {
  __index = function(_, k) return spec_env[k] end,
  __newindex = function(_, k, v) base[k] = v end,
})

M.globals = globals
return M
