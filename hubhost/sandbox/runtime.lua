-- hubhost/runtime.lua: privileged glue between one driver and the Python host.
--
-- Holds the driver table built by driver_helper, the device objects and the timers, and
-- exposes the entry points Python calls on the driver's thread (load, start_device, timers,
-- resume, shutdown). Library modules reach the host only through the `caps` table built here.
--
-- The driver table and everything in it are the driver's: host entry points read them raw
-- (rawget, no metamethods) or under the CPU budget, never with the budget disarmed. What the
-- host needs later (name, metadata) is taken once, at load, under the budget.

local sb, host = ...

local type, pairs, tostring, error, select, unpack, setmetatable, rawget, pcall =
  type, pairs, tostring, error, select, unpack, setmetatable, rawget, pcall
local tconcat = table.concat
local str_format = string.format

local R = {}
local caps = {}
local driver = nil
local driver_name = nil   -- the template's name, taken when the driver was built
local devices = {}        -- id -> device object
local labels = {}         -- id -> the id as a label (host-made text, never the driver's)
local timers = {}         -- id -> { fn =, name =, interval =, periodic = }
local next_timer = 0
local timer_count = 0
local cpu_limit = 1.0
local driver_env = nil

-- Per-driver caps (DriverRuntime kwargs, `[[drivers]]` keys of the same names).
local limits = { max_timers = 10000, max_pending_requests = 1000 }

function R.set_cpu_limit(s) cpu_limit = s end
function R.set_limit(name, value) limits[name] = value end
caps.limits = limits

-- "too many timers: limit of 10000 timers per driver reached (max_timers)"
function caps.limit_error(what, name, unit, level)
  error(str_format("too many %s: limit of %d %s per driver reached (%s)", what, limits[name], unit, name),
    (level or 1) + 1)
end

---------------------------------------------------------------------------------------------
-- Results of handlers and waits go back to Python.
sb.set_done_handler(function(label, ok, err, tb)
  -- err is text already (sandbox.lua converts error objects under the budget)
  if not ok then host.handler_failed(label, err, tb or "") end
end)

sb.set_wait_handler(function(token, kind, a, b)
  if kind == "sleep" then
    host.wait_timer(token, a)
  elseif kind == "host" and type(a) == "string" then
    host.wait_host(token, a, b)   -- a: what (e.g. "save"), b: argument
  else
    host.handler_failed("wait", "unknown wait kind " .. tostring(kind), "")
  end
end)

---------------------------------------------------------------------------------------------
-- Capabilities for the bundled library (driver_helper, log, datastore, ...).
function caps.register_driver(d)
  if driver ~= nil and driver ~= d then
    error("driver_helper.init was called twice: one driver per entry chunk", 3)
  end
  driver = d
  local name = rawget(d, "name")
  if type(name) == "string" then driver_name = name end
end

function caps.log(level, device_id, msg)
  host.log(level, device_id or false, msg)
end

function caps.sleep(seconds)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 then
    error("sleep: seconds must be a non-negative number, got " .. tostring(seconds), 3)
  end
  if not sb.can_wait() then
    error("sleep: can only be called from a handler (it yields the handler's coroutine)", 3)
  end
  return sb.wait("sleep", seconds)
end

function caps.host_wait(what, arg)
  return sb.wait("host", what, arg)
end

caps.can_wait = sb.can_wait

function caps.timer_start(seconds, fn, name, periodic)
  if timer_count >= limits.max_timers then
    caps.limit_error("timers", "max_timers", "timers", 3)
  end
  next_timer = next_timer + 1
  local id = next_timer
  timers[id] = { fn = fn, name = name, interval = seconds, periodic = periodic }
  timer_count = timer_count + 1
  host.timer_start(id, seconds, periodic)
  return id
end

function caps.timer_cancel(id)
  if timers[id] then
    timers[id] = nil
    timer_count = timer_count - 1
    host.timer_cancel(id)
    return true
  end
  return false
end

function caps.devices() return devices end
function caps.driver() return driver end
caps.host = host          -- raw host functions, for library modules only
caps.sandbox = sb
-- Unwrapped primitives for library hot paths (the datastore): library environments only
-- see the sandbox's metamethod-aware next/rawget/# and the budgeted pattern functions.
caps.raw = {
  next = next, rawget = rawget, rawset = rawset, len = function(t) return #t end,
  string = string, sort = sb.sort, concat = table.concat,
  table_new = require "table.new", table_clear = require "table.clear",
  buffer = require "string.buffer",
}
sb.set_library_caps(caps)

---------------------------------------------------------------------------------------------
-- Entry points called from Python.

-- Labels name devices by the id the host gave them, never by a field of the device table.
local function handler_label(what, id)
  if id then return what .. " [" .. (labels[id] or tostring(id)) .. "]" end
  return what
end

-- A driver-made value as text while the budget is armed (see sandbox.lua error_text).
local error_text = sb.error_text
local function traceback_handler(m)
  return debug.traceback(error_text(m), 2)
end

-- Load the entry chunk (src already read by Python) and run it as a handler.
function R.load_driver(src, chunkname)
  driver_env = sb.new_env()
  caps.entry_chunk = { src = src, name = chunkname }   -- lua/hubhost/template.lua locates errors
  local fn, err = sb.compile(src, chunkname, driver_env, true)
  if not fn then return false, err end
  local returned = nil
  local co_fn = function()
    local r = fn()
    returned = r
    if driver == nil and type(r) == "table" then
      driver = r
      local name = rawget(r, "name")
      if type(name) == "string" then driver_name = name end
    end
    -- what the host reads of the driver later (its interface) is read now, budgeted
    if driver ~= nil and caps.prepare_driver then caps.prepare_driver(driver) end
  end
  -- the entry chunk runs under the CPU budget too, but synchronously: it may not wait
  sb.arm(cpu_limit, "entry chunk")
  local ok, e = xpcall(co_fn, traceback_handler)
  local abort = sb.disarm()
  if abort then ok, e = false, abort end
  if not ok then return false, e end
  if driver == nil then
    return false, chunkname:sub(2) .. ": the entry chunk must build its driver with driver_helper.init{...} and return it"
  end
  return true, nil
end

function R.metadata()
  if not driver then return nil end
  return caps.metadata and caps.metadata(driver) or nil
end

function R.driver_name() return driver_name end

-- The driver's `framing` table (read raw; devicelink.py copies it with raw reads too).
function R.framing()
  if not driver then return nil end
  return rawget(driver, "framing")
end

-- A function field of the driver, read raw: nil unless it is a function.
local function driver_function(name)
  if driver == nil then return nil end
  local f = rawget(driver, name)
  if type(f) == "function" then return f end
  return nil
end
R.driver_function = driver_function

-- Run a lifecycle handler of the driver, if it has one (raw reads: the budget is not armed).
local function lifecycle(name, device, id, ...)
  local lc = driver and rawget(driver, "lifecycle")
  local f = type(lc) == "table" and rawget(lc, name) or nil
  if type(f) ~= "function" then return end
  return sb.spawn(handler_label(name, id), cpu_limit, f, driver, device, ...)
end
-- For the host glue (devicelink.lua): the handler of the device with this id.
function R.device_lifecycle(name, id, ...)
  local device = devices[id]
  if device == nil then return end
  return lifecycle(name, device, id, ...)
end

-- info: { id =, label =, config = {...} } made by the host; is_new: first time seen
function R.start_device(info, is_new)
  local id = info.id
  local device = caps.make_device(info)
  devices[id] = device
  labels[id] = id
  if is_new then lifecycle("added", device, id) end
  lifecycle("init", device, id)
  -- transports (devicelink.lua): the device's link opens once init has run
  if caps.device_started then caps.device_started(device) end
end

function R.remove_device(info)
  local id = info.id
  local device = devices[id] or caps.make_device(info)
  devices[id] = nil
  if caps.device_removed then caps.device_removed(id) end
  lifecycle("removed", device, id)
  labels[id] = nil
  if caps.drop_device_store then caps.drop_device_store(id) end
end

-- Fleet mode: the device moves to another hub. Its link closes; no `removed` handler runs
-- and its persistent_store stays (the new owner loads it from Redis).
function R.release_device(id)
  if devices[id] == nil then return end
  devices[id] = nil
  if caps.device_removed then caps.device_removed(id) end
  labels[id] = nil
end

function R.shutdown()
  if driver then lifecycle("shutdown") end
end

function R.fire_timer(id)
  local t = timers[id]
  if not t then return end
  if not t.periodic then
    timers[id] = nil
    timer_count = timer_count - 1
  end
  return sb.spawn("timer " .. tostring(t.name or id), cpu_limit, t.fn, driver, t.name)
end

function R.resume(token, ...)
  return sb.resume(token, cpu_limit, ...)
end

-- Run any function of the driver as a handler (used by the host for events such as
-- on_receive and function calls).
function R.call(label, fn, ...)
  return sb.spawn(label, cpu_limit, fn, ...)
end

function R.device(id) return devices[id] end
function R.driver() return driver end
function R.timer_count() return timer_count end

R.caps = caps
return R
