-- A driver that exercises every part of the test kit (tests/lua/kitdriver/spec).
local driver_helper = require "driver_helper"
local log = require "log"

local events = {}          -- what happened, in order, with the virtual time it happened at
local clock = 0
local function note(what) events[#events + 1] = what end

local driver = driver_helper.init_serial {
  name = "kitdriver",
  framing = { delimiter = "\n" },
  lifecycle = {
    added = function(driver, device) note("added " .. device.id) end,
    init = function(driver, device)
      note("init " .. device.id)
      local store = device.persistent_store
      store.starts = (store.starts or 0) + 1
      if device.config.subscribe then
        driver:system("home"):get("Light", 1):subscribe("power", function(_, value)
          device.status.light = value
        end)
      end
    end,
    removed = function(driver, device) note("removed " .. device.id) end,
    connected = function(driver, device) note("connected " .. device.id) end,
    disconnected = function(driver, device, reason) note("disconnected " .. device.id .. " " .. tostring(reason)) end,
    shutdown = function(driver)
      note("shutdown")
      driver.datastore.shutdowns = (driver.datastore.shutdowns or 0) + 1
    end,
  },
  on_receive = function(driver, device, frame)
    note("frame " .. frame)
    if frame == "boom" then error("cannot handle boom") end
    if frame == "answer" then device:answer("by hand") end
    device.status.last = frame
  end,
  functions = {
    events = { params = {}, handler = function() return events end },
    clear = { params = {}, handler = function() events = {} return true end },
    -- timers: delay/schedule/sleep/cancel, all noted with their names
    delay = {
      params = { seconds = { "Float64" }, name = { "String" } },
      handler = function(driver, device, args)
        driver:call_with_delay(args.seconds, function() note(args.name) end, args.name)
        return true
      end,
    },
    every = {
      params = { seconds = { "Float64" }, name = { "String" }, times = { "Int32", 0 } },
      handler = function(driver, device, args)
        local n = 0
        local t
        t = driver:call_on_schedule(args.seconds, function()
          n = n + 1
          note(args.name .. n)
          if args.times > 0 and n >= args.times then driver:cancel_timer(t) end
        end, args.name)
        return true
      end,
    },
    nap = {
      params = { seconds = { "Float64" }, name = { "String" } },
      handler = function(driver, device, args)
        driver:call_with_delay(0.001, function()
          note(args.name .. " sleeps")
          driver_helper.sleep(args.seconds)
          note(args.name .. " woke")
        end)
        return true
      end,
    },
    slow = {   -- waits inside the function itself: exec waits on virtual time
      params = { seconds = { "Float64" } },
      timeout = 30,
      handler = function(driver, device, args)
        driver_helper.sleep(args.seconds)
        return "slept " .. args.seconds
      end,
    },
    hang = { params = {}, handler = function() driver_helper.sleep(1000) end },
    fail = { params = {}, handler = function() error("kaboom") end },
    secret = { params = {}, security = "support", handler = function() return "s3cret" end },
    admin = { params = {}, security = "administrator", handler = function() return "root" end },
    echo = { params = { value = { "JSON" } }, handler = function(_, _, args) return args.value end },
    -- transport
    send = {
      params = { data = { "String" } },
      handler = function(driver, device, args) device:send(args.data) return true end,
    },
    ask = {
      params = { question = { "String" }, match = { "String", "" } },
      handler = function(driver, device, args)
        local opts = { timeout = 1 }
        if args.match ~= "" then opts.match = args.match end
        local answer, err = device:request(args.question .. "\n", opts)
        return { answer = answer, err = err }
      end,
    },
    -- datastore
    remember = {
      params = { key = { "String" }, value = { "JSON" }, save = { "Bool", false } },
      handler = function(driver, device, args)
        driver.datastore[args.key] = args.value
        if args.save then assert(driver.datastore:save()) end
        return driver.datastore:is_dirty()
      end,
    },
    recall = {
      params = { key = { "String" } },
      handler = function(driver, device, args) return driver.datastore[args.key] end,
    },
    -- logging
    chat = {
      params = {},
      handler = function(driver, device)
        print("printed", 1)
        log.trace("a trace")
        log.debug("a debug line")
        log.warn("a warning")
        device.log.error("a device error")
        return true
      end,
    },
    -- other drivers
    light = {
      params = { state = { "Bool" } },
      handler = function(driver, device, args)
        return driver:system("home"):get("Light", 1):call("power", { state = args.state })
      end,
    },
  },
}

return driver
