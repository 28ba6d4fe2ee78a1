"""One closed LuaJIT runtime per driver instance (DESIGN section 2).

The runtime is created with no eval, no builtins and attribute handlers that refuse every
Python attribute; the `python` module is removed before any other code runs. The privileged
bootstrap (sandbox.lua) then builds whitelist environments for driver and library code.
Strings cross the boundary as bytes (`encoding=None`): device traffic is binary, and a
Python `str` must never reach Lua (it would arrive as a Python object).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import lupa.luajit21 as lupa

from hubhost import paths
from hubhost.sandbox.luasource import rewrite_len as _rewrite_len

HERE = Path(__file__).resolve().parent
LuaError = lupa.LuaError
LuaMemoryError = lupa.LuaMemoryError

_MODULE_NAME = re.compile(rb"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DEFAULT_MAX_MEMORY = 64 * 1024 * 1024


def _deny_get(obj: Any, name: Any) -> Any:
    raise AttributeError("Python attributes are not accessible from Lua")


def _deny_set(obj: Any, name: Any, value: Any) -> None:
    raise AttributeError("Python attributes are not accessible from Lua")


def rewrite(src: bytes) -> bytes:
    """Rewrite `#x` for __len support; latin-1 keeps every byte as it is."""
    if b"#" not in src:
        return src
    return _rewrite_len(src.decode("latin-1")).encode("latin-1")


_compile_lock = threading.Lock()
_compiler: Any = None
_bytecode: dict[tuple[str, int, int, bool], bytes] = {}
_sources: dict[tuple[str, int, int], bytes] = {}
_resolved: dict[tuple[Any, ...], tuple[Path, bytes, bytes]] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def trusted_bytecode(path: Path, name: bytes, *, rewrite_len: bool = True) -> bytes:
    """Bytecode for one of hubhost's own Lua files, compiled once per process.

    Parsing the bootstrap, the pattern matcher and the library in every one of hundreds of
    runtimes dominated start-up; LuaJIT bytecode of the same build loads several times
    faster. Only files shipped with hubhost go this way: driver code is always loaded from
    source, and the sandbox refuses binary chunks from drivers.
    """
    global _compiler
    key = (*_stat_key(path), rewrite_len)
    code = _bytecode.get(key)
    if code is not None:
        return code
    with _compile_lock:
        if _compiler is None:
            _compiler = lupa.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
            _compiler.execute(b"python = nil")
        dump = _compiler.eval(
            b"function(src, name) local f = assert(loadstring(src, name)) return string.dump(f) end")
        src = path.read_bytes()
        code = dump(rewrite(src) if rewrite_len else src, name)
        _bytecode[key] = code
    return code


def read_source(path: Path) -> bytes:
    """A driver file's source, rewritten for `#`, cached while the file is unchanged."""
    key = _stat_key(path)
    src = _sources.get(key)
    if src is None:
        src = rewrite(path.read_bytes())
        if len(_sources) > 4096:
            _sources.clear()
        _sources[key] = src
    return src


PRIVATE_DIRS = (HERE, HERE.parent / "devices")   # hubhost's own privileged Lua files


def _private_path(name: str) -> Path:
    for folder in PRIVATE_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"hubhost's private Lua file {name} is missing")


def _read_private(name: str) -> bytes:
    # privileged files run with the real globals, where `#` needs no rewrite
    return trusted_bytecode(_private_path(name), b"@hubhost/" + name.encode(), rewrite_len=False)


class Sandbox:
    """A closed LuaJIT runtime plus the sandbox bootstrap.

    `driver_dir` is the folder whose modules `require` may load besides the bundled
    library; `on_print` receives what driver code prints (as text).
    """

    def __init__(
        self,
        driver_dir: Path | None = None,
        *,
        max_memory: int = DEFAULT_MAX_MEMORY,
        on_print: Callable[[str], None] | None = None,
        extra_roots: tuple[Path, ...] = (),
    ) -> None:
        self.driver_dir = Path(driver_dir).resolve() if driver_dir else None
        self.lib_dir = paths.lua_library_dir()
        self.extra_roots = tuple(Path(r).resolve() for r in extra_roots)
        self._on_print = on_print or (lambda text: None)
        self.lua = lupa.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            encoding=None,
            attribute_handlers=(_deny_get, _deny_set),
            max_memory=max_memory,
        )
        self.lua.execute(b"python = nil; package.loaded.python = nil")
        self.host = self.lua.table()
        # Host functions are wrapped so a Python exception reaches Lua as a plain string,
        # never as a Python exception object.
        self._wrap = self.lua.eval(
            b"function(raw) "
            b"local tostring, error, pcall = tostring, error, pcall "
            b"local function check(ok, ...) if not ok then error(tostring((...)), 0) end return ... end "
            b"return function(...) return check(pcall(raw, ...)) end end"
        )
        self.expose(
            clock=time.monotonic,
            find_module=self._find_module,
            rewrite=rewrite,
            print=self._print,
        )
        patterns = None
        if (HERE / "patterns.lua").exists():
            patterns = self.run_private("patterns.lua", self.lua.globals().string)
        sort = self.run_private("sort.lua")
        self.sb = self.run_private("sandbox.lua", self.host, patterns, sort)

    def run_private(self, name: str, *args: Any) -> Any:
        """Run one of hubhost's own privileged Lua files (full standard library)."""
        fn, err = self.lua.eval(b"function(s, n) local f, e = loadstring(s, n) return f, e end")(
            _read_private(name), b"@hubhost/" + name.encode())
        if fn is None:
            raise LuaError(err.decode())
        return fn(*args)

    # -- host functions ------------------------------------------------------------------
    def expose(self, **functions: Callable[..., Any]) -> None:
        """Make Python callables available to the privileged Lua glue as host.<name>."""
        for name, fn in functions.items():
            self.host[name.encode()] = self._wrap(fn)

    def _print(self, text: bytes) -> None:
        self._on_print(text.decode("utf-8", "replace"))

    def _find_module(self, name: bytes) -> tuple[bytes | None, bytes, bytes]:
        """Resolve `require(name)`: bundled library first, then the driver's folder."""
        if not _MODULE_NAME.match(name):
            return None, (
                b"module '" + name + b"' not found: module names are dotted Lua identifiers "
                b"(no '/', '..' or absolute paths)"
            ), b""
        cache_key = (self.lib_dir, self.driver_dir, self.extra_roots, name)
        hit = _resolved.get(cache_key)
        if hit is None:
            hit = self._resolve(name)
            if hit is None:
                return None, b"module '" + name + b"' not found in the driver folder or the hubhost library", b""
            _resolved[cache_key] = hit
        real, name_b, kind = hit
        try:
            if kind == b"lib":
                return trusted_bytecode(real, name_b), name_b, kind
            return read_source(real), chunkname(real), kind
        except FileNotFoundError:
            _resolved.pop(cache_key, None)
            return self._find_module(name)

    def _resolve(self, name: bytes) -> tuple[Path, bytes, bytes] | None:
        rel = Path(*name.decode("ascii").split("."))
        roots = [(self.lib_dir, b"lib")]
        if self.driver_dir:
            roots.append((self.driver_dir, b"driver"))
        roots += [(r, b"driver") for r in self.extra_roots]
        for root, kind in roots:
            for candidate in (root / rel.with_suffix(".lua"), root / rel / "init.lua"):
                if candidate.is_file():
                    real = candidate.resolve()
                    if not real.is_relative_to(root):
                        continue  # a symlink pointing out of the root: not ours to load
                    if kind == b"lib":
                        # a stable name: the bytecode is cached per process, whatever the cwd
                        shown = b"@hubhost/lua/" + str(real.relative_to(root)).encode()
                    else:
                        shown = b""  # driver files are named afresh at each load
                    return real, shown, kind
        return None

    # -- running code --------------------------------------------------------------------
    def new_env(self) -> Any:
        return self.sb.new_env()

    def compile(self, src: bytes, name: str, env: Any = None, *, interpreted: bool = True) -> Any:
        """Compile driver-side source text into a function bound to `env` (raises LuaError)."""
        env = env if env is not None else self.new_env()
        fn, err = self.sb.compile(src, b"@" + name.encode(), env, interpreted)
        if fn is None:
            raise LuaError(err.decode("utf-8", "replace"))
        return fn

    def run(self, src: str | bytes, name: str = "chunk", env: Any = None) -> Any:
        """Run a chunk of driver-side code in a sandbox environment (tests, `hubhost check`)."""
        if isinstance(src, str):
            src = src.encode()
        return self.compile(src, name, env)()

    def memory_used(self) -> int:
        return self.lua.get_memory_used() or 0


def chunkname(path: Path) -> bytes:
    """`@path` as Lua wants it, relative to the working directory when that is shorter."""
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    return b"@" + str(shown).encode()


def to_lua(lua: Any, value: Any) -> Any:
    """Convert plain Python data (dict/list/str/numbers) into Lua values, str as bytes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        t = lua.table()
        for k, v in value.items():
            t[k.encode() if isinstance(k, str) else k] = to_lua(lua, v)
        return t
    if isinstance(value, (list, tuple)):
        t = lua.table()
        for i, v in enumerate(value, 1):
            t[i] = to_lua(lua, v)
        return t
    return value


def from_lua(value: Any) -> Any:
    """Convert Lua data into plain Python: tables with keys 1..n become lists, bytes become
    str where they are UTF-8. Metatables are ignored (raw contents)."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    if lupa.lua_type(value) == "table":
        items = list(value.items())
        n = len(items)
        if n and all(isinstance(k, int) and not isinstance(k, bool) for k, _ in items):
            keys = sorted(k for k, _ in items)
            if keys == list(range(1, n + 1)):
                d = dict(items)
                return [from_lua(d[i]) for i in range(1, n + 1)]
        return {from_lua(k) if isinstance(k, bytes) else k: from_lua(v) for k, v in items}
    return value
