-- A projector on a serial line. Commands and answers are lines ending in CR:
--   PWR ON | PWR OFF | PWR?           -> PWR=ON | PWR=OFF
--   SOURCE HDMI1|HDMI2|VGA | SOURCE?  -> SOURCE=HDMI1   (ERR while the lamp is off)
--   VOL 0..100 | VOL?                 -> VOL=40
-- The demo hub runs hubhost's ProjectorSimulator behind a pseudo-terminal, which answers
-- the same way. Device config: power_on (switch on when connected), cycle_inputs
-- (seconds between input changes, for the demo), poll (seconds between status polls).
local driver_helper = require "driver_helper"
local log = require "log"

local INPUTS = { "HDMI1", "HDMI2", "VGA" }

-- Send one command line and wait for its answer: the answer, or nil and a reason.
local function command(device, line, opts)
  local answer, err = device:request(line .. "\r", opts or { timeout = 1, retries = 1 })
  if not answer then
    device.log.warn(line, "failed:", err)
    return nil, err
  end
  if answer == "ERR" then
    device.log.warn(line, "refused by the projector (ERR)")
    return nil, "refused"
  end
  return answer
end

-- Keep status in step with an answer such as "PWR=ON", "SOURCE=HDMI2" or "VOL=40".
local function update(device, answer)
  local key, value = string.match(answer, "^(%u+)=(.*)$")
  if key == "PWR" then
    device.status.power = value == "ON"
  elseif key == "SOURCE" then
    device.status.input = value
  elseif key == "VOL" then
    device.status.volume = tonumber(value)
  else
    device.log.debug("unexpected answer", answer)
  end
end

local function run(device, line)
  local answer = command(device, line)
  if answer then update(device, answer) end
  return answer
end

local function poll(device)
  if not device.status.connected then return end
  run(device, "PWR?")
  if device.status.power then
    run(device, "SOURCE?")
    run(device, "VOL?")
  end
  device.log.info(string.format("power %s, input %s, volume %s",
    device.status.power and "on" or "off", tostring(device.status.input), tostring(device.status.volume)))
end

local function next_input(current)
  for i, name in ipairs(INPUTS) do
    if name == current then return INPUTS[i % #INPUTS + 1] end
  end
  return INPUTS[1]
end

local driver = driver_helper.init_serial {
  name = "demo-projector",
  framing = { delimiter = "\r" },
  lifecycle = {
    init = function(driver, device)
      local every = device.config.poll or 5
      driver:call_on_schedule(every, function() poll(device) end, "poll " .. device.id)
      local cycle = device.config.cycle_inputs
      if cycle then
        driver:call_on_schedule(cycle, function()
          if not device.status.connected or not device.status.power then return end
          local input = next_input(device.status.input)
          device.log.info("switching input to", input)
          run(device, "SOURCE " .. input)
        end, "cycle " .. device.id)
      end
    end,
    connected = function(driver, device)
      device.log.info("projector connected")
      if device.config.power_on then run(device, "PWR ON") end
      poll(device)
    end,
    disconnected = function(driver, device, reason)
      device.log.warn("projector disconnected:", reason)
    end,
  },
  -- anything the projector says that is not an answer to a request
  on_receive = function(driver, device, frame)
    device.log.info("projector says", frame)
    update(device, frame)
  end,
  functions = {
    power = {
      params = { state = { "Bool" } },
      handler = function(driver, device, args)
        run(device, args.state and "PWR ON" or "PWR OFF")
        return device.status.power
      end,
    },
    switch_input = {
      params = { input = { "String" } },
      handler = function(driver, device, args)
        return run(device, "SOURCE " .. string.upper(args.input)) ~= nil
      end,
    },
    set_volume = {
      params = { level = { "Int32" } },
      handler = function(driver, device, args)
        -- named: a slider moved quickly sends only its latest value
        local answer = command(device, "VOL " .. args.level, { timeout = 1, name = "volume" })
        if answer then update(device, answer) end
        return device.status.volume
      end,
    },
  },
  implements = { "Powerable" },
}

return driver
