-- A chain of snapshots of luassert's mutable state (formatters, parameters,
-- spies and stubs), so a test can undo everything it changed with revert().
local state = {}

local snapshot_mt = {}
snapshot_mt.__index = snapshot_mt
snapshot_mt.__call = function(self) return self:revert() end

local NIL = {} -- stands for a parameter explicitly set to nil

local current -- the newest snapshot

--- Reverts the given snapshot (and every newer one); without argument the
--- newest snapshot is reverted, unless it is the root one.
function state.revert(snap)
  if snap == nil then
    snap = current
    if snap.previous == nil then return end
  end
  if getmetatable(snap) ~= snapshot_mt or snap.reverted then
    error("Value provided is not a valid snapshot", 2)
  end
  if snap.next then snap.next:revert() end
  snap.formatters = {}
  snap.parameters = {}
  while snap.spies[1] do
    local s = table.remove(snap.spies, 1)
    s:revert()
  end
  snap.reverted = true
  current = snap.previous
  if current then current.next = nil end
end
snapshot_mt.revert = state.revert

--- Starts a new snapshot; changes made from now on belong to it.
function state.snapshot()
  local snap = setmetatable({
    formatters = {},
    parameters = {},
    spies = {},
    previous = current,
  }, snapshot_mt)
  if current then current.next = snap end
  current = snap
  return snap
end

function state.add_formatter(fn)
  table.insert(current.formatters, 1, fn)
end

function state.remove_formatter(fn, snap)
  snap = snap or current
  for i, f in ipairs(snap.formatters) do
    if f == fn then
      table.remove(snap.formatters, i)
      break
    end
  end
  if snap.previous then state.remove_formatter(fn, snap.previous) end
end

--- Formats val with the newest formatter that accepts it; nil when none does.
function state.format_argument(val, snap, fmtargs)
  snap = snap or current
  while snap do
    for _, fmt in ipairs(snap.formatters) do
      local s = fmt(val, fmtargs)
      if s ~= nil then return s end
    end
    snap = snap.previous
  end
  return nil
end

function state.set_parameter(name, value)
  if value == nil then value = NIL end
  current.parameters[name] = value
end

function state.get_parameter(name)
  local snap = current
  while snap do
    local v = snap.parameters[name]
    if v ~= nil then
      if v == NIL then return nil end
      return v
    end
    snap = snap.previous
  end
  return nil
end

function state.add_spy(s)
  table.insert(current.spies, 1, s)
end

state.snapshot() -- the root snapshot: never reverted
require("luassert.util").mark_internal(state.snapshot)

return state
