--- driver_helper: builds a driver from its template and gives it timers, devices and the
-- datastore. See DESIGN section 3 for the names; they are a contract with driver authors.
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local caps = select(2, ...)
local log = require "log"
local json = require "hubhost.json"
require "driver_functions"   -- functions, metadata, driver:system(): plugs into caps
require "datastore"          -- driver.datastore, device.persistent_store: plugs into caps
local template_check = require "hubhost.template"   -- unknown keys; errors at the driver's line

local type, pairs, ipairs, tostring, error, setmetatable, select =
  type, pairs, ipairs, tostring, error, setmetatable, select
local str_format = string.format

local driver_helper = {}

local LIFECYCLE = { init = true, added = true, removed = true, shutdown = true,
                    connected = true, disconnected = true }

local function fail(msg, level) error("driver_helper: " .. msg, (level or 1) + 1) end

local function check_interval(what, seconds, fn, name)
  if type(seconds) ~= "number" or seconds ~= seconds then
    error(str_format("%s: seconds must be a number, got %s", what, type(seconds) == "number" and "nan" or type(seconds)), 3)
  end
  if seconds <= 0 or seconds == math.huge then
    error(str_format("%s: seconds must be positive and finite, got %s", what, tostring(seconds)), 3)
  end
  if type(fn) ~= "function" then
    error(str_format("%s: callback must be a function, got %s", what, type(fn)), 3)
  end
  if name ~= nil and type(name) ~= "string" then
    error(str_format("%s: name must be a string or nil, got %s", what, type(name)), 3)
  end
end

---------------------------------------------------------------------------------------------
-- Driver methods.
local Driver = {}
Driver.__index = Driver

--- Run fn(driver) once after `seconds`. Returns a timer handle for cancel_timer.
function Driver:call_with_delay(seconds, fn, name)
  check_interval("call_with_delay", seconds, fn, name)
  return { id = caps.timer_start(seconds, fn, name, false), name = name }
end

--- Run fn(driver) every `seconds`, first after `seconds`.
function Driver:call_on_schedule(seconds, fn, name)
  check_interval("call_on_schedule", seconds, fn, name)
  return { id = caps.timer_start(seconds, fn, name, true), name = name }
end

--- Cancel a timer from call_with_delay/call_on_schedule. Returns true if it was pending.
function Driver:cancel_timer(t)
  if type(t) ~= "table" or type(t.id) ~= "number" then
    error("cancel_timer: expected a timer returned by call_with_delay or call_on_schedule, got " .. type(t), 2)
  end
  return caps.timer_cancel(t.id)
end

--- For authors used to SmartThings Edge: the host runs the driver, so this returns at once.
function Driver:run() return self end

--- The driver's devices, by id.
function Driver:get_devices()
  local list = {}
  for _, d in each_pair(caps.devices()) do list[#list + 1] = d end
  table.sort(list, function(a, b) return a.id < b.id end)
  return list
end

function Driver:get_device(id) return caps.devices()[id] end

---------------------------------------------------------------------------------------------
-- Devices.
local Device = {}
local device_lazy = {}
-- Device objects made by the host -> their ids. Privately: a device table is the driver's
-- to change (or to copy with setmetatable(..., getmetatable(device))), so its `id` field is
-- never trusted for status, sends, requests or stores.
local device_ids = setmetatable({}, { __mode = "k" })

local function own_id(self, what)
  local id = type(self) == "table" and device_ids[self] or nil
  if id == nil then
    error(what .. ": not a device of this driver (use the device objects the host passes to handlers)", 3)
  end
  return id
end
function caps.device_id(device) return device_ids[device] end
Device.__index = function(self, k)
  local m = Device[k]
  if m ~= nil then return m end
  local lazy = device_lazy[k]
  if lazy then
    local v = lazy(self)
    rawset(self, k, v)
    return v
  end
end

function device_lazy.persistent_store(self)
  local id = own_id(self, "device.persistent_store")
  if not caps.device_store then error("device.persistent_store: no datastore in this host", 3) end
  return caps.device_store(id)
end

-- device.status: assigning sets and publishes (only a change in JSON text counts),
-- reading reads the hub's memory, assigning nil deletes. The value is checked and encoded
-- here (lua/json.lua); the host gets JSON text.
local status_set = caps.host.status_set
local try_encode = json.try_encode

-- a plain deep copy (datastore nodes read through pairs) of a value json accepted
local function plain(v)
  if type(v) ~= "table" then return v end
  local c = {}
  for k, x in each_pair(v) do c[k] = plain(x) end
  return c
end

local status_values = {}   -- device id -> { name -> value }, as last set

-- Set one status value of the device `id` (an id the host gave; checked again by the host).
local function set_status(id, k, v, level)
  level = (level or 1) + 1
  if type(k) ~= "string" then
    error("device.status: status names are strings, got " .. type(k), level)
  end
  local text = nil
  if v ~= nil then
    local problem
    text, problem = try_encode(v, "Status values", k)
    if text == nil then error(problem, level) end
    if type(v) == "table" then v = plain(v) end
  end
  local changed, err = status_set(id, k, text)
  if err then error(err, level) end
  local values = status_values[id]
  if values == nil then
    values = {}
    status_values[id] = values
  end
  values[k] = v
  return changed
end
-- For the host glue (devicelink.lua): never through the device table.
function caps.set_status(id, k, v) return set_status(id, k, v, 2) end

function device_lazy.status(self)
  local id = own_id(self, "device.status")
  return setmetatable({}, {
    __index = function(_, k)
      local values = status_values[id]
      return values and values[k]
    end,
    __newindex = function(_, k, v) set_status(id, k, v, 2) end,
    __pairs = function() return next, status_values[id] or {}, nil end,
    __metatable = "device.status",
  })
end

-- not tail calls: errors raised by caps.send/request name the driver's line (level 3)
function Device:send(bytes)
  local id = own_id(self, "device:send")
  if not caps.send then error("device:send: this driver has no transport", 2) end
  local ok = caps.send(id, bytes)
  return ok
end

function Device:request(bytes, opts)
  local id = own_id(self, "device:request")
  if not caps.request then error("device:request: this driver has no transport", 2) end
  local answer, err = caps.request(id, bytes, opts)
  return answer, err
end

--- From on_receive: mark the request in flight answered; the requester gets `frame` (or "").
-- For answers that span several frames or need the driver's judgement.
function Device:answer(frame)
  local id = own_id(self, "device:answer")
  if not caps.answer then error("device:answer: this driver has no transport", 2) end
  caps.answer(id, frame)
end

function Device:emit(name, value)
  self.status[name] = value
end

function caps.make_device(info)
  local d = {
    id = info.id,
    label = info.label or info.id,
    config = info.config or {},
    log = log.for_device(info.id),
  }
  device_ids[d] = info.id
  status_values[info.id] = nil   -- a (re)started device reads what it sets from now on
  return setmetatable(d, Device)
end

---------------------------------------------------------------------------------------------
-- Template validation.
local function validate(t, level)
  level = (level or 1) + 1
  if type(t) ~= "table" then fail("init expects a template table, got " .. type(t), level) end
  if type(t.name) ~= "string" or t.name == "" then
    fail("template.name must be a non-empty string, got " .. tostring(t.name), level)
  end
  if t.lifecycle ~= nil then
    if type(t.lifecycle) ~= "table" then fail("template.lifecycle must be a table", level) end
    for k, v in each_pair(t.lifecycle) do
      if not LIFECYCLE[k] then
        fail("template.lifecycle." .. tostring(k) .. " is not a lifecycle event (init, added, removed, shutdown, connected, disconnected)", level)
      end
      if type(v) ~= "function" then fail("template.lifecycle." .. k .. " must be a function, got " .. type(v), level) end
    end
  end
  if t.on_receive ~= nil and type(t.on_receive) ~= "function" then
    fail("template.on_receive must be a function, got " .. type(t.on_receive), level)
  end
  if t.functions ~= nil then
    if type(t.functions) ~= "table" then fail("template.functions must be a table", level) end
    for name, f in each_pair(t.functions) do
      if type(name) ~= "string" then fail("template.functions keys must be names (strings)", level) end
      if type(f) ~= "table" or type(f.handler) ~= "function" then
        fail("template.functions." .. name .. " must be a table with a handler function", level)
      end
    end
  end
  if caps.validate_template then caps.validate_template(t, level) end
end

local function build(template, transport, level)
  template_check.run(validate, template, 1)   -- raises "<driver file>:<line>: ..."
  local d = setmetatable({}, Driver)
  for k, v in each_pair(template) do d[k] = v end
  d.name = template.name
  d.lifecycle = template.lifecycle or {}
  d.functions = template.functions or {}
  d.transport = transport
  caps.register_driver(d)
  if caps.datastore then d.datastore = caps.datastore() end
  if caps.on_driver_built then caps.on_driver_built(d) end
  return d
end

--- Build a driver with no transport (timers, API functions, other drivers).
function driver_helper.init(template) return (build(template, nil, 2)) end  -- not a tail call: errors point at the caller

--- Build a driver whose devices talk over a serial line / TCP / UDP (see the transports
-- section of the README for the device settings).
function driver_helper.init_serial(template) return (build(template, "serial", 2)) end  -- not a tail call: errors point at the caller
function driver_helper.init_tcp(template) return (build(template, "tcp", 2)) end  -- not a tail call: errors point at the caller
function driver_helper.init_udp(template) return (build(template, "udp", 2)) end  -- not a tail call: errors point at the caller

--- Yield the current handler for `seconds` (other events of this driver keep running).
function driver_helper.sleep(seconds) return caps.sleep(seconds) end

driver_helper.Driver = Driver
driver_helper.Device = Device
return driver_helper
