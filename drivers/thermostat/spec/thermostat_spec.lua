-- The demo thermostat driver: a simulated room per device, stepped every 2 s on the
-- kit's virtual clock. Runs with `hubhost test drivers/thermostat`.
local test = require "hubhost.test"

local LIVING = { id = "living-room", label = "Living room", config = { setpoint = 21, start = 18 } }
local BEDROOM = { id = "bedroom", label = "Bedroom", config = { setpoint = 18, start = 19 } }

local function count(h, needle)
  local n = 0
  for _, line in ipairs(h:logs()) do
    if line.text:find(needle, 1, true) then n = n + 1 end
  end
  return n
end

describe("demo thermostat", function()
  describe("starting", function()
    it("greets new devices once (added) and starts each one (init)", function()
      local h = test.load_driver("..", { devices = { LIVING, BEDROOM } })
      assert.are.equal(1, count(h, "new thermostat living-room"))
      assert.are.equal(1, count(h, "new thermostat bedroom"))
      assert.is_true(h:logged("info [thermostat/living-room] thermostat ready, setpoint 21"))
      assert.is_true(h:logged("info [thermostat/bedroom] thermostat ready, setpoint 18"))
    end)

    it("uses setpoint 21 and 18 °C when the config says nothing", function()
      local h = test.load_driver("..", { devices = { { id = "t" } } })
      assert.is_true(h:logged("thermostat ready, setpoint 21"))
      h:advance_time(2)
      assert.are.same({ temperature = 17.8, heating = true }, h:status("t"))
    end)

    it("publishes nothing before the first step, then every 2 s", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      assert.are.same({}, h:status("living-room"))
      assert.are.equal(1, h:timers())
      h:advance_time(1.9)
      assert.are.same({}, h:status("living-room"))
      h:advance_time(0.1)
      assert.are.same({ temperature = 17.8, heating = true }, h:status("living-room"))
      h:advance_time(2)
      assert.are.equal(18.2, h:status("living-room", "temperature"))
    end)

    it("implements Thermostat and offers set_setpoint", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      local iface = h:interface()
      assert.are.same({ "Thermostat" }, iface.implements)
      assert.are.same({ celsius = { "Float64" } }, iface.functions.set_setpoint)
    end)
  end)

  describe("regulation", function()
    it("switches the heater on below setpoint - 0.5 and off above setpoint + 0.5", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      h:advance_time(2)
      assert.is_true(h:logged("17.8 °C < 21.0 °C: heater on"))
      h:advance_time(18)                      -- 17.8 + 9 * 0.4 = 21.4: still heating
      assert.are.same({ temperature = 21.4, heating = true }, h:status("living-room"))
      h:advance_time(2)                       -- 21.8 > 21.5: off
      assert.are.same({ temperature = 21.8, heating = false }, h:status("living-room"))
      assert.is_true(h:logged("21.8 °C > 21.0 °C: heater off"))
      h:advance_time(2)
      assert.are.equal(21.6, h:status("living-room", "temperature"))
    end)

    it("holds the room within a degree of the setpoint for an hour", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      h:advance_time(60)                      -- warm-up
      local low, high = math.huge, -math.huge
      for _ = 1, 1800 do
        h:advance_time(2)
        local t = h:status("living-room", "temperature")
        low, high = math.min(low, t), math.max(high, t)
      end
      assert.is_true(low >= 20.0, "coldest " .. low)
      assert.is_true(high <= 22.0, "warmest " .. high)
      assert.are.near(3660, h:now(), 1e-6)
    end)

    it("runs each room on its own", function()
      local h = test.load_driver("..", { devices = { LIVING, BEDROOM } })
      h:advance_time(2)
      assert.are.same({ temperature = 17.8, heating = true }, h:status("living-room"))
      assert.are.same({ temperature = 18.8, heating = false }, h:status("bedroom"))
    end)
  end)

  describe("set_setpoint", function()
    it("returns the new setpoint and regulates towards it", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      assert.are.equal(17.5, h:exec("living-room", "set_setpoint", { celsius = 17.5 }))
      h:advance_time(2)                       -- 17.8 is not below 17.0: no heating
      assert.are.same({ temperature = 17.8, heating = false }, h:status("living-room"))
      assert.is_false(h:logged("heater on"))
    end)

    it("accepts whole numbers and positional arguments", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      assert.are.equal(25, h:exec("living-room", "set_setpoint", { 25 }))
    end)

    it("rejects what is not a number, and unknown devices", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      assert.has_error(function() h:exec("living-room", "set_setpoint", { celsius = "warm" }) end,
        "bad_args: set_setpoint: argument 'celsius' must be Float64, got string \"warm\"")
      assert.has_error(function() h:exec("kitchen", "set_setpoint", { celsius = 20 }) end,
        "unknown_device: no device 'kitchen' on this hub")
    end)

    it("affects only its own room", function()
      local h = test.load_driver("..", { devices = { LIVING, BEDROOM } })
      h:exec("bedroom", "set_setpoint", { celsius = 25 })
      h:advance_time(2)
      assert.is_true(h:status("bedroom", "heating"))
      assert.is_true(h:status("living-room", "heating"))
      h:exec("living-room", "set_setpoint", { celsius = 10 })
      h:advance_time(2)
      assert.is_true(h:status("bedroom", "heating"))
    end)
  end)

  describe("restarts", function()
    it("runs init again but not added, and the simulation starts over", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      h:advance_time(20)
      h:restart()
      assert.are.equal(1, count(h, "new thermostat living-room"))
      assert.are.equal(2, count(h, "thermostat ready"))
      assert.are.equal(1, count(h, "thermostat driver stopping"))   -- a clean restart
      assert.are.same({}, h:status("living-room"))                  -- memory is gone
      h:advance_time(2)
      assert.are.equal(17.8, h:status("living-room", "temperature"))
    end)

    it("skips the shutdown handler when the driver crashes", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      h:restart({ crash = true })
      assert.are.equal(0, count(h, "thermostat driver stopping"))
      assert.are.equal(2, count(h, "thermostat ready"))
    end)

    it("drops a device that left the config (removed) and greets a new one", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      h:restart({ devices = { BEDROOM } })
      assert.are.equal(1, count(h, "new thermostat bedroom"))
      assert.has_error(function() h:exec("living-room", "set_setpoint", { celsius = 20 }) end,
        "unknown_device: no device 'living-room' on this hub")
      h:advance_time(2)
      assert.are.same({}, h:status("living-room"))
      assert.are.equal(18.8, h:status("bedroom", "temperature"))
      assert.are.same({}, h:errors())
    end)

    it("says goodbye when the hub stops", function()
      local h = test.load_driver("..", { devices = { LIVING } })
      h:stop()
      assert.is_true(h:logged("info [thermostat] thermostat driver stopping"))
      assert.has_error(function() h:advance_time(1) end)
    end)
  end)
end)
