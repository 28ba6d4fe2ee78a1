-- A fleet test driver: one TCP connection per device (to a simulator that counts them),
-- a persistent_store that counts starts and calls, and a function that counts its calls.
local driver_helper = require "driver_helper"

local driver = driver_helper.init_tcp {
  name = "fleet-counter",
  framing = { delimiter = "\n" },
  lifecycle = {
    init = function(driver, device)
      local store = device.persistent_store
      store.starts = (store.starts or 0) + 1
      device.status.starts = store.starts
      device.status.calls = store.calls or 0
      device.status.hub = device.config.hub_marker
      driver.datastore:save()
    end,
  },
  on_receive = function(driver, device, frame)
    device.status.last = frame
  end,
  functions = {
    count = {
      -- `tag` names the call on the device's wire, so a test can see every call that ran
      params = { by = { "Int32", 1 }, tag = { "String", "" } },
      handler = function(driver, device, args)
        local store = device.persistent_store
        store.calls = (store.calls or 0) + args.by
        device.status.calls = store.calls
        device:send("call " .. args.tag .. "\n")
        driver.datastore:save()
        return { calls = store.calls, device = device.id, tag = args.tag }
      end,
    },
  },
}
return driver
