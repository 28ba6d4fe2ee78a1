-- A display with a text protocol over TCP. Lines end in CR LF:
--   power on | power off | power?     -> power=on | power=off
--   input hdmi1|hdmi2|dp | input?     -> input=hdmi1
--   volume 0..100 | volume?           -> volume=40
--   anything else                     -> error: ...
-- The display may also speak on its own (e.g. "temperature=41"); on_receive keeps those.
-- The demo hub runs hubhost's DisplaySimulator on 127.0.0.1. Device config: power_on,
-- cycle_inputs (seconds between input changes, for the demo), poll (seconds).
local driver_helper = require "driver_helper"
local log = require "log"

local INPUTS = { "hdmi1", "hdmi2", "dp" }

local function command(device, line, opts)
  local answer, err = device:request(line .. "\r\n", opts or { timeout = 1, retries = 1 })
  if not answer then
    device.log.warn(line, "failed:", err)
    return nil, err
  end
  if string.sub(answer, 1, 6) == "error:" then
    device.log.warn(line, "refused:", answer)
    return nil, answer
  end
  return answer
end

-- "power=on", "input=dp", "volume=40", "temperature=41" -> status
local function update(device, line)
  local key, value = string.match(line, "^(%l+)=(.*)$")
  if key == "power" then
    device.status.power = value == "on"
  elseif key == "input" then
    device.status.input = value
  elseif key == "volume" or key == "temperature" then
    device.status[key] = tonumber(value)
  else
    device.log.debug("unexpected line", line)
  end
end

local function run(device, line)
  local answer = command(device, line)
  if answer then update(device, answer) end
  return answer
end

local function poll(device)
  if not device.status.connected then return end
  run(device, "power?")
  run(device, "input?")
  run(device, "volume?")
  device.log.info(string.format("power %s, input %s, volume %s",
    device.status.power and "on" or "off", tostring(device.status.input), tostring(device.status.volume)))
end

local function next_input(current)
  for i, name in ipairs(INPUTS) do
    if name == current then return INPUTS[i % #INPUTS + 1] end
  end
  return INPUTS[1]
end

local driver = driver_helper.init_tcp {
  name = "demo-display",
  framing = { delimiter = "\r\n" },
  lifecycle = {
    init = function(driver, device)
      driver:call_on_schedule(device.config.poll or 5, function() poll(device) end, "poll " .. device.id)
      local cycle = device.config.cycle_inputs
      if cycle then
        driver:call_on_schedule(cycle, function()
          if not device.status.connected then return end
          local input = next_input(device.status.input)
          device.log.info("switching input to", input)
          run(device, "input " .. input)
        end, "cycle " .. device.id)
      end
    end,
    connected = function(driver, device)
      device.log.info("display connected")
      if device.config.power_on then run(device, "power on") end
      poll(device)
    end,
    disconnected = function(driver, device, reason)
      device.log.warn("display disconnected:", reason)
    end,
  },
  on_receive = function(driver, device, frame)
    device.log.info("display says", frame)
    update(device, frame)
  end,
  functions = {
    power = {
      params = { state = { "Bool" } },
      handler = function(driver, device, args)
        run(device, args.state and "power on" or "power off")
        return device.status.power
      end,
    },
    switch_input = {
      params = { input = { "String" } },
      handler = function(driver, device, args)
        return run(device, "input " .. string.lower(args.input)) ~= nil
      end,
    },
    set_volume = {
      params = { level = { "Int32" } },
      handler = function(driver, device, args)
        local answer = command(device, "volume " .. args.level, { timeout = 1, name = "volume" })
        if answer then update(device, answer) end
        return device.status.volume
      end,
    },
  },
  implements = { "Powerable" },
}

return driver
