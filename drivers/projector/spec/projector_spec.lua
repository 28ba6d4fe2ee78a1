-- The demo projector driver (serial, CR-terminated lines), against a mock projector that
-- answers like hubhost's ProjectorSimulator. Runs with `hubhost test drivers/projector`.
local test = require "hubhost.test"

-- A projector: PWR/SOURCE/VOL commands, ERR while the lamp is off or for nonsense.
local function projector()
  local p = { power = false, source = "HDMI1", volume = 40, heard = {}, mute = false }
  local inputs = { HDMI1 = true, HDMI2 = true, VGA = true }
  function p.answer(line)
    if line == "PWR ON" then p.power = true end
    if line == "PWR OFF" then p.power = false end
    if line == "PWR ON" or line == "PWR OFF" or line == "PWR?" then
      return p.power and "PWR=ON" or "PWR=OFF"
    end
    local source = line:match("^SOURCE (%w+)$")
    if line == "SOURCE?" or source then
      if not p.power then return "ERR" end
      if source then
        if not inputs[source] then return "ERR" end
        p.source = source
      end
      return "SOURCE=" .. p.source
    end
    local vol = line:match("^VOL (%d+)$")
    if vol then p.volume = tonumber(vol) end
    if vol or line == "VOL?" then return "VOL=" .. p.volume end
    return "ERR"
  end
  -- the responder the kit calls with every write of the driver
  function p.respond(sent)
    local replies = {}
    for line in sent:gmatch("([^\r]*)\r") do
      p.heard[#p.heard + 1] = line
      if not p.mute then replies[#replies + 1] = p.answer(line) .. "\r" end
    end
    return replies
  end
  return p
end

-- The driver with one projector, connected after the responder is in place.
local function start(config, p)
  local h = test.load_driver("..", {
    devices = { { id = "proj", label = "Projector", config = config, connected = false } },
  })
  if p then h:respond("proj", p.respond) end
  h:connect("proj")
  return h
end

describe("demo projector", function()
  describe("when it connects", function()
    it("switches the lamp on (power_on) and reads power, input and volume", function()
      local p = projector()
      local h = start({ power_on = true, poll = 5 }, p)
      assert.are.same({ "PWR ON", "PWR?", "SOURCE?", "VOL?" }, p.heard)
      assert.are.same({ connected = true, power = true, input = "HDMI1", volume = 40 }, h:status("proj"))
      assert.is_true(h:logged("projector connected"))
    end)

    it("only asks for power while the lamp is off and power_on is not set", function()
      local p = projector()
      local h = start({ poll = 5 }, p)
      assert.are.same({ "PWR?" }, p.heard)
      assert.is_false(h:status("proj", "power"))
      assert.is_nil(h:status("proj", "input"))
    end)

    it("reports connected = false until the transport connects", function()
      local h = test.load_driver("..", { devices = { { id = "proj", connected = false } } })
      assert.is_false(h:status("proj", "connected"))
      assert.are.equal("", h:sent("proj"))
    end)
  end)

  describe("polling", function()
    it("reads the projector's state every `poll` seconds", function()
      local p = projector()
      local h = start({ power_on = true, poll = 5 }, p)
      p.volume, p.source = 55, "VGA"
      h:advance_time(4.9)
      assert.are.equal(40, h:status("proj", "volume"))
      h:advance_time(0.1)
      assert.are.equal(55, h:status("proj", "volume"))
      assert.are.equal("VGA", h:status("proj", "input"))
      assert.is_true(h:logged("power on, input VGA, volume 55"))
    end)

    it("polls every 5 s when the config gives no interval", function()
      local p = projector()
      local h = start({}, p)
      p.heard = {}
      h:advance_time(15)
      assert.are.same({ "PWR?", "PWR?", "PWR?" }, p.heard)
    end)

    it("stops polling while disconnected and resumes after reconnecting", function()
      local p = projector()
      local h = start({ poll = 5 }, p)
      assert.are.equal("PWR?\r", h:sent("proj"))
      h:disconnect("proj", "cable pulled")
      assert.is_false(h:status("proj", "connected"))
      assert.is_true(h:logged("projector disconnected: cable pulled"))
      p.heard = {}
      h:advance_time(20)
      assert.are.same({}, p.heard)
      assert.are.equal("", h:sent("proj"))
      h:connect("proj")
      assert.are.same({ "PWR?" }, p.heard)
      assert.is_true(h:status("proj", "connected"))
    end)
  end)

  describe("input cycling (cycle_inputs)", function()
    it("steps HDMI1 -> HDMI2 -> VGA -> HDMI1 while the lamp is on", function()
      local p = projector()
      local h = start({ power_on = true, poll = 1000, cycle_inputs = 10 }, p)
      local seen = {}
      for _ = 1, 3 do
        h:advance_time(10)
        seen[#seen + 1] = h:status("proj", "input")
      end
      assert.are.same({ "HDMI2", "VGA", "HDMI1" }, seen)
      assert.are.equal("HDMI1", p.source)
    end)

    it("leaves the input alone while the lamp is off", function()
      local p = projector()
      local h = start({ poll = 1000, cycle_inputs = 10 }, p)
      p.heard = {}
      h:advance_time(30)
      assert.are.same({}, p.heard)
    end)
  end)

  describe("functions", function()
    it("power switches the lamp and returns the new state", function()
      local p = projector()
      local h = start({ power_on = true }, p)
      assert.is_false(h:exec("proj", "power", { state = false }))
      assert.is_false(p.power)
      assert.is_false(h:status("proj", "power"))
      assert.is_true(h:exec("proj", "power", { true }))   -- positional arguments work too
      assert.is_true(p.power)
    end)

    it("switch_input upper-cases the input and reports success", function()
      local p = projector()
      local h = start({ power_on = true }, p)
      assert.is_true(h:exec("proj", "switch_input", { input = "hdmi2" }))
      assert.are.equal("HDMI2", p.source)
      assert.are.equal("HDMI2", h:status("proj", "input"))
    end)

    it("switch_input returns false when the projector refuses (ERR)", function()
      local p = projector()
      local h = start({}, p)
      assert.is_false(h:exec("proj", "switch_input", { input = "vga" }))
      assert.is_true(h:logged("SOURCE VGA refused by the projector (ERR)"))
      assert.is_nil(h:status("proj", "input"))
    end)

    it("set_volume sends the level and returns what the projector reports", function()
      local p = projector()
      local h = start({ power_on = true }, p)
      assert.are.equal(70, h:exec("proj", "set_volume", { level = 70 }))
      assert.are.equal(70, p.volume)
      assert.are.equal("VOL 70", p.heard[#p.heard])
    end)

    it("set_volume sends only the latest of quickly repeated levels (named requests)", function()
      local p = projector()
      local h = start({ power_on = true }, p)
      p.heard = {}
      h:respond("proj", p.respond, 0.2)   -- the projector takes 0.2 s to answer
      local calls = {}
      for _, level in ipairs({ 10, 20, 30 }) do
        calls[#calls + 1] = h:exec_async("proj", "set_volume", { level = level })
      end
      h:advance_time(1)
      assert.are.same({ "VOL 10", "VOL 30" }, p.heard)
      assert.are.equal(30, p.volume)
      for _, c in ipairs(calls) do assert.is_true(c:done()) end
      assert.are.equal(30, calls[3]:result())
    end)

    it("waits for the answer on virtual time (exec_async, then the device answers)", function()
      local h = start({})          -- no responder: the spec plays the projector
      assert.are.equal("PWR?\r", h:sent("proj"))
      h:feed("proj", "PWR=OFF\r")
      local call = h:exec_async("proj", "power", { state = true })
      assert.is_false(call:done())
      assert.has_error(function() call:result() end)
      assert.are.equal("PWR ON\r", h:sent("proj"))
      h:feed("proj", "PWR=ON\r")
      assert.is_true(call:done())
      assert.is_true(call:result())
    end)

    it("validates arguments like the API", function()
      local h = start({}, projector())
      assert.has_error(function() h:exec("proj", "power", { state = "on" }) end,
        "bad_args: power: argument 'state' must be Bool, got string \"on\"")
      assert.has_error(function() h:exec("proj", "set_volume", {}) end,
        "bad_args: set_volume: missing argument 'level' (Int32)")
      assert.has_error(function() h:exec("proj", "eject", {}) end,
        "unknown_function: device 'proj' has no function 'eject' (functions: power, set_volume, switch_input)")
      assert.has_error(function() h:exec("nope", "power", { state = true }) end,
        "unknown_device: no device 'nope' on this hub")
    end)

    it("publishes its interface", function()
      local h = start({}, projector())
      local iface = h:interface()
      assert.are.same({ "Powerable" }, iface.implements)
      assert.are.same({ state = { "Bool" } }, iface.functions.power)
      assert.are.same({ level = { "Int32" } }, iface.functions.set_volume)
      assert.are.same({ input = { "String" } }, iface.functions.switch_input)
    end)
  end)

  describe("a silent projector", function()
    it("retries a request once, then logs the timeout", function()
      local p = projector()
      p.mute = true
      local h = start({ poll = 100 }, p)
      assert.are.same({ "PWR?" }, p.heard)
      h:advance_time(1)
      assert.are.same({ "PWR?", "PWR?" }, p.heard)       -- timeout 1 s, one retry
      assert.is_false(h:logged("failed: timeout"))
      h:advance_time(1)
      assert.is_true(h:logged("PWR? failed: timeout"))
      assert.is_nil(h:status("proj", "power"))
    end)

    it("power still returns (nil) once its request has timed out", function()
      local p = projector()
      p.mute = true
      local h = start({ poll = 100 }, p)
      h:advance_time(2)
      local t0 = h:now()
      assert.is_nil(h:exec("proj", "power", { state = true }))
      assert.are.near(2, h:now() - t0, 1e-9)              -- exec waited on virtual time
    end)
  end)

  describe("on_receive", function()
    it("keeps status in step with what the projector says on its own", function()
      local h = start({}, projector())
      h:feed("proj", "PWR=ON\rSOURCE=HDMI2\rVOL=12\r")
      assert.are.same({ connected = true, power = true, input = "HDMI2", volume = 12 }, h:status("proj"))
      assert.is_true(h:logged("projector says SOURCE=HDMI2"))
    end)

    it("frames lines that arrive in pieces", function()
      local h = start({}, projector())
      h:feed("proj", "VO")
      assert.is_nil(h:status("proj", "volume"))
      h:feed("proj", "L=7")
      h:feed("proj", "\r")
      assert.are.equal(7, h:status("proj", "volume"))
    end)

    it("ignores lines it does not understand", function()
      local h = start({}, projector())
      h:feed("proj", "HELLO\r")
      assert.are.same({}, h:errors())
      assert.are.same({ connected = true, power = false }, h:status("proj"))
    end)
  end)

  describe("requests and disconnects", function()
    it("a request in flight fails with 'disconnected' when the line drops", function()
      local h = start({ poll = 100 })                    -- nobody answers PWR?
      h:disconnect("proj")
      assert.is_true(h:logged("PWR? failed: disconnected"))
    end)
  end)

  describe("after a restart", function()
    it("reads the state from the projector again (nothing is persisted)", function()
      local p = projector()
      local h = start({ power_on = true }, p)
      h:exec("proj", "switch_input", { input = "VGA" })
      h:restart()
      assert.are.same({}, h:datastore())
      -- the device is still there (and still answers); the link connects again
      assert.are.same({ connected = true, power = true, input = "VGA", volume = 40 }, h:status("proj"))
    end)
  end)
end)
