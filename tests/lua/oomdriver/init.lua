-- A driver that can run itself out of memory on request (issue 12: after an out-of-memory
-- abort the runtime must serve the next event normally).
local driver_helper = require "driver_helper"
return driver_helper.init {
  name = "oom",
  functions = {
    big = { params = { n = { "Int32" } }, handler = function(driver, device, args)
      local t = {}
      for i = 1, args.n do t[i] = string.rep("x", 1000) .. i end
      return #t
    end },
    echo = { params = { v = { "JSON" } }, handler = function(driver, device, args) return args.v end },
  },
}
