"""Checking and encoding status values that come from Lua (`device.status.x = v`).

Status values follow the datastore's rules (DESIGN section 4): nil deletes; booleans,
finite numbers, UTF-8 strings, and tables that are arrays (keys 1..n) or objects (string
keys) of such values. The JSON text is what is compared, stored and published.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lupa.luajit21 as lupa
import orjson

PREFIX = "Status values must be JSON encodable: "


class StatusValueError(ValueError):
    pass


def encode(value: Any, tostring: Callable[[Any], bytes]) -> str | None:
    """JSON text for a Lua value, None for nil; raises StatusValueError naming the problem."""
    if value is None:
        return None
    return orjson.dumps(_plain(value, tostring, set(), ""), option=orjson.OPT_SORT_KEYS).decode()


def _describe(v: Any, tostring: Callable[[Any], bytes]) -> str:
    return tostring(v).decode("utf-8", "replace")


def _plain(v: Any, tostring: Callable[[Any], bytes], seen: set[int], path: str) -> Any:
    if v is True or v is False:
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise StatusValueError(f"{PREFIX}{_describe(v, tostring)}{path} is not a finite number")
        if v.is_integer() and abs(v) < 2**53:
            return int(v)
        return v
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise StatusValueError(f"{PREFIX}string{path} is not valid UTF-8") from None
    kind = lupa.lua_type(v)
    if kind != "table":
        raise StatusValueError(f"{PREFIX}{_describe(v, tostring)}{path} is of unsupported type {kind or type(v).__name__}")
    key = hash(tostring(v))
    if key in seen:
        raise StatusValueError(f"{PREFIX}{_describe(v, tostring)}{path} contains a cycle")
    seen.add(key)
    items = list(v.items())
    if not items:
        seen.discard(key)
        return {}
    if all(isinstance(k, bytes) for k, _ in items):
        out = {}
        for k, x in items:
            try:
                ks = k.decode("utf-8")
            except UnicodeDecodeError:
                raise StatusValueError(f"{PREFIX}key{path} is not valid UTF-8") from None
            out[ks] = _plain(x, tostring, seen, f"{path}.{ks}")
        seen.discard(key)
        return out
    if all(isinstance(k, (int, float)) and not isinstance(k, bool) for k, _ in items):
        n = len(items)
        keys = sorted(k for k, _ in items)
        if keys != list(range(1, n + 1)):
            raise StatusValueError(f"{PREFIX}{_describe(v, tostring)}{path} is a sparse array "
                                   f"(keys must be exactly 1..n)")
        d = dict(items)
        out_list = [_plain(d[i], tostring, seen, f"{path}[{i}]") for i in range(1, n + 1)]
        seen.discard(key)
        return out_list
    raise StatusValueError(f"{PREFIX}{_describe(v, tostring)}{path} mixes string and number keys "
                           f"(a table is either an array or an object)")
