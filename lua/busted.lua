-- busted.lua: busted's spec DSL (describe/it/pending, hooks, insulate/expose,
-- finally, #tags) for hubhost's sandboxed runtimes, driven by the host:
--
--   local runner = require("busted").new{ env = sandbox_env, getinfo = cap, ... }
--   -- the host loads the spec chunk with runner.env as its environment, then:
--   runner:run(chunk [, ids]) --> { listing = { {id, name, tags, line}, ... },
--                                  results = { [id] = {status, message, trace, line,
--                                                      file, setup, teardown, output} },
--                                  file_error = nil | {message, trace, line, file} }
--
-- One run is busted's execution of the file: the file body, then each describe body when
-- its turn comes (after the earlier siblings' tests and their hooks), never ahead of it.
-- Without ids everything runs and the listing names every test in execution order; with
-- ids only those tests (and the hooks around them) run, like busted's --filter.
--
-- Semantics follow busted 2: setup/teardown are strict (once per block around its children),
-- lazy_setup runs before the block's first test, before_each outer to inner,
-- after_each inner to outer, finally right after the test body. Globals a
-- block assigns live in that block's environment; insulate blocks (and the
-- file) restore the sandbox globals and luassert's spies when they end;
-- expose blocks write to their grandparent so following blocks see it.
-- Luassert errors are failures; any other error is an error.
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local luassert = require "luassert"
local spy = require "luassert.spy"
local stub = require "luassert.stub"
local mock = require "luassert.mock"
local match = require "luassert.match"
local util = require "luassert.util"
local astate = require "luassert.state"
util.mark_internal(function() end)

local M = { version = "2.2 (hubhost)" }

local failure_mt = { __tostring = function(e) return tostring(e.message) end }
local failure_nostring_mt = {}
local pending_mt = { __tostring = function(p) return tostring(p.message) end }

local function errortype(e)
  local mt = getmetatable(e)
  if mt == failure_mt or mt == failure_nostring_mt then return "failure" end
  if mt == pending_mt then return "pending" end
  return "error"
end

--- Raises busted's pending signal (pending("why") inside a test).
function M.pending(msg)
  error(setmetatable({ message = msg }, pending_mt), 0)
end

--- Raises an assertion failure with msg (busted's fail()).
function M.fail(msg)
  util.fail(msg)
end

-- Host hook for luassert: failures become objects busted can recognise.
local function raise_failure(text, raw)
  if util.hastostring(raw) or type(raw) == "number" then
    error(setmetatable({ message = text }, failure_mt), 0)
  end
  error(setmetatable({ message = raw }, failure_nostring_mt), 0)
end

local HOOKS = {
  "before_each", "after_each", "lazy_setup", "lazy_teardown", "strict_setup", "strict_teardown",
}

-- Everything the DSL exports; inside tests and hooks these are refused.
local DSL_NAMES = {
  "describe", "context", "insulate", "expose", "it", "spec", "test", "pending",
  "before_each", "after_each", "lazy_setup", "lazy_teardown", "strict_setup",
  "strict_teardown", "setup", "teardown", "randomize", "norandomize",
}

local SEP = " > "

local function rejecter(name)
  return function()
    error("'" .. name .. "' not supported inside current context block", 2)
  end
end

local function tags_of(names)
  local tags, seen = {}, {}
  for _, name in ipairs(names) do
    for tag in name:gmatch("#([%a_][%w_%-]*)") do
      if not seen[tag] then
        seen[tag] = true
        tags[#tags + 1] = tag
      end
    end
  end
  return tags
end

local Runner = {}
Runner.__index = Runner

--- Creates a runner for one spec file. opts: env (the sandbox environment
--- the spec's globals fall back to), getinfo (capability, see luassert.util),
--- traceback (fallback capability), internal_prefixes (chunk-name prefixes
--- of library and host code, dropped from locations and tracebacks; the
--- library's own chunks are recognised without them), and optionally
--- arm(seconds, label)/disarm() -> abort message with time_limit: the host's
--- CPU budget, armed around every piece of user code so a runaway spec
--- fails alone instead of hanging the run.
function M.new(opts)
  local self = setmetatable({}, Runner)
  self.base = opts.env
  self.getinfo = opts.getinfo
  self.traceback = opts.traceback
  self.arm, self.disarm, self.time_limit = opts.arm, opts.disarm, opts.time_limit
  self.prefixes = opts.internal_prefixes or {}
  self.take_output = opts.take_output
  util.set_host({
    getinfo = opts.getinfo,
    fail = raise_failure,
    lib_prefixes = self.prefixes,
  })
  self.id_count = {}
  self.stack, self.states = {}, {}
  self.serial = 0
  self.root = { kind = "root", hooks = {}, children = {}, names = {} }
  self.root.env = self:exports()
  for k, v in each_pair(opts.globals or {}) do
    if self.root.env[k] == nil then self.root.env[k] = v end
  end
  self.current = self.root
  M.active = self
  local runner = self
  self.env = setmetatable({}, {
    __index = function(_, k)
      local el = runner.current
      while el do
        local e = el.env
        if e then
          local v = e[k]
          if v ~= nil then return v end
        end
        el = el.parent
      end
      return runner.base[k]
    end,
    __newindex = function(_, k, v) runner:set_env(runner.current, k, v) end,
  })
  return self
end

-- True for frames of the library, the host glue and C: not the user's code.
function Runner:internal(info)
  if info.what == "C" or info.what == "tail" then return true end
  return util.is_internal(info.source)
end

-- The innermost user frame above the caller, or nil.
function Runner:user_frame()
  local getinfo = self.getinfo
  if not getinfo then return nil end
  for level = 2, 250 do
    local info = getinfo(level)
    if not info then return nil end
    if not self:internal(info) then return info end
  end
  return nil
end

-- A traceback of user frames only, from the caller outwards.
function Runner:user_traceback()
  local getinfo = self.getinfo
  if not getinfo then
    return self.traceback and self.traceback("", 3) or nil
  end
  local lines = { "stack traceback:" }
  for level = 2, 250 do
    local info = getinfo(level)
    if not info then break end
    if not self:internal(info) then
      local where = util.srcname(info) .. ":" .. tostring(info.currentline) .. ": in "
      local what
      if info.namewhat ~= nil and info.namewhat ~= "" and info.name then
        what = "function '" .. info.name .. "'"
      elseif info.what == "main" then
        what = "main chunk"
      else
        what = "function <" .. util.srcname(info) .. ":" .. tostring(info.linedefined) .. ">"
      end
      lines[#lines + 1] = "\t" .. where .. what
    end
  end
  return table.concat(lines, "\n")
end

-- Lua shortens long chunk names in error positions ("...me/x_spec.lua:3:");
-- give the message the full name of the frame it came from.
function Runner:untruncate(msg)
  local src, rest = msg:match("^(%.%.%.[^\n]-):(%d+: .*)$")
  local getinfo = self.getinfo
  if not src or not getinfo then return msg end
  for level = 2, 250 do
    local info = getinfo(level)
    if not info then break end
    if info.short_src == src then return util.srcname(info) .. ":" .. rest end
  end
  return msg
end

---------------------------------------------------------------------------------------------
-- Environments (busted's context): reads walk the running element's chain,
-- writes land in the running element's env, redirected by envmode.
function Runner:set_env(el, k, v)
  while true do
    if el == nil then
      self.base[k] = v
      return
    end
    local e = el.env
    if e == nil then
      e = {}
      el.env = e
    end
    local mode = el.envmode
    if e[k] ~= nil or (mode ~= "unwrap" and mode ~= "expose") then
      e[k] = v
      return
    end
    if mode == "unwrap" then
      el = el.parent
    else
      el = el.parent and el.parent.parent
    end
  end
end

function Runner:save()
  local g = {}
  for k, v in each_next, self.base do g[k] = v end
  return { g = g, snapshot = astate.snapshot() }
end

function Runner:restore(saved)
  local base = self.base
  for k in each_next, base do
    if saved.g[k] == nil then base[k] = nil end
  end
  for k, v in each_next, saved.g do base[k] = v end
  pcall(astate.revert, saved.snapshot)
end

function Runner:push(el)
  local prev = self.current
  self.stack[#self.stack + 1] = prev
  if el ~= prev then
    self.states[#self.states + 1] = el.envmode == "insulate" and self:save() or false
  end
  self.current = el
end

function Runner:pop()
  local el = self.current
  local prev = table.remove(self.stack)
  self.current = prev
  if el ~= prev then
    local saved = table.remove(self.states)
    if el.envmode == "expose" and self.states[#self.states] then
      -- what the exposed block changed survives the enclosing insulation
      self.states[#self.states] = self:save()
    end
    if saved then self:restore(saved) end
  end
end

---------------------------------------------------------------------------------------------
-- Running one piece of user code: returns nil on success, else an outcome
-- {status = "failure"|"error"|"pending", message, trace, line}.
function Runner:safe(el, fn)
  self:push(el)
  local outcome
  local armed = self.arm ~= nil and self.time_limit ~= nil
  if armed then self.arm(self.time_limit, "spec") end
  local ok = xpcall(fn, function(e)
    local status = errortype(e)
    local info = self:user_frame()
    local aborted = armed and self.disarm()
    local msg
    if aborted then
      status = "error"
      msg = string.format("%s exceeded the time limit of %g s (%s) and was stopped",
        el.descriptor or "spec", self.time_limit, tostring(aborted))
      if info then msg = util.srcname(info) .. ":" .. tostring(info.currentline) .. ": " .. msg end
    elseif status == "pending" then
      msg = e.message ~= nil and tostring(e.message) or nil
    else
      local raw = e
      if getmetatable(e) == failure_nostring_mt then raw = e.message end
      if util.hastostring(raw) or type(raw) == "number" then
        msg = tostring(raw)
      elseif raw == nil then
        msg = "Nil error"
      else
        msg = astate.format_argument(raw) or tostring(raw)
      end
      msg = self:untruncate(msg)
      if info and not msg:match("^[^\n]-:%d+: ") then
        msg = util.srcname(info) .. ":" .. tostring(info.currentline) .. ": " .. msg
      end
    end
    outcome = {
      status = status,
      message = msg,
      line = info and info.currentline or nil,
      file = info and util.srcname(info) or nil,
      trace = status ~= "pending" and self:user_traceback() or nil,
    }
    return e
  end)
  if armed then self.disarm() end
  self:pop()
  if ok then return nil end
  return outcome or { status = "error", message = "error in error handling" }
end

---------------------------------------------------------------------------------------------
-- Registration (the DSL functions).
function Runner:new_id(names)
  local id = table.concat(names, SEP)
  local n = (self.id_count[id] or 0) + 1
  self.id_count[id] = n
  if n > 1 then id = id .. " (" .. n .. ")" end
  return id
end

function Runner:caller_line()
  local info = util.where()
  return info and info.currentline or 0
end

function Runner:add_child(el)
  local parent = self.current
  el.parent = parent
  el.line = self:caller_line()
  local names = {}
  for i, n in ipairs(parent.names) do names[i] = n end
  names[#names + 1] = el.name
  el.names = names
  if el.kind == "block" then
    el.id = table.concat(names, SEP)
    el.hooks, el.children = {}, {}
  else
    el.id = self:new_id(names)
  end
  parent.children[#parent.children + 1] = el
  return el
end

local function name_and_fn(name, fn, default)
  if fn == nil and type(name) == "function" then return default, name end
  return tostring(name), fn
end

function Runner:block_publisher(alias, envmode)
  return function(name, fn)
    name, fn = name_and_fn(name, fn, alias)
    local function publish(f)
      self:add_child({ kind = "block", descriptor = alias, name = name, run = f, envmode = envmode })
    end
    if fn ~= nil then return publish(fn) end
    return publish
  end
end

function Runner:test_publisher(alias)
  return function(name, fn)
    name, fn = name_and_fn(name, fn, alias)
    local el = self:add_child({ kind = "test", descriptor = alias, name = name, run = fn, pending = fn == nil })
    if fn == nil then
      -- it "name" (function() ... end) supplies the body right after
      return function(f)
        el.run = f
        el.pending = f == nil
      end
    end
  end
end

function Runner:pending_publisher()
  return function(name, fn)
    name = name_and_fn(name, fn, "pending")
    self:add_child({ kind = "test", descriptor = "pending", name = name, pending = true })
    return function() end
  end
end

function Runner:hook_publisher(descriptor)
  return function(name, fn)
    if fn == nil then fn = name end
    local parent = self.current
    local list = parent.hooks[descriptor]
    if not list then
      list = {}
      parent.hooks[descriptor] = list
    end
    list[#list + 1] = {
      kind = "hook", descriptor = descriptor, run = fn, parent = parent,
      envmode = "unwrap", line = self:caller_line(),
    }
  end
end

function Runner:exports()
  local e = {
    assert = luassert, spy = spy, mock = mock, stub = stub, match = match,
    randomize = function() end, norandomize = function() end,
  }
  e.describe = self:block_publisher("describe")
  e.context = self:block_publisher("context")
  e.insulate = self:block_publisher("insulate", "insulate")
  e.expose = self:block_publisher("expose", "expose")
  e.it = self:test_publisher("it")
  e.spec = self:test_publisher("spec")
  e.test = self:test_publisher("test")
  e.pending = self:pending_publisher()
  for _, h in ipairs(HOOKS) do e[h] = self:hook_publisher(h) end
  e.setup = e.strict_setup
  e.teardown = e.strict_teardown
  return e
end

local function reject_all(el)
  local env = el.env
  if env == nil then
    env = {}
    el.env = env
  end
  for _, name in ipairs(DSL_NAMES) do rawset(env, name, rejecter(name)) end
  return env
end

local function file_element(self, chunk)
  return {
    kind = "block", descriptor = "file", run = chunk, parent = self.root,
    envmode = "insulate", hooks = {}, children = {}, names = {}, id = "", line = 0,
  }
end

---------------------------------------------------------------------------------------------
-- Running.

-- Runs a block's hooks of one kind, in order; returns the first failure.
function Runner:run_hooks(el, descriptor)
  local first
  for _, hook in ipairs(el.hooks[descriptor] or {}) do
    if not hook.env then reject_all(hook) end
    local out = self:safe(hook, hook.run)
    if out then
      out.hook = descriptor
      out.block = el.id
      first = first or out
    end
  end
  return first
end

-- before_each from the outermost block in; stops at the first block with a
-- failing hook. Returns the innermost block reached and the failure.
function Runner:before_each(el)
  if el.parent then
    local reached, err = self:before_each(el.parent)
    if err then return reached, err end
  end
  return el, self:run_hooks(el, "before_each")
end

-- after_each from el outwards, all of them; returns the first failure.
function Runner:after_each(el)
  local first
  while el do
    local err = self:run_hooks(el, "after_each")
    first = first or err
    el = el.parent
  end
  return first
end

-- lazy_setup of every enclosing block, outermost first, once per block.
function Runner:lazy_setup(el)
  if el.parent then
    local err = self:lazy_setup(el.parent)
    if err then return err end
  end
  if el.lazy_done == nil then
    local err = self:run_hooks(el, "lazy_setup")
    el.lazy_done = err == nil
    el.lazy_err = err
  end
  return el.lazy_err
end

-- What the spec printed since the last result belongs to this one (pytest shows it as
-- the test's captured output).
function Runner:record(el, result)
  if self.take_output then result.output = self.take_output() end
  self.results[el.id] = result
  self.serial = self.serial + 1
  self.last = result
end

function Runner:list(id, el, err)
  self.listing[#self.listing + 1] = {
    id = id, name = el.name, tags = tags_of(el.names), line = el.line, pending = el.pending,
    error = err and err.message or nil,
  }
end

function Runner:wanted(el)
  return self.all or self.selected[el.id]
end

local function update(result, out)
  if out == nil then return result end
  if result.status == "success" or (result.status == "pending" and out.status ~= "success") then
    result.status, result.message, result.trace, result.line, result.file =
      out.status, out.message, out.trace, out.line, out.file
  end
  return result
end

function Runner:exec_test(el)
  if not self:wanted(el) then return end
  self:list(el.id, el)
  if el.pending then
    self:record(el, { status = "pending" })
    return
  end
  local parent = el.parent
  local lazy_err = self:lazy_setup(parent)
  if lazy_err then
    self:record(el, { status = "error", setup = lazy_err })
    return
  end
  local env = reject_all(el)
  local finally
  env.finally = function(fn) finally = fn end
  env.pending = M.pending
  local reached, before_err = self:before_each(parent)
  local result = { status = "success" }
  if before_err then
    result.status = "error"
    result.setup = before_err
  else
    update(result, self:safe(el, el.run))
    if finally then
      env.pending = rejecter("pending")
      update(result, self:safe(el, finally))
    end
  end
  local after_err = self:after_each(reached)
  if after_err then result.teardown = after_err end
  self:record(el, result)
end

-- A describe body that failed is one failing item under the describe's name (busted
-- reports it as one error). A failing strict_setup fails each test of its block at setup;
-- a block with no test of its own reports it under its name.
function Runner:block_failed(el, outcome, as_setup)
  local id = nil
  if not as_setup then id = self:new_id(el.names) end
  self.block_errors[#self.block_errors + 1] = {
    id = id, prefix = el.id, outcome = outcome, setup = as_setup,
  }
  if as_setup then
    local any = false
    for _, child in ipairs(el.children) do
      if child.kind == "test" and self:wanted(child) then
        any = true
        self:list(child.id, child)
        self:record(child, { status = "error", setup = outcome })
      end
    end
    if any or not self.all then return end
    if el.descriptor == "file" then
      self.file_error = outcome
      return
    end
    id = self:new_id(el.names)
  elseif not (self.all or self.selected[id]) then
    return
  end
  self:list(id, el, outcome)
  self:record({ id = id }, {
    status = outcome.status == "pending" and "error" or outcome.status, message = outcome.message,
    trace = outcome.trace, line = outcome.line, file = outcome.file,
  })
end

function Runner:exec_block(el)
  self:push(el) -- the block's environment lives until its last child is done
  self:exec_children(el)
  self:pop()
end

function Runner:exec_children(el)
  local err = self:safe(el, el.run)
  if err then
    if el.descriptor == "file" then
      self.file_error = err
      return
    end
    self:block_failed(el, err, false)
    return
  end
  if el.descriptor ~= "file" and not self.all and not self.active[el.id] then
    -- nothing selected below: run describe bodies only (they register ids)
    for _, child in ipairs(el.children) do
      if child.kind == "block" then self:exec_block(child) end
    end
    return
  end
  local serial = self.serial
  local setup_err = self:run_hooks(el, "strict_setup")
  if setup_err then
    self:block_failed(el, setup_err, true)
  else
    for _, child in ipairs(el.children) do
      if child.kind == "block" then self:exec_block(child) else self:exec_test(child) end
    end
  end
  local down_err
  if el.lazy_done ~= nil then
    down_err = self:run_hooks(el, "lazy_teardown")
    el.lazy_done, el.lazy_err = nil, nil
  end
  down_err = self:run_hooks(el, "strict_teardown") or down_err
  if down_err and self.serial > serial and self.last.teardown == nil then
    self.last.teardown = down_err
  end
end

-- The outcome for a selected id that never ran: the failure of the
-- deepest block around it (its body or its setup), if any.
function Runner:missing(id)
  local fe = self.file_error
  if fe then
    return { status = "error", message = fe.message, trace = fe.trace, line = fe.line, file = fe.file }
  end
  local best
  for _, b in ipairs(self.block_errors) do
    local p = b.prefix
    local inside = b.id == id or p == "" or id == p or id:sub(1, #p + #SEP) == p .. SEP
    if inside and (best == nil or #p >= #best.prefix) then best = b end
  end
  if not best then
    return {
      status = "error",
      message = "spec '" .. id .. "' was not registered when the file ran (did the file change?)",
    }
  end
  if best.setup then return { status = "error", setup = best.outcome } end
  local o = best.outcome
  return { status = o.status == "pending" and "error" or o.status, message = o.message,
           trace = o.trace, line = o.line, file = o.file }
end

--- Runs the file as busted does: every test when ids is nil, else the given ids only
--- (and the hooks around them). See the top of this file for what comes back.
function Runner:run(chunk, ids)
  self.all = ids == nil
  self.selected, self.active = {}, {}
  self.results, self.block_errors, self.listing = {}, {}, {}
  for _, id in ipairs(ids or {}) do
    self.selected[id] = true
    local start = 1
    while true do
      local i = id:find(SEP, start, true)
      if not i then break end
      self.active[id:sub(1, i - 1)] = true
      start = i + #SEP
    end
    self.active[id] = true
  end
  self:exec_block(file_element(self, chunk))
  for _, id in ipairs(ids or {}) do
    if self.results[id] == nil then self.results[id] = self:missing(id) end
  end
  local rest = self.take_output and self.take_output() or ""
  if rest ~= "" then
    if self.last then
      self.last.output = (self.last.output or "") .. rest
    else
      self.trailing_output = rest
    end
  end
  return { listing = self.listing, results = self.results, file_error = self.file_error,
           output = self.trailing_output }
end

-- require "busted" in a spec or helper gives the DSL too: busted.describe(...)
return setmetatable(M, {
  __index = function(_, k)
    local runner = rawget(M, "active")
    return runner and runner.root.env[k] or nil
  end,
})
