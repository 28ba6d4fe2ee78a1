-- A driver with nothing but a datastore: tests run their Lua in its environment.
local driver_helper = require "driver_helper"
return driver_helper.init { name = "datastore-basic" }
