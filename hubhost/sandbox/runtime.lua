-- hubhost/runtime.lua: privileged glue between one driver and the Python host.
--
-- Holds the driver table built by driver_helper, the device objects and the timers, and
-- exposes the entry points Python calls on the driver's thread (load, start_device, timers,
-- resume, shutdown). Library modules reach the host only through the `caps` table built here.

local sb, host = ...

local type, pairs, tostring, error, select, unpack, setmetatable =
  type, pairs, tostring, error, select, unpack, setmetatable
local tconcat = table.concat

local R = {}
local caps = {}
local driver = nil
local devices = {}        -- id -> device object
local timers = {}         -- id -> { fn =, name =, interval =, periodic = }
local next_timer = 0
local cpu_limit = 1.0
local driver_env = nil

function R.set_cpu_limit(s) cpu_limit = s end

---------------------------------------------------------------------------------------------
-- Results of handlers and waits go back to Python.
sb.set_done_handler(function(label, ok, err, tb)
  if not ok then host.handler_failed(label, tostring(err), tb or "") end
end)

sb.set_wait_handler(function(token, kind, a, b)
  if kind == "sleep" then
    host.wait_timer(token, a)
  elseif kind == "host" then
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
  next_timer = next_timer + 1
  local id = next_timer
  timers[id] = { fn = fn, name = name, interval = seconds, periodic = periodic }
  host.timer_start(id, seconds, periodic)
  return id
end

function caps.timer_cancel(id)
  if timers[id] then
    timers[id] = nil
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
  string = string, sort = table.sort, concat = table.concat,
  table_new = require "table.new", table_clear = require "table.clear",
  buffer = require "string.buffer",
}
sb.set_library_caps(caps)

---------------------------------------------------------------------------------------------
-- Entry points called from Python.

local function handler_label(what, device)
  if device then return what .. " [" .. tostring(device.id) .. "]" end
  return what
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
  end
  -- the entry chunk runs under the CPU budget too, but synchronously: it may not wait
  sb.arm(cpu_limit, "entry chunk")
  local ok, e = xpcall(co_fn, function(m) return debug.traceback(tostring(m), 2) end)
  local abort = sb.disarm()
  if abort then ok, e = false, abort end
  if not ok then return false, e end
  if driver == nil and type(returned) == "table" then driver = returned end
  if driver == nil then
    return false, chunkname:sub(2) .. ": the entry chunk must build its driver with driver_helper.init{...} and return it"
  end
  return true, nil
end

function R.metadata()
  if not driver then return nil end
  return caps.metadata and caps.metadata(driver) or nil
end

-- Run a lifecycle handler of the driver, if it has one.
local function lifecycle(name, device, ...)
  local lc = driver and driver.lifecycle
  local f = lc and lc[name]
  if type(f) ~= "function" then return end
  return sb.spawn(handler_label(name, device), cpu_limit, f, driver, device, ...)
end
R.lifecycle = lifecycle

-- info: { id =, label =, config = {...} }; is_new: first time this device is seen
function R.start_device(info, is_new)
  local device = caps.make_device(info)
  devices[info.id] = device
  if is_new then lifecycle("added", device) end
  lifecycle("init", device)
  -- transports (devicelink.lua): the device's link opens once init has run
  if caps.device_started then caps.device_started(device) end
end

function R.remove_device(info)
  local device = devices[info.id] or caps.make_device(info)
  devices[info.id] = nil
  if caps.device_removed then caps.device_removed(info.id) end
  lifecycle("removed", device)
  if caps.drop_device_store then caps.drop_device_store(info.id) end
end

function R.shutdown()
  if driver then lifecycle("shutdown") end
end

function R.fire_timer(id)
  local t = timers[id]
  if not t then return end
  if not t.periodic then timers[id] = nil end
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
function R.timer_count()
  local n = 0
  for _ in pairs(timers) do n = n + 1 end
  return n
end

R.caps = caps
return R
