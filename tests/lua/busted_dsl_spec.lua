-- busted's spec DSL as hubhost runs it: a tour that doubles as a regression
-- test (it runs through the pytest plugin with the rest of the suite).
local busted = require "busted"

describe("the spec DSL", function()
  local calls = {}

  setup(function() calls[#calls + 1] = "setup" end)
  before_each(function() calls[#calls + 1] = "before_each" end)
  after_each(function() calls[#calls + 1] = "after_each" end)

  it("runs setup once, then before_each around each test", function()
    assert.are.same({ "setup", "before_each" }, calls)
  end)

  it("ran after_each after the previous test", function()
    assert.are.same({ "setup", "before_each", "after_each", "before_each" }, calls)
  end)

  context("nested blocks", function()
    local depth
    before_each(function() depth = "inner" end)

    it("run outer before_each first, then their own", function()
      assert.are.equal("inner", depth)
      assert.are.equal("before_each", calls[#calls])
    end)
  end)

  describe("finally", function()
    local closed = false
    it("registers cleanup for the running test", function()
      finally(function() closed = true end)
      assert.is_false(closed)
    end)
    it("ran it when that test ended", function()
      assert.is_true(closed)
    end)
  end)

  describe("globals", function()
    block_level = "visible to this block's tests"
    it("assigned in a block are seen by its tests", function()
      assert.are.equal("visible to this block's tests", block_level)
    end)
  end)

  it("assigned in a block do not leak to its siblings", function()
    assert.is_nil(block_level)
  end)

  insulate("an insulated block", function()
    local t = { f = function() return "real" end }
    stub(t, "f").returns("stubbed")
    _G.insulated_flag = true
    it("may stub and set globals", function()
      assert.are.equal("stubbed", t.f())
      assert.is_true(insulated_flag)
    end)
  end)

  it("leaves nothing behind an insulated block", function()
    assert.is_nil(insulated_flag)
  end)

  spec("spec and test are it", function() assert.truthy(true) end)
  test("with a tag #example", function() assert.falsy(nil) end)

  it("offers the DSL through require 'busted' as well", function()
    assert.are.equal("function", type(busted.describe))
  end)
end)
