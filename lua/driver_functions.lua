--- driver_functions: the driver side of functions, metadata, JSON and driver-to-driver calls.
--
-- Loaded by driver_helper; values that leave the driver are encoded by lua/json.lua.
-- It plugs into the library caps:
--   * caps.validate_template: a template's `functions`, `security`, `implements` and
--     `requirements` are checked when the driver is built, so a bad one fails at load with
--     the function and parameter named;
--   * caps.metadata: the interface table (DESIGN section 5) for `hubhost check`;
--   * caps.on_driver_built: gives each driver `driver:system(id)`.
-- The host (hubhost/functions.py) reaches this module as caps.functions_api: it asks for
-- the interface as JSON text and runs function calls and subscription deliveries through
-- `invoke` and `deliver` as handler coroutines.
local caps = select(2, ...)

local type, pairs, ipairs, tostring, tonumber, error, select, setmetatable, xpcall, next =
  type, pairs, ipairs, tostring, tonumber, error, select, setmetatable, xpcall, next
-- Loops iterate through each_pair/each_next, not variables named pairs/next: LuaJIT (lupa 2.8)
-- can drop an element from a specialized pairs/next loop (ITERN, LuaJIT #1510).
local each_pair, each_next = pairs, next
local floor, huge = math.floor, math.huge
local str_format, str_find, str_match = string.format, string.find, string.match
local tconcat, tsort = table.concat, table.sort

local json = require "hubhost.json"
local error_text = caps.sandbox.error_text

local M = {}

-- JSON: lua/json.lua checks and encodes every value that leaves the driver.
local quote, number_text, encode, try_encode, table_kind =
  json.quote, json.number, json.encode, json.try_encode, json.kind
M.quote, M.encode = quote, encode

---------------------------------------------------------------------------------------------
-- Parameter types (DESIGN section 3).

local function is_integer(v)
  return type(v) == "number" and v == floor(v) and v > -huge and v < huge
end

local function table_is(v, want)
  if type(v) ~= "table" then return false end
  local kind = table_kind(v)
  return kind == "empty" or kind == want
end

local CHECKS = {
  Bool = function(v) return type(v) == "boolean" end,
  Int32 = function(v) return is_integer(v) and v >= -2147483648 and v <= 2147483647 end,
  Int64 = function(v) return is_integer(v) and v >= -9223372036854775808 and v < 9223372036854775808 end,
  Float64 = function(v) return type(v) == "number" and number_text(v) ~= nil end,
  String = function(v) return type(v) == "string" end,
  Array = function(v) return table_is(v, "array") end,
  Object = function(v) return table_is(v, "object") end,
  JSON = function(v) return try_encode(v) ~= nil end,
}
local TYPE_LIST = "Bool, Int32, Int64, Float64, String, Array, Object, JSON"

-- "String|Int32" -> { "String", "Int32" }, or nil and the problem.
local function parse_type(s)
  if type(s) ~= "string" then return nil, "type must be a string such as \"Bool\", got " .. type(s) end
  local alts = {}
  for part in (s .. "|"):gmatch("([^|]*)|") do
    local name = str_match(part, "^%s*(.-)%s*$")
    if not CHECKS[name] then
      return nil, str_format("unknown type %q in %q (types are %s, or unions like \"String|Int32\")",
        name, s, TYPE_LIST)
    end
    alts[#alts + 1] = name
  end
  return alts
end
M.parse_type = parse_type

local function matches(v, alts)
  for i = 1, #alts do
    if CHECKS[alts[i]](v) then return true end
  end
  return false
end

---------------------------------------------------------------------------------------------
-- Template validation and the normalised function table.

local LEVELS = { none = 0, support = 1, administrator = 2 }
local FUNCTION_KEYS = { params = true, handler = true, security = true, timeout = true,
                        description = true }

local function bad(msg, level) error("driver_helper: " .. msg, level + 1) end

local function sorted_keys(t)
  local keys = {}
  for k in each_pair(t) do keys[#keys + 1] = k end
  tsort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- One param spec ({ "Type", default } / "Type" / { "Type", optional = true }) -> entry.
-- `level` arguments: the caller's error level for the template's author; each function
-- adds its own frame.
local function param_entry(fname, pname, spec, level)
  level = level + 1
  local where = "template.functions." .. fname .. ".params." .. tostring(pname)
  if type(pname) ~= "string" or not str_find(pname, "^[%a_][%w_]*$") then
    bad(str_format("template.functions.%s: parameter name %s must be an identifier", fname, tostring(pname)), level)
  end
  if type(spec) == "string" then spec = { spec } end
  if type(spec) ~= "table" then
    bad(where .. " must be { \"Type\" } or { \"Type\", default }, got " .. type(spec), level)
  end
  local alts, err = parse_type(spec[1])
  if not alts then bad(where .. ": " .. err, level) end
  local e = { name = pname, type = spec[1], alts = alts }
  if spec.description ~= nil then
    if type(spec.description) ~= "string" then bad(where .. ".description must be a string", level) end
    e.description = spec.description
  end
  if spec[2] ~= nil then
    if not matches(spec[2], alts) then
      bad(str_format("%s: default %s is not %s", where, tostring(spec[2]), spec[1]), level)
    end
    e.has_default, e.default = true, spec[2]
  elseif spec.optional then
    e.has_default = true   -- optional without a default: omitted means nil
  end
  return e
end

-- params in map form (sorted by name) or list form ({ {"a","Int32"}, {"b","Int32",2} }).
local function param_list(fname, params, level)
  level = level + 1
  if params == nil then return {} end
  if type(params) ~= "table" then
    bad("template.functions." .. fname .. ".params must be a table, got " .. type(params), level)
  end
  local list = {}
  if params[1] ~= nil then
    if table_kind(params) ~= "array" then
      bad("template.functions." .. fname .. ".params mixes list entries and named entries", level)
    end
    local seen = {}
    for i = 1, #params do
      local p = params[i]
      if type(p) ~= "table" then
        bad(str_format("template.functions.%s.params[%d] must be { \"name\", \"Type\", default? }", fname, i), level)
      end
      local e = param_entry(fname, p[1], { p[2], p[3], optional = p.optional, description = p.description }, level)
      if seen[e.name] then bad(str_format("template.functions.%s.params: %s appears twice", fname, e.name), level) end
      seen[e.name] = true
      list[i] = e
    end
  else
    for _, pname in ipairs(sorted_keys(params)) do
      list[#list + 1] = param_entry(fname, pname, params[pname], level)
    end
  end
  return list
end

local function check_string_list(what, v, level)
  level = level + 1
  if type(v) ~= "table" then bad(what .. " must be a list of names, got " .. type(v), level) end
  local kind = table_kind(v)
  if kind == nil or kind == "object" then bad(what .. " must be a list of names", level) end
  -- returns a plain copy; `#v` is evaluated once (a driver's __len may answer differently
  -- each time, and a copy loop over nils would run in a compiled trace the hook never sees)
  local copy = {}
  for i = 1, #v do
    local x = v[i]
    if type(x) ~= "string" then
      bad(str_format("%s[%d] must be a string, got %s", what, i, type(x)), level)
    end
    copy[i] = x
  end
  return copy
end

-- Normalise a template into { functions = name -> spec, security = name -> level, ... }.
local function describe(t, level)
  level = level + 1
  local fns = t.functions or {}
  local out = { functions = {}, names = sorted_keys(fns), security = {} }
  for _, name in ipairs(out.names) do
    local f = fns[name]
    if not str_find(name, "^[%a_][%w_]*$") then
      bad(str_format("template.functions: %q is not a valid function name (letters, digits, _)", name), level)
    end
    for k in each_pair(f) do
      if not FUNCTION_KEYS[k] then
        bad(str_format("template.functions.%s.%s is not a function field (params, handler, security, timeout, description)",
          name, tostring(k)), level)
      end
    end
    if f.security ~= nil then
      if LEVELS[f.security] == nil then
        bad(str_format("template.functions.%s.security must be \"support\" or \"administrator\", got %s",
          name, tostring(f.security)), level)
      end
      if f.security ~= "none" then out.security[name] = f.security end
    end
    if f.timeout ~= nil and (type(f.timeout) ~= "number" or not (f.timeout > 0) or f.timeout == huge) then
      bad(str_format("template.functions.%s.timeout must be a positive number of seconds, got %s",
        name, tostring(f.timeout)), level)
    end
    if f.description ~= nil and type(f.description) ~= "string" then
      bad(str_format("template.functions.%s.description must be a string, got %s", name, type(f.description)), level)
    end
    out.functions[name] = { params = param_list(name, f.params, level), timeout = f.timeout,
                            handler = f.handler, description = f.description }
  end
  if t.security ~= nil then
    if type(t.security) ~= "table" then
      bad("template.security must be a table { support = {names}, administrator = {names} }", level)
    end
    for lvl, names in each_pair(t.security) do
      if lvl ~= "support" and lvl ~= "administrator" then
        bad(str_format("template.security.%s is not a level (support, administrator)", tostring(lvl)), level)
      end
      check_string_list("template.security." .. lvl, names, level)
      for _, fname in ipairs(names) do
        if not out.functions[fname] then
          bad(str_format("template.security.%s names %q, which is not in template.functions", lvl, fname), level)
        end
        local prev = out.security[fname]
        if prev and prev ~= lvl then
          bad(str_format("template.security: function %s is both %s and %s", fname, prev, lvl), level)
        end
        out.security[fname] = lvl
      end
    end
  end
  -- implements / requirements are copied into plain lists here, while the template is
  -- checked (under the entry chunk's budget): the interface never reads the driver's
  -- tables again, whatever metatables they get later.
  out.implements, out.requirements = {}, {}
  if t.implements ~= nil then
    out.implements = check_string_list("template.implements", t.implements, level)
  end
  if t.requirements ~= nil then
    if type(t.requirements) ~= "table" then
      bad("template.requirements must be a table { Module = { \"Interface\", ... } }", level)
    end
    for k, v in each_pair(t.requirements) do
      if type(k) ~= "string" then bad("template.requirements keys must be module names (strings)", level) end
      out.requirements[k] = check_string_list("template.requirements." .. k, v, level)
    end
  end
  return out
end

local described = setmetatable({}, { __mode = "k" })   -- driver -> describe() result

local last_template, last_description = nil, nil

local prev_validate = caps.validate_template
function caps.validate_template(t, level)
  if prev_validate then prev_validate(t, level + 1) end
  last_template, last_description = t, describe(t, level + 1)
end

local function description(driver)
  local d = described[driver]
  if d == nil then
    d = describe(driver, 1)
    described[driver] = d
  end
  return d
end

---------------------------------------------------------------------------------------------
-- Metadata: the `interface/<device_id>` document.

local function security_lists(d)
  local lists = {}
  for _, name in ipairs(d.names) do
    local lvl = d.security[name]
    if lvl then
      lists[lvl] = lists[lvl] or {}
      lists[lvl][#lists[lvl] + 1] = name
    end
  end
  return lists
end

-- driver -> { interface, timeouts, metadata } computed by caps.prepare_driver at load, under
-- the CPU budget: the host asks for them later with no budget armed, and they are built
-- from driver tables (implements, requirements, defaults) that may carry metamethods.
local prepared = setmetatable({}, { __mode = "k" })

-- { fn = { description = "...", params = { p = "..." } } } for the functions and params that
-- have descriptions, or nil when none has one (the interface stays as DESIGN section 5 shows).
local function descriptions(d)
  local out, any = {}, false
  for _, name in ipairs(d.names) do
    local f = d.functions[name]
    local entry, params = {}, nil
    if f.description then entry.description, any = f.description, true end
    for _, p in ipairs(f.params) do
      if p.description then
        params = params or {}
        params[p.name], any = p.description, true
      end
    end
    if params then entry.params = params end
    if next(entry) ~= nil then out[name] = entry end
  end
  return any and out or nil
end

local function metadata_json(driver)
  local d = description(driver)
  local parts = {}
  for _, name in ipairs(d.names) do
    local ps = {}
    for _, p in ipairs(d.functions[name].params) do
      local spec = '[' .. quote(p.type)
      if p.has_default then
        local dv = p.default
        if type(dv) == "table" and next(dv) == nil and p.alts[1] == "Array" then
          spec = spec .. ",[]"
        else
          spec = spec .. "," .. encode(dv, "Parameter defaults", "default")
        end
      end
      ps[#ps + 1] = quote(p.name) .. ":" .. spec .. "]"
    end
    parts[#parts + 1] = quote(name) .. ":{" .. tconcat(ps, ",") .. "}"
  end
  local sec = security_lists(d)
  local sec_parts = {}
  for _, lvl in ipairs({ "support", "administrator" }) do
    if sec[lvl] then sec_parts[#sec_parts + 1] = quote(lvl) .. ":" .. encode(sec[lvl]) end
  end
  local req = d.requirements
  local req_text = "{}"
  if req and next(req) ~= nil then req_text = encode(req) end
  local impl = d.implements
  local impl_text = "[]"
  if impl and #impl > 0 then impl_text = encode(impl) end
  local descs = descriptions(d)
  local desc_text = descs and ('"descriptions":' .. encode(descs) .. ",") or ""
  local interface = '{' .. desc_text .. '"functions":{' .. tconcat(parts, ",") .. '},"implements":' .. impl_text ..
    ',"requirements":' .. req_text .. ',"security":{' .. tconcat(sec_parts, ",") .. '}}'
  local timeouts = {}
  for _, name in ipairs(d.names) do
    local t = d.functions[name].timeout
    if t then timeouts[#timeouts + 1] = quote(name) .. ":" .. number_text(t) end
  end
  return interface, "{" .. tconcat(timeouts, ",") .. "}"
end

--- Interface JSON text (functions and params in a stable order) and a JSON object of
-- per-function timeouts (host-only information).
function M.metadata_json(driver)
  local p = prepared[driver]
  if p then
    if p.err then error(p.err, 0) end
    return p.interface, p.timeouts
  end
  return metadata_json(driver)
end

local build_metadata
local prev_metadata = caps.metadata
function caps.metadata(driver)
  local p = prepared[driver]
  if p then
    if p.err then error(p.err, 0) end
    return p.metadata
  end
  return build_metadata(driver)
end

function build_metadata(driver)
  local base = prev_metadata and prev_metadata(driver) or {}
  local d = description(driver)
  local fns = {}
  for _, name in ipairs(d.names) do
    local ps = {}
    for _, p in ipairs(d.functions[name].params) do
      ps[p.name] = p.has_default and { p.type, p.default } or { p.type }
    end
    fns[name] = ps
  end
  base.functions = fns
  base.implements = d.implements
  base.requirements = d.requirements
  base.security = security_lists(d)
  base.descriptions = descriptions(d)
  return base
end

-- Called by runtime.lua right after the entry chunk, still under its CPU budget. A driver
-- whose interface cannot be built loads anyway; asking for its interface raises the error.
local prev_prepare = caps.prepare_driver
function caps.prepare_driver(driver)
  if prev_prepare then prev_prepare(driver) end
  local ok, interface, timeouts = pcall(metadata_json, driver)
  local ok2, md = pcall(build_metadata, driver)
  if ok and ok2 then
    prepared[driver] = { interface = interface, timeouts = timeouts, metadata = md }
  else
    local e = ok and md or interface
    prepared[driver] = { err = type(e) == "string" and e or "the driver's interface cannot be built" }
  end
end

---------------------------------------------------------------------------------------------
-- Running a function call (the host has validated the arguments against the metadata).

local function host_fn(name)
  local h = caps.host
  local f = h and h[name]
  if f == nil then
    error("this operation needs a running hub (host function " .. name .. " is missing)", 3)
  end
  return f
end

--- Handler body for one call: runs the function's handler and reports the outcome once.
-- While the host is inside the call that started `call_id` (M.sync_id == call_id), the
-- outcome is left in M.sync_ok / M.sync_payload for it to pick up when the call returns:
-- one crossing into Python fewer for handlers that finish without waiting.
M.sync_id, M.sync_ok, M.sync_payload = nil, nil, nil

local active = {}     -- call id -> { co =, label = } of a call whose handler has not finished

-- "file:line" of the first frame of the driver's own code in a traceback, or nil.
local function driver_location(tb)
  for file, line in tb:gmatch("\n%s*([^\n]-):(%d+): in ") do
    if file ~= "[C]" and file:sub(1, 8) ~= "hubhost/" and file:sub(1, 1) ~= "(" then
      return file .. ":" .. line
    end
  end
  return nil
end

-- The driver_error text always names the driver's file:line: error("x", 0) and error
-- objects carry none of their own.
local function located(msg, tb)
  if str_find(msg, "^[^\n]-:%d+: ") or msg == "not enough memory" then return msg end
  local where = driver_location(tb or "")
  return where and (where .. ": " .. msg) or msg
end

-- error({ message = "..." }) is common Lua style: its message, read raw (no metamethods)
local function message_of(m)
  if type(m) == "table" then
    local v = rawget(m, "message")
    if type(v) == "string" then return v end
  end
  return error_text(m)
end

function M.invoke(driver, device_id, name, args, call_id)
  local reported = false
  local function report(ok, payload)
    if reported then return end
    reported = true
    active[call_id] = nil
    if M.sync_id == call_id then
      M.sync_ok, M.sync_payload = ok, payload
    else
      host_fn("fn_done")(call_id, ok, payload)
    end
  end
  local spec = driver.functions and driver.functions[name]
  local device = caps.devices()[device_id]
  if type(spec) ~= "table" or device == nil then
    return report(false, "driver has no function " .. tostring(name) .. " for device " .. tostring(device_id))
  end
  -- The message handler runs before a CPU-limit abort is re-raised past us: report then.
  -- An error object is turned into text under the budget (error_text): its __tostring is
  -- the driver's, and an abort inside it is reported as the abort.
  -- Not for an out-of-memory error: the handler's memory is still live in the message
  -- handler, and a crossing into Python that cannot allocate breaks lupa (a stale GIL);
  -- that one is reported after the unwinding and a full collection.
  local co = coroutine.running()
  if co then active[call_id] = { co = co, label = name .. " [" .. tostring(device_id) .. "]" } end
  local ok, res, err = xpcall(spec.handler, function(m)
    local msg = located(message_of(m), debug.traceback("", 2))
    if msg ~= "not enough memory" then report(false, msg) end
    return msg
  end, driver, device, args)
  if not ok and res == "not enough memory" and caps.collect_garbage then
    caps.collect_garbage()
  end
  if not ok then
    if caps.function_fault then caps.function_fault(res) end   -- /metrics: a handler fault
    caps.log("warn", device_id, "function " .. name .. " failed: " .. res)
    return report(false, res)
  end
  if res == nil and err ~= nil then
    -- `return nil, err`: the Lua convention for a failure; the caller gets driver_error
    return report(false, message_of(err))
  end
  local text, problem = try_encode(res, "Results of function " .. name, "result")
  if text == nil then return report(false, problem) end
  return report(true, text)
end

--- The caller gave up on a call (its time-out): its handler is never resumed again, and the
-- driver is told with a log.warn. Returns true if the handler was still waiting.
function M.cancel(call_id, seconds)
  local a = active[call_id]
  if a == nil then return false end
  active[call_id] = nil
  local dropped = caps.sandbox.drop(a.co)
  local device_id = a.label:match("%[(.*)%]$")
  caps.log("warn", device_id, str_format("function %s timed out after %s s: cancelled; its handler "
    .. "will not be resumed (whatever it started, e.g. a request already sent, still happens)",
    a.label:match("^(%S+)") or a.label, tostring(seconds)))
  return dropped
end

---------------------------------------------------------------------------------------------
-- Other drivers: driver:system(id):get("Display", 1):call(...) / :subscribe(...).

local subs = {}   -- ref -> { fn =, label = }

local Module = {}
Module.__index = Module

local function module_label(m)
  return m.system .. "/" .. m.module .. "/" .. m.index
end

--- Call a function of the module this proxy points at; yields until the result.
-- Raises "<code>: <message>" (unknown_device, unknown_function, forbidden, bad_args,
-- driver_error, timeout).
function Module:call(fn, args)
  if type(fn) ~= "string" then
    error("call: function name must be a string, got " .. type(fn), 2)
  end
  if args ~= nil and type(args) ~= "table" then
    error("bad_args: args must be a table of named or positional arguments, got " .. type(args), 2)
  end
  if not caps.can_wait() then
    error("call: can only be used inside a handler (it waits for the result)", 2)
  end
  local args_text, problem = try_encode(args or {}, "Arguments of " .. fn, "args")
  if args_text == nil then error("bad_args: " .. problem, 2) end
  local req = '{"system":' .. quote(self.system) .. ',"module":' .. quote(self.module) ..
    ',"index":' .. self.index .. ',"function":' .. quote(fn) .. ',"args":' .. args_text .. '}'
  local rok, value = caps.host_wait("call", req)
  if rok == true then return value end
  error(tostring(value), 2)
end

local Subscription = {}
Subscription.__index = Subscription

--- Stop receiving values; returns true if the subscription was active.
function Subscription:unsubscribe()
  if subs[self.ref] == nil then return false end
  subs[self.ref] = nil
  host_fn("fn_unsubscribe")(self.ref)
  return true
end

--- fn(driver, value, subscription) runs on the current value (if any) and on every change.
-- The subscription follows the system index: re-ordered modules deliver the new one's values.
function Module:subscribe(status, fn)
  if type(status) ~= "string" or status == "" then
    error("subscribe: status name must be a non-empty string, got " .. type(status), 2)
  end
  if type(fn) ~= "function" then
    error("subscribe: callback must be a function, got " .. type(fn), 2)
  end
  local ref, err = host_fn("fn_subscribe")(self.system, self.module, self.index, status)
  if ref == nil then error(err, 2) end
  local sub = setmetatable({ ref = ref, status = status, target = module_label(self) }, Subscription)
  subs[ref] = { fn = fn, sub = sub }
  return sub
end

--- Handler body for one delivered value.
function M.deliver(driver, ref, value)
  local s = subs[ref]
  if s then return s.fn(driver, value, s.sub) end
end

local System = {}
System.__index = System

--- A proxy for "<Module>/<index>" in this system; `get("Display_2")` works too.
function System:get(module, index)
  if type(module) ~= "string" or module == "" then
    error("get: module name must be a non-empty string such as \"Display\", got " .. type(module), 2)
  end
  if index == nil then
    local m, i = str_match(module, "^(.-)_(%d+)$")
    if m then module, index = m, tonumber(i) else index = 1 end
  end
  if not is_integer(index) or index < 1 then
    error("get: index must be a positive integer, got " .. tostring(index), 2)
  end
  return setmetatable({ system = self.id, module = module, index = index }, Module)
end

local function system(driver, id)
  if type(id) ~= "string" or id == "" then
    error("system: system id must be a non-empty string, got " .. type(id), 2)
  end
  return setmetatable({ id = id }, System)
end

local prev_built = caps.on_driver_built
function caps.on_driver_built(d)
  if prev_built then prev_built(d) end
  -- build() validates the template, then builds the driver from it, then calls us
  if last_description then described[d] = last_description end
  last_template, last_description = nil, nil
  if d.system == nil then d.system = system end
end

-- The host's entry points (invoke, deliver, metadata_json, sync_*) go to the host only:
-- `require "driver_functions"` from driver code gets the harmless helpers.
caps.functions_api = M
return { quote = M.quote, encode = M.encode, parse_type = M.parse_type }
