--- hubhost.test: the driver test kit for specs (`local test = require "hubhost.test"`).
--
-- `test.load_driver(path, opts)` loads a driver in a runtime of its own (the same sandbox,
-- library, datastore and transport glue the hub uses), with a virtual clock, mock
-- transports and a throw-away state dir, and returns a handle whose methods drive it.
-- Every value a method returns is a plain copy (strings, numbers, booleans, tables):
-- nothing of the driver's Lua state reaches the spec. See docs/driver-guide.md.
local caps = select(2, ...)
local kit = type(caps) == "table" and caps.testkit or nil

local type, error, select, setmetatable, getmetatable = type, error, select, setmetatable, getmetatable
local find = string.find

local M = {}

local Handle = {}
Handle.__index = Handle

local Call = {}
Call.__index = Call

local function need_kit()
  if kit == nil then
    error("hubhost.test works in specs run by hubhost's pytest plugin (`hubhost test` or pytest), "
      .. "not in drivers", 3)
  end
end

-- The host answers (true, value) or (false, message, located). A located error names the
-- spec line that called the method (level 3: op <- method <- spec); exec's "code: message"
-- errors are raised as they are, so has_error can compare them exactly. No tail calls
-- here or in the methods: they would change the levels.
local function op(self, name, ...)
  if getmetatable(self) ~= Handle then
    error("hubhost.test: call handle methods with ':' (h:" .. name .. "(...)), not '.'", 3)
  end
  local ok, r, located = kit.op(self.id, name, ...)
  if not ok then error(r, located and 3 or 0) end
  return r
end

--- Load the driver at `path` (relative to the spec file's folder: ".." from spec/ is the
-- driver; nil means the spec's own driver). opts: devices = { { id =, label =, config =,
-- transport =, connected = } }, config = { id =, cpu_limit =, max_memory =, flush_interval = },
-- datastore = { initial contents }, strict = true|false.
function M.load_driver(path, opts)
  need_kit()
  local ok, id, located = kit.load(path, opts)
  if not ok then error(id, located and 2 or 0) end
  return setmetatable({ id = id, path = path }, Handle)
end

-- Functions (the API's validation and error codes; errors raise "code: message").
function Handle:exec(device_id, fn, args, level)
  local r = op(self, "exec", device_id, fn, args, level)
  return r
end

function Handle:exec_async(device_id, fn, args, level)
  local cid = op(self, "exec_async", device_id, fn, args, level)
  return setmetatable({ handle = self, cid = cid, fn = fn }, Call)
end

function Call:done()
  local d = op(self.handle, "call_done", self.cid)
  return d
end

function Call:result()
  local r = op(self.handle, "call_result", self.cid)
  return r
end

-- Status and datastore.
function Handle:status(device_id, name)
  local r = op(self, "status", device_id, name)
  return r
end

function Handle:datastore()
  local r = op(self, "datastore")
  return r
end

function Handle:device_store(device_id)
  local r = op(self, "device_store", device_id)
  return r
end

function Handle:stored()
  local r = op(self, "stored")
  return r
end

-- Mock transports.
function Handle:feed(device_id, bytes)
  op(self, "feed", device_id, bytes)
  return self
end

function Handle:sent(device_id)
  local r = op(self, "sent", device_id)
  return r
end

function Handle:connect(device_id)
  op(self, "connect", device_id)
  return self
end

function Handle:disconnect(device_id, reason)
  op(self, "disconnect", device_id, reason)
  return self
end

function Handle:connected(device_id)
  local r = op(self, "connected", device_id)
  return r
end

function Handle:respond(device_id, responder, delay)
  op(self, "respond", device_id, responder, delay)
  return self
end

-- Virtual time.
function Handle:advance_time(seconds)
  local r = op(self, "advance_time", seconds)
  return r
end

function Handle:now()
  local r = op(self, "now")
  return r
end

function Handle:timers()
  local r = op(self, "timers")
  return r
end

-- What the driver logged and which handlers failed.
function Handle:logs()
  local r = op(self, "logs")
  return r
end

--- True if a captured log line (its `text`: "<level> [driver/device] message") contains
-- `needle` (plain text, not a pattern).
function Handle:logged(needle)
  if type(needle) ~= "string" then
    error("logged: expected the text to look for, got " .. type(needle), 2)
  end
  local lines = op(self, "logs")
  for i = 1, #lines do
    if find(lines[i].text, needle, 1, true) then return true end
  end
  return false
end

function Handle:errors()
  local r = op(self, "errors")
  return r
end

function Handle:interface()
  local r = op(self, "interface")
  return r
end

-- Other drivers: answer the driver's calls, publish values to its subscriptions.
function Handle:on_call(fn)
  op(self, "on_call", fn)
  return self
end

function Handle:publish(system, module, index, status, value)
  local n = op(self, "publish", system, module, index, status, value)
  return n
end

-- Life cycle.
function Handle:restart(opts)
  op(self, "restart", opts)
  return self
end

function Handle:stop()
  op(self, "stop")
  return self
end

return M
