-- Issue 12: an out-of-memory abort leaves the runtime usable for the next event (no
-- garbage results, no timeout, no lupa deadlock), whatever the limit and the size.
local test = require "hubhost.test"

describe("after an out-of-memory abort", function()
  for _, mem in ipairs({ "16MiB", "64MiB" }) do
    it("the next call is served normally (max_memory " .. mem .. ")", function()
      local h = test.load_driver("..", { devices = { { id = "d1" } }, config = { max_memory = mem } })
      local failed = 0
      for _, n in ipairs({ 100000, 15000, 16000, 14000, 60000, 100000 }) do
        local ok, err = pcall(h.exec, h, "d1", "big", { n = n })
        if not ok then
          failed = failed + 1
          assert.matches("driver_error: big on 'd1': not enough memory", err, 1, true)
        end
        assert.are.equal(1, h:exec("d1", "echo", { v = 1 }))
        assert.are.same({ a = "x" }, h:exec("d1", "echo", { v = { a = "x" } }))
      end
      assert.is_true(failed >= 2)
    end)
  end
end)
