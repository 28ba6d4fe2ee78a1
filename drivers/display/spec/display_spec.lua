-- The demo display driver (TCP, CR LF-terminated lines), against a mock display that
-- answers like hubhost's DisplaySimulator. Runs with `hubhost test drivers/display`.
local test = require "hubhost.test"

local function display()
  local d = { power = false, input = "hdmi1", volume = 40, heard = {}, mute = false }
  local inputs = { hdmi1 = true, hdmi2 = true, dp = true }
  function d.answer(line)
    local arg = line:match("^power (%a+)$")
    if arg == "on" or arg == "off" then d.power = arg == "on" end
    if arg == "on" or arg == "off" or line == "power?" then
      return "power=" .. (d.power and "on" or "off")
    end
    arg = line:match("^input (%w+)$")
    if arg and inputs[arg] then d.input = arg end
    if (arg and inputs[arg]) or line == "input?" then return "input=" .. d.input end
    arg = line:match("^volume (%d+)$")
    if arg then d.volume = tonumber(arg) end
    if arg or line == "volume?" then return "volume=" .. d.volume end
    return "error: unknown command"
  end
  function d.respond(sent)
    local replies = {}
    for line in sent:gmatch("(.-)\r\n") do
      d.heard[#d.heard + 1] = line
      if not d.mute then replies[#replies + 1] = d.answer(line) .. "\r\n" end
    end
    return replies
  end
  return d
end

local function start(config, d)
  local h = test.load_driver("..", {
    devices = { { id = "lobby", label = "Lobby display", config = config, connected = false } },
  })
  if d then h:respond("lobby", d.respond) end
  h:connect("lobby")
  return h
end

describe("demo display", function()
  describe("when it connects", function()
    it("switches on (power_on) and reads power, input and volume", function()
      local d = display()
      local h = start({ power_on = true }, d)
      assert.are.same({ "power on", "power?", "input?", "volume?" }, d.heard)
      assert.are.same({ connected = true, power = true, input = "hdmi1", volume = 40 }, h:status("lobby"))
      assert.is_true(h:logged("display connected"))
      assert.is_true(h:logged("power on, input hdmi1, volume 40"))
    end)

    it("reads input and volume even while the display is off", function()
      local d = display()
      local h = start({}, d)
      assert.are.same({ "power?", "input?", "volume?" }, d.heard)
      assert.are.same({ connected = true, power = false, input = "hdmi1", volume = 40 }, h:status("lobby"))
    end)

    it("sends lines ending in CR LF", function()
      local h = start({})
      assert.are.equal("power?\r\n", h:sent("lobby"))
    end)
  end)

  describe("polling", function()
    it("reads the display's state every `poll` seconds (5 by default)", function()
      local d = display()
      local h = start({}, d)
      d.heard = {}
      d.volume = 12
      h:advance_time(4.99)
      assert.are.same({}, d.heard)
      h:advance_time(0.01)
      assert.are.same({ "power?", "input?", "volume?" }, d.heard)
      assert.are.equal(12, h:status("lobby", "volume"))
    end)

    it("honours a configured interval", function()
      local d = display()
      local h = start({ poll = 2 }, d)
      d.heard = {}
      h:advance_time(6)
      assert.are.equal(9, #d.heard)
    end)

    it("does nothing while disconnected", function()
      local d = display()
      local h = start({ poll = 2 }, d)
      h:disconnect("lobby", "connection reset")
      assert.is_true(h:logged("display disconnected: connection reset"))
      assert.is_false(h:status("lobby", "connected"))
      d.heard = {}
      h:advance_time(10)
      assert.are.same({}, d.heard)
    end)
  end)

  describe("input cycling (cycle_inputs)", function()
    it("steps hdmi1 -> hdmi2 -> dp -> hdmi1, even while the display is off", function()
      local d = display()
      local h = start({ poll = 1000, cycle_inputs = 7 }, d)
      local seen = {}
      for _ = 1, 3 do
        h:advance_time(7)
        seen[#seen + 1] = h:status("lobby", "input")
      end
      assert.are.same({ "hdmi2", "dp", "hdmi1" }, seen)
      assert.is_true(h:logged("switching input to dp"))
    end)

    it("waits for the connection", function()
      local d = display()
      local h = start({ poll = 1000, cycle_inputs = 7 }, d)
      h:disconnect("lobby")
      d.heard = {}
      h:advance_time(21)
      assert.are.same({}, d.heard)
    end)
  end)

  describe("functions", function()
    it("power returns the new state", function()
      local d = display()
      local h = start({}, d)
      assert.is_true(h:exec("lobby", "power", { state = true }))
      assert.is_true(d.power)
      assert.is_false(h:exec("lobby", "power", { state = false }))
      assert.is_false(h:status("lobby", "power"))
    end)

    it("switch_input lower-cases the input", function()
      local d = display()
      local h = start({}, d)
      assert.is_true(h:exec("lobby", "switch_input", { input = "DP" }))
      assert.are.equal("dp", d.input)
      assert.are.equal("dp", h:status("lobby", "input"))
    end)

    it("switch_input returns false for an input the display refuses", function()
      local d = display()
      local h = start({}, d)
      assert.is_false(h:exec("lobby", "switch_input", { input = "vga" }))
      assert.is_true(h:logged("input vga refused: error: unknown command"))
      assert.are.equal("hdmi1", h:status("lobby", "input"))
    end)

    it("set_volume returns the level the display reports", function()
      local d = display()
      local h = start({}, d)
      assert.are.equal(65, h:exec("lobby", "set_volume", { level = 65 }))
      assert.are.equal(65, d.volume)
    end)

    it("rejects arguments of the wrong type before the driver sees them", function()
      local d = display()
      local h = start({}, d)
      d.heard = {}
      assert.has_error(function() h:exec("lobby", "set_volume", { level = 1.5 }) end,
        "bad_args: set_volume: argument 'level' must be Int32 (-2147483648..2147483647), got number 1.5")
      assert.has_error(function() h:exec("lobby", "power", { state = true, extra = 1 }) end,
        "bad_args: power has no parameter 'extra' (parameters: state)")
      assert.are.same({}, d.heard)
    end)

    it("returns the last known volume when the display does not answer", function()
      local d = display()
      local h = start({ poll = 1000 }, d)
      d.mute = true
      d.heard = {}
      assert.are.equal(40, h:exec("lobby", "set_volume", { level = 5 }))
      assert.are.same({ "volume 5" }, d.heard)          -- a named request: no retries
      assert.is_true(h:logged("volume 5 failed: timeout"))
    end)

    it("implements Powerable", function()
      local h = start({})
      assert.are.same({ "Powerable" }, h:interface().implements)
    end)
  end)

  describe("on_receive", function()
    it("keeps what the display says on its own, temperature included", function()
      local h = start({ poll = 1000 }, display())   -- idle: no request in flight
      h:feed("lobby", "temperature=41\r\n")
      assert.are.equal(41, h:status("lobby", "temperature"))
      assert.is_true(h:logged("display says temperature=41"))
    end)

    it("keeps CR LF lines that arrive split between reads", function()
      local h = start({ poll = 1000 }, display())
      h:feed("lobby", "temperature=3")
      h:feed("lobby", "9\r")
      assert.is_nil(h:status("lobby", "temperature"))
      h:feed("lobby", "\ninput=dp\r\n")
      assert.are.equal(39, h:status("lobby", "temperature"))
      assert.are.equal("dp", h:status("lobby", "input"))
    end)
  end)
end)
