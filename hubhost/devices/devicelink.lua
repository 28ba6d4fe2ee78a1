-- hubhost/devicelink.lua: privileged glue between a driver's devices and their transports.
--
-- Run once per runtime by hubhost/devicelink.py (after runtime.lua, before the entry chunk).
-- It gives the library caps what Device:send / Device:request / Device:answer need, checks a
-- template's `framing`, opens a device's link when it starts, and returns the entry points
-- Python calls on the driver's thread: receive (frames -> on_receive handlers), connection
-- (connected / disconnected handlers and the `connected` status) and tokenize (a `pattern`
-- framing function under the CPU budget).

-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local R, caps, host, sb, cpu_limit = ...

local type, tostring, error, select, pairs, pcall, rawget =
  type, tostring, error, select, pairs, pcall, rawget
local huge, floor = math.huge, math.floor

local host_open, host_close, host_send, host_answer, host_request = host.link_open,
  host.link_close, host.link_send, host.link_answer, host.link_request
local host_check_framing, host_clock = host.link_check_framing, host.clock

local DEFAULT_TIMEOUT = 2.0    -- seconds a request waits for its answer, per attempt
local BATCH_SECONDS = 0.05     -- on_receive handlers run per call before Python re-posts
local REQUEST_OPTIONS = { timeout = true, retries = true, priority = true, name = true, match = true }

local L = {}
local labels = {}              -- device id -> "on_receive [id]"

---------------------------------------------------------------------------------------------
-- Template check: `framing` is validated by the host's framer factory (one source of truth).
local prev_validate = caps.validate_template
function caps.validate_template(t, level)
  if prev_validate then prev_validate(t, level + 1) end
  local framing = t.framing
  if framing == nil then return end
  if type(framing) ~= "table" then
    error("driver_helper: template.framing must be a table, got " .. type(framing), level + 1)
  end
  local err = host_check_framing(framing)
  if err then error("driver_helper: template." .. err, level + 1) end
end

---------------------------------------------------------------------------------------------
-- Device start / removal (called by runtime.lua).
local prev_started = caps.device_started
function caps.device_started(device)
  if prev_started then prev_started(device) end
  local driver = caps.driver()
  if driver == nil then return end
  local id = caps.device_id(device)
  if id == nil then return end
  labels[id] = "on_receive [" .. id .. "]"
  local transport = rawget(driver, "transport")
  if host_open(id, type(transport) == "string" and transport or false) then
    -- known from the start: not connected until the transport says so
    local ok, err = pcall(caps.set_status, id, "connected", false)
    if not ok then caps.log("error", id, "cannot set status connected: " .. tostring(err)) end
  end
end

local prev_removed = caps.device_removed
function caps.device_removed(id)
  if prev_removed then prev_removed(id) end
  labels[id] = nil
  host_close(id)
end

---------------------------------------------------------------------------------------------
-- Device:send / Device:request / Device:answer. Errors name the caller's line (level 3:
-- caps.x <- Device:x <- driver code).
function caps.send(id, data)
  if type(data) ~= "string" then
    error("device:send: data must be a string of bytes, got " .. type(data), 3)
  end
  local ok, err = host_send(id, data)
  if not ok then error("device:send: " .. tostring(err), 3) end
  return true
end

local function check_options(opts)
  local timeout, retries, priority, name, match = DEFAULT_TIMEOUT, 0, 0, false, false
  if opts == nil then return timeout, retries, priority, name, match end
  if type(opts) ~= "table" then
    error("device:request: options must be a table, got " .. type(opts), 4)
  end
  for k in each_pair(opts) do
    if not REQUEST_OPTIONS[k] then
      error("device:request: unknown option " .. tostring(k)
        .. " (allowed: timeout, retries, priority, name, match)", 4)
    end
  end
  local v = opts.timeout
  if v ~= nil then
    if type(v) ~= "number" or v ~= v or v <= 0 or v == huge then
      error("device:request: timeout must be a positive number of seconds, got " .. tostring(v), 4)
    end
    timeout = v
  end
  v = opts.retries
  if v ~= nil then
    if type(v) ~= "number" or v < 0 or v ~= floor(v) or v == huge then
      error("device:request: retries must be an integer >= 0, got " .. tostring(v), 4)
    end
    retries = v
  end
  v = opts.priority
  if v ~= nil then
    if type(v) ~= "number" or v ~= v or v == huge or v == -huge then
      error("device:request: priority must be a finite number, got " .. tostring(v), 4)
    end
    priority = v
  end
  v = opts.name
  if v ~= nil then
    if type(v) ~= "string" then
      error("device:request: name must be a string, got " .. type(v), 4)
    end
    name = v
  end
  v = opts.match
  if v ~= nil then
    if type(v) ~= "string" or v == "" then
      error("device:request: match must be a non-empty string (the answer's first bytes), got "
        .. (type(v) == "string" and '""' or type(v)), 4)
    end
    match = v
  end
  return timeout, retries, priority, name, match
end

-- Requests waiting for their answer, for the max_pending_requests cap.
local limits = caps.limits
local pending_requests = 0
local function request_done(...)
  pending_requests = pending_requests - 1
  return ...
end

function caps.request(id, data, opts)
  if type(data) ~= "string" then
    error("device:request: data must be a string of bytes, got " .. type(data), 3)
  end
  local timeout, retries, priority, name, match = check_options(opts)
  if not sb.can_wait() then
    error("device:request: can only be called from a handler (it yields until the answer)", 3)
  end
  if pending_requests >= limits.max_pending_requests then
    caps.limit_error("pending device requests", "max_pending_requests", "requests waiting for an answer", 3)
  end
  -- resumed by the host with (frame, nil) or (nil, "timeout" | "disconnected" | ...)
  host_request(id, data, timeout, retries, priority, name, match)
  pending_requests = pending_requests + 1
  return request_done(caps.host_wait("request", false))
end

function caps.answer(id, frame)
  if frame ~= nil and type(frame) ~= "string" then
    error("device:answer: frame must be a string of bytes or nil, got " .. type(frame), 3)
  end
  host_answer(id, frame or false)
end

---------------------------------------------------------------------------------------------
-- Entry points for Python (driver thread).

-- Run on_receive(driver, device, frame) for each frame, one handler coroutine each.
-- Returns how many frames were handled (fewer than given once BATCH_SECONDS have passed,
-- so timers and other devices get their turn) and whether the driver has an on_receive.
function L.receive(id, ...)
  local n = select("#", ...)
  local driver = caps.driver()
  local device = caps.devices()[id]
  local on_receive = R.driver_function("on_receive")   -- raw: the budget is not armed here
  if device == nil then return n, true end              -- removed meanwhile: dropped
  if on_receive == nil then return n, false end
  local label = labels[id] or ("on_receive [" .. tostring(id) .. "]")
  local call = R.call
  if n == 1 then
    call(label, on_receive, driver, device, (...))
    return 1, true
  end
  local frames = { ... }
  local stop_at = host_clock() + BATCH_SECONDS
  for i = 1, n do
    call(label, on_receive, driver, device, frames[i])
    if i % 16 == 0 and i < n and host_clock() > stop_at then return i, true end
  end
  return n, true
end

-- The transport connected (up = true) or went away (up = false, reason = text).
function L.connection(id, up, reason)
  local device = caps.devices()[id]
  if device == nil then return end
  local ok, err = pcall(caps.set_status, id, "connected", up)
  if not ok then caps.log("error", id, "cannot set status connected: " .. tostring(err)) end
  if up then
    R.device_lifecycle("connected", id)
  else
    R.device_lifecycle("disconnected", id, reason)
  end
end

-- One call of a `pattern` framing function: (ok, frame, rest) or (false, message).
-- `return nil` alone means "need more bytes, keep the buffer".
-- An error object is turned into text before the budget is disarmed (its __tostring is the
-- driver's); results must be strings (or nil), never driver tables handed to the host.
local error_text = sb.error_text
function L.tokenize(fn, buffer, label)
  if sb.armed() then   -- called from inside a running handler: never re-arm (see sandbox.lua)
    return false, "framing pattern not run: called from inside a running handler"
  end
  sb.arm(cpu_limit, label)
  local ok, frame, rest = pcall(fn, buffer)
  if not ok then frame = error_text(frame) end
  local abort = sb.disarm()
  if abort then return false, abort end
  if not ok then return false, frame end
  if frame ~= nil and type(frame) ~= "string" then
    return false, "framing pattern: the frame must be a string or nil, got " .. type(frame)
  end
  if rest ~= nil and type(rest) ~= "string" then
    return false, "framing pattern: the rest must be a string or nil, got " .. type(rest)
  end
  if frame == nil and rest == nil then rest = buffer end
  return true, frame, rest
end

return L
