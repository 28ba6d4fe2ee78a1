--- hubhost.template: the driver template's keys, checked before the driver is built, and
-- every template error pointed at the driver's own file and line.
--
-- Unknown keys are refused at load, with a suggestion when a known key is close:
--   init.lua:4: unknown key 'delimitr' in framing (did you mean 'delimiter'?)
-- Checked: the template's top level, `framing`, `lifecycle` names, each function
-- definition and each parameter spec. Keys starting with "_" are the author's own and pass.
--
-- Locations: `return driver_helper.init_tcp{...}` is a tail call, so the driver's frame is
-- gone when the template is checked. The location is therefore found from the driver's
-- frame when there is one, else from the entry chunk's source: the line where the
-- offending key (or the path leading to it) is written. Errors raised by the other checks
-- (driver_helper, driver_functions, devicelink) are relocated the same way.
local caps = select(2, ...)

-- loops use each_pair, not a variable named pairs: LuaJIT #1510 (see lua/driver_helper.lua)
local type, each_pair, tostring, error, pcall, select = type, pairs, tostring, error, pcall, select
local str_format, str_find, str_sub, str_match, str_gsub =
  string.format, string.find, string.sub, string.match, string.gsub
local tsort, tconcat = table.sort, table.concat

local M = {}

local function set(list)
  local s = {}
  for i = 1, #list do s[list[i]] = true end
  return s
end

M.TOP = set { "name", "framing", "lifecycle", "on_receive", "functions", "implements",
              "requirements", "security" }
M.FRAMING = set { "delimiter", "length", "pattern", "max_frame", "keep_empty" }   -- devices/framing.py
M.LIFECYCLE = set { "init", "added", "removed", "shutdown", "connected", "disconnected" }
M.FUNCTION = set { "params", "handler", "security", "timeout", "description" }
M.PARAM = set { "optional", "description" }

---------------------------------------------------------------------------------------------
-- Did you mean: the closest known key by edit distance (transpositions count once).

local function distance(a, b)
  local la, lb = #a, #b
  if la == 0 then return lb end
  if lb == 0 then return la end
  local prev2, prev, cur = {}, {}, {}
  for j = 0, lb do prev[j] = j end
  for i = 1, la do
    cur = { [0] = i }
    local ca = str_sub(a, i, i)
    for j = 1, lb do
      local cb = str_sub(b, j, j)
      local cost = ca == cb and 0 or 1
      local v = prev[j] + 1
      if cur[j - 1] + 1 < v then v = cur[j - 1] + 1 end
      if prev[j - 1] + cost < v then v = prev[j - 1] + cost end
      if i > 1 and j > 1 and ca == str_sub(b, j - 1, j - 1) and str_sub(a, i - 1, i - 1) == cb
         and prev2[j - 2] + 1 < v then
        v = prev2[j - 2] + 1
      end
      cur[j] = v
    end
    prev2, prev = prev, cur
  end
  return prev[lb]
end
M.distance = distance

function M.suggest(key, known)
  if type(key) ~= "string" then return nil end
  local best, best_d = nil, nil
  local names = {}
  for k in each_pair(known) do names[#names + 1] = k end
  tsort(names)
  local lk = key:lower()
  for _, k in ipairs(names) do
    local d = distance(lk, k)
    if best_d == nil or d < best_d then best, best_d = k, d end
  end
  if best and best_d <= math.max(1, math.floor(#best / 3)) then return best end
  for _, k in ipairs(names) do   -- a prefix: "desc" for "description"
    if #lk >= 3 and (str_sub(k, 1, #lk) == lk or str_sub(lk, 1, #k) == k) then return k end
  end
  return nil
end

local function sorted_names(known)
  local names = {}
  for k in each_pair(known) do names[#names + 1] = k end
  tsort(names)
  return tconcat(names, ", ")
end

-- A template error: message plus the key path that locates it ({ "framing", "delimitr" }).
local Problem = {}
Problem.__index = Problem
Problem.__tostring = function(p) return p.message end

local function problem(path, message)
  error(setmetatable({ path = path, message = message }, Problem), 0)
end

local function check_keys(tbl, known, where, path)
  if type(tbl) ~= "table" then return end
  local keys = {}
  for k in each_pair(tbl) do keys[#keys + 1] = k end
  tsort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    if type(k) == "string" and not known[k] and str_sub(k, 1, 1) ~= "_" then
      local p = {}
      for i = 1, #path do p[i] = path[i] end
      p[#p + 1] = k
      local hint = M.suggest(k, known)
      problem(p, str_format("unknown key '%s' in %s (%s)", k, where,
        hint and str_format("did you mean '%s'?", hint) or "known keys: " .. sorted_names(known)))
    end
  end
end

--- The key checks (each raises a Problem).
function M.check_keys(t)
  if type(t) ~= "table" then return end
  check_keys(t, M.TOP, "the template", {})
  if type(t.framing) == "table" then check_keys(t.framing, M.FRAMING, "framing", { "framing" }) end
  if type(t.lifecycle) == "table" then
    local keys = {}
    for k in each_pair(t.lifecycle) do keys[#keys + 1] = k end
    tsort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
      if not M.LIFECYCLE[k] then
        local hint = M.suggest(k, M.LIFECYCLE)
        problem({ "lifecycle", k }, str_format("unknown lifecycle event '%s' (%s)", tostring(k),
          hint and str_format("did you mean '%s'?", hint) or "events: " .. sorted_names(M.LIFECYCLE)))
      end
    end
  end
  if type(t.functions) == "table" then
    for name, f in each_pair(t.functions) do
      if type(name) == "string" and type(f) == "table" then
        check_keys(f, M.FUNCTION, "function " .. name, { "functions", name })
        if type(f.params) == "table" and f.params[1] == nil then
          for pname, spec in each_pair(f.params) do
            if type(spec) == "table" then
              check_keys(spec, M.PARAM, str_format("parameter %s of function %s", tostring(pname), name),
                { "functions", name, "params", tostring(pname) })
            end
          end
        elseif type(f.params) == "table" then
          for i = 1, #f.params do
            local spec = f.params[i]
            if type(spec) == "table" then
              check_keys(spec, M.PARAM, str_format("parameter %s of function %s", tostring(spec[1]), name),
                { "functions", name, "params", tostring(spec[1]) })
            end
          end
        end
      end
    end
  end
end

---------------------------------------------------------------------------------------------
-- Locations.

local function is_library(file)
  return file == "[C]" or str_sub(file, 1, 8) == "hubhost/" or str_find(file, "^%(") ~= nil
end

-- The first frame of the traceback that is the driver's: file, line (or nil: tail call).
local function driver_frame(tb)
  for file, line in tb:gmatch("\n%s*([^\n]-):(%d+): in ") do
    if not is_library(file) then return file, tonumber(line) end
  end
  return nil
end

local function line_of(src, pos)
  local n = 1
  for _ in str_sub(src, 1, pos):gmatch("\n") do n = n + 1 end
  return n
end

local function escape(s) return (str_gsub(s, "%W", "%%%0")) end

-- Find the key path written in the source, from `from` (a byte offset) on: each segment
-- must come after the previous one ("functions", "power", "parms").
local function find_path(src, path, from)
  local pos, found = from or 1, nil
  for _, seg in ipairs(path) do
    local e = escape(seg)
    local s = str_find(src, "%f[%w_]" .. e .. "%f[^%w_]%s*=", pos)
      or str_find(src, "%[%s*[\"']" .. e .. "[\"']%s*%]%s*=", pos)
    if s then pos, found = s, s end
  end
  return found
end

local function shown_file(chunkname)
  return (str_gsub(chunkname or "?", "^[@=]", ""))
end

-- The path of a message from the other checks: "template.functions.power.params.x ...".
local function path_of(msg)
  local dotted = str_match(msg, "template%.([%w_%.]+)")
  if not dotted then return {} end
  local path = {}
  for seg in dotted:gmatch("[^%.]+") do path[#path + 1] = seg end
  return path
end

local function strip_location(msg)
  msg = tostring(msg)
  msg = str_gsub(msg, "\nstack traceback:.*$", "")
  local rest = str_match(msg, "^[^\n:]+:%d+: (.*)$")
  while rest do
    msg = rest
    rest = str_match(msg, "^[^\n:]+:%d+: (.*)$")
  end
  return msg
end

--- "file:line" of the driver for a template problem at `path`.
function M.locate(path, tb)
  local entry = caps.entry_chunk
  local file, line = driver_frame(tb or "")
  local src = entry and entry.src
  if file and entry and not str_find(shown_file(entry.name), escape(str_gsub(file, "^%.%.%.", "")) .. "$") then
    return file .. ":" .. line     -- a module of the driver built the template: its call line
  end
  if src and #path > 0 then
    local from = 1
    if line then   -- start the search at the call's line
      local n = 1
      for i = 1, line - 1 do
        local nl = str_find(src, "\n", from, true)
        if not nl then break end
        from, n = nl + 1, n + 1
      end
      if n < line then from = 1 end
    end
    local pos = find_path(src, path, from) or (from > 1 and find_path(src, path, 1))
    if pos then return shown_file(entry.name) .. ":" .. line_of(src, pos) end
  end
  if line then return (entry and shown_file(entry.name) or file) .. ":" .. line end
  if src then
    local s = str_find(src, "driver_helper%s*%.%s*init")
    if s then return shown_file(entry.name) .. ":" .. line_of(src, s) end
  end
  return shown_file(entry and entry.name) .. ":1"
end

--- Run the template checks (ours, then `validate` of driver_helper with everything it
-- chains); any error is raised again as "<driver file>:<line>: <message>".
function M.run(validate, t, ...)
  local tb_of = debug and debug.traceback or function() return "" end
  local ok, err = pcall(M.check_keys, t)
  if ok then ok, err = pcall(validate, t, ...) end
  if ok then return end
  local tb = tb_of("", 2)
  local path, msg
  if getmetatable(err) == Problem then
    path, msg = err.path, err.message
  else
    msg = strip_location(err)
    path = path_of(msg)
  end
  error(M.locate(path, tb) .. ": " .. msg, 0)
end

return M
