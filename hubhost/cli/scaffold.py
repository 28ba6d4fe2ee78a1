"""`hubhost new NAME`: a driver folder that runs and whose spec passes."""

from __future__ import annotations

import re
from pathlib import Path

INIT = '''-- {name}: a hubhost driver. See docs/driver-guide.md for the API.
local driver_helper = require "driver_helper"

local driver = driver_helper.init {
  name = "{name}",
  lifecycle = {
    init = function(driver, device)
      device.log.info("started")
      -- persistent_store survives restarts and reboots; status is published to the hub
      device.status.pings = device.persistent_store.pings or 0
    end,
  },
  functions = {
    ping = {
      params = {},
      handler = function(driver, device, args)
        local store = device.persistent_store
        store.pings = (store.pings or 0) + 1
        device.status.pings = store.pings
        return "pong"
      end,
    },
  },
}

return driver
'''

SPEC = '''-- Specs for {name}: run them with `hubhost test` in the driver's folder.
local test = require "hubhost.test"

describe("{name}", function()
  local h
  before_each(function()
    -- ".." is the driver folder, seen from this spec/ folder
    h = test.load_driver("..", { devices = { { id = "dev1", config = {} } } })
  end)

  it("answers ping and counts it", function()
    assert.are.equal("pong", h:exec("dev1", "ping"))
    assert.are.equal(1, h:status("dev1", "pings"))
  end)

  it("keeps the count across a restart (the datastore is reloaded from disk)", function()
    h:exec("dev1", "ping")
    h:restart()
    assert.are.equal(1, h:status("dev1", "pings"))
  end)

  it("logs when a device starts", function()
    assert.is_true(h:logged("started"))
  end)
end)
'''


def new_driver(name: str, parent: Path) -> Path:
    if not re.match(r"^[a-z][a-z0-9_-]{0,63}$", name):
        raise ValueError(f"driver name {name!r}: use lower-case letters, digits, '-' and '_', starting with a letter")
    path = parent / name
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    (path / "spec").mkdir(parents=True)
    (path / "init.lua").write_text(INIT.replace("{name}", name))
    (path / "spec" / f"{name.replace('-', '_')}_spec.lua").write_text(SPEC.replace("{name}", name))
    return path
