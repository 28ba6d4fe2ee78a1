-- luassert: busted's assertion library (assert.is_not.same(...), spies,
-- stubs, mocks, matchers) for hubhost's sandboxed runtimes. Returns the
-- assert object; the pieces live in luassert/*.lua.
local assert = require "luassert.assert"
local util = require "luassert.util"
util.mark_internal(function() end)

assert._VERSION = "luassert 1.9 (hubhost)"

require "luassert.languages.en"
require "luassert.modifiers"
require "luassert.assertions"
require "luassert.array"
require "luassert.matchers"
require "luassert.formatters"
require "luassert.spy"
require "luassert.stub"

return assert
