-- Changes its store and saves in a loop, forever: the crash-safety test kills it at random
-- moments. Generation i of the store is a pure function of i (see kit.generation).
local driver_helper = require "driver_helper"
local log = require "log"

local driver = driver_helper.init { name = "crashloop" }
local ds = driver.datastore
log.info("loaded", ds.n or 0)

driver:call_with_delay(0.001, function()
  local i = ds.n or 0
  while true do
    i = i + 1
    ds.n = i
    ds.payload = string.rep(string.char(97 + i % 26), 1000 + (i * 7919) % 30000)
    ds.list = { i, i * 2, { half = i / 2 } }
    ds.flag = i % 2 == 0
    if i % 3 == 0 then ds.extra = { tag = "x" .. i } else ds.extra = nil end
    local ok, err = ds:save()      -- yields until the generation is on disk
    if not ok then log.error("save failed", err) end
    log.info("saved", i)
  end
end, "loop")

return driver
