-- A simulated thermostat: no hardware. Every few seconds the room temperature drifts
-- towards the setpoint; the heater switches with a little hysteresis.
local driver_helper = require "driver_helper"
local log = require "log"

local rooms = {}   -- device id -> simulated room

local function step(driver)
  for _, device in ipairs(driver:get_devices()) do
    local room = rooms[device.id]
    if room then
      local target = room.setpoint
      if room.heating then room.temp = room.temp + 0.4 else room.temp = room.temp - 0.2 end
      if room.temp < target - 0.5 and not room.heating then
        room.heating = true
        device.log.info(string.format("%.1f °C < %.1f °C: heater on", room.temp, target))
      elseif room.temp > target + 0.5 and room.heating then
        room.heating = false
        device.log.info(string.format("%.1f °C > %.1f °C: heater off", room.temp, target))
      end
      if device.status then
        device.status.temperature = math.floor(room.temp * 10 + 0.5) / 10
        device.status.heating = room.heating
      end
    end
  end
end

local driver = driver_helper.init {
  name = "thermostat",
  lifecycle = {
    added = function(driver, device)
      log.info("new thermostat", device.id)
    end,
    init = function(driver, device)
      local setpoint = device.config.setpoint or 21
      rooms[device.id] = { temp = device.config.start or 18, setpoint = setpoint, heating = false }
      device.log.info("thermostat ready, setpoint", setpoint)
    end,
    removed = function(driver, device)
      rooms[device.id] = nil
    end,
    shutdown = function(driver)
      log.info("thermostat driver stopping")
    end,
  },
  functions = {
    set_setpoint = {
      params = { celsius = { "Float64" } },
      handler = function(driver, device, args)
        rooms[device.id].setpoint = args.celsius
        return args.celsius
      end,
    },
  },
  implements = { "Thermostat" },
}

driver:call_on_schedule(2, step, "simulate")

return driver
