--- log: driver logging into the host's log, with the driver (and device) named.
-- log.info("text", ...) joins its arguments with spaces (tostring on each), like print.
local caps = select(2, ...)

local select, tostring, tconcat = select, tostring, table.concat

local function join(...)
  local n = select("#", ...)
  if n == 1 then return tostring((...)) end
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return tconcat(parts, " ")
end

local log = {}

local function make(level)
  return function(...) caps.log(level, nil, join(...)) end
end

for _, level in ipairs({ "trace", "debug", "info", "warn", "error" }) do
  log[level] = make(level)
end

--- A logger bound to one device: device.log.info(...) names the device.
function log.for_device(device_id)
  local l = {}
  for _, level in ipairs({ "trace", "debug", "info", "warn", "error" }) do
    l[level] = function(...) caps.log(level, device_id, join(...)) end
  end
  return l
end

return log
