"""`hubhost new NAME`: a driver folder that runs and whose spec passes."""

from __future__ import annotations

import re
from pathlib import Path

INIT = '''local driver_helper = require "driver_helper"
local log = require "log"

local driver = driver_helper.init {
  name = "{name}",
  lifecycle = {
    init = function(driver, device)
      log.info("device", device.id, "started")
    end,
  },
  functions = {
    ping = {
      params = {},
      handler = function(driver, device, args)
        return "pong"
      end,
    },
  },
}

return driver
'''

SPEC = '''local test = require "hubhost.test"

describe("{name}", function()
  it("loads and answers ping", function()
    local d = test.load_driver("..", { devices = { { id = "dev1" } } })
    assert.are.equal("pong", d:exec("dev1", "ping", {}))
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
