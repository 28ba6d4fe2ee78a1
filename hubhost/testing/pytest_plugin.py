"""pytest plugin: busted-style Lua specs (`*_spec.lua`) become pytest items.

Registered through the `pytest11` entry point, so a plain `pytest` runs the specs next to
the Python tests. Each `it` is one item with node id `path/x_spec.lua::describe > it`, so
`-k`, `--lf`, `-x`, `--junitxml` and node-id selection work as usual. `#tags` in names
become markers. Hooks need their file's context, so the first item of a file that runs
executes every selected item of that file in one Lua pass; each item then reports its
own cached result (hook failures appear as errors at setup or teardown of that item).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubhost.testing import specrun
from hubhost.testing.specrun import Outcome, SpecLoadError, SpecResult, SpecTest

# Tags that would change how pytest treats an item (or need arguments) stay keywords
# only; `#skip` and `#xfail` keep pytest's meaning on purpose.
_RESERVED_MARKERS = frozenset({
    "parametrize", "usefixtures", "filterwarnings", "skipif", "timeout", "tryfirst", "trylast",
})
_TAGS_KEY = pytest.StashKey[set[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "lua_spec_timeout",
        "seconds a Lua spec's test, hook or describe body may run before it is stopped "
        f"(0 = no limit; default {specrun.DEFAULT_TIME_LIMIT:g})",
        default=str(specrun.DEFAULT_TIME_LIMIT),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TAGS_KEY] = set()


def _time_limit(config: pytest.Config) -> float | None:
    raw = config.getini("lua_spec_timeout")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"lua_spec_timeout: {raw!r} is not a number of seconds") from None
    return value if value > 0 else None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.name.endswith(specrun.SPEC_SUFFIX):
        return SpecFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    # pytest renders setup/teardown exceptions itself (not via repr_failure): give hook
    # failures the same Lua-only text as test failures.
    report: pytest.TestReport = yield
    excinfo = call.excinfo
    if isinstance(item, SpecItem) and excinfo is not None and isinstance(excinfo.value, SpecError):
        report.longrepr = excinfo.value.text
    return report


def _marker(config: pytest.Config, tag: str) -> pytest.MarkDecorator:
    """pytest.mark.<tag>, registered first so it never warns as unknown."""
    known = config.stash.get(_TAGS_KEY, None)
    if known is None:
        known = config.stash[_TAGS_KEY] = set()
    if tag not in known:
        known.add(tag)
        config.addinivalue_line("markers", f"{tag}: busted tag #{tag} in a Lua spec name")
    return getattr(pytest.mark, tag)


def _item_name(spec_id: str) -> str:
    # "::" separates node-id parts: keep it out of a name so selection by id works.
    return spec_id.replace("::", ": :")


class SpecFile(pytest.File):
    """A `*_spec.lua` file; runs its selected items in one pass and caches the results."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._results: dict[str, SpecResult] = {}

    def collect(self) -> Iterator[SpecItem]:
        try:
            tests = specrun.collect(self.path, _time_limit(self.config))
        except SpecLoadError as exc:
            text = exc.message if not exc.trace else f"{exc.message}\n{exc.trace}"
            raise self.CollectError(f"cannot load Lua spec file:\n{text}") from None
        for test in tests:
            item = SpecItem.from_parent(self, name=_item_name(test.id), spec=test)
            for tag in test.tags:
                if tag not in _RESERVED_MARKERS:
                    item.add_marker(_marker(self.config, tag))
            yield item

    def result_for(self, item: SpecItem) -> SpecResult:
        """The item's result, running this file's selected, not yet run items if needed."""
        sid = item.spec.id
        if sid not in self._results:
            batch = [
                i for i in item.session.items
                if isinstance(i, SpecItem) and i.parent is self and i.runs_lua
                and i.spec.id not in self._results
            ]
            if item not in batch:
                batch.append(item)
            ids = [i.spec.id for i in batch]
            try:
                self._results.update(specrun.run(self.path, ids, _time_limit(self.config)))
            except SpecLoadError as exc:
                failed = SpecResult(status="error", message=exc.message, trace=exc.trace)
                self._results.update({i: failed for i in ids})
        return self._results[sid]


class SpecError(Exception):
    """A failing spec or hook; rendered by SpecItem.repr_failure."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _located(message: str | None, file: str | None, line: int | None, fallback: str) -> str:
    text = message or "(no error message)"
    first = text.split("\n", 1)[0]
    if file and line and f":{line}:" not in first:
        text = f"{file}:{line}: {text}"
    return text or fallback


def _render(o: Outcome | SpecResult, where: str, spec_file: str) -> str:
    """Lua errors get their traceback; assertion failures only when they happened outside
    the spec file (in a driver module), to show which spec line led there."""
    text = _located(o.message, o.file, o.line, where)
    shows_trace = o.status == "error" or (o.file is not None and o.file != spec_file)
    if shows_trace and o.trace and o.trace.strip() != "stack traceback:":
        text += "\n" + o.trace
    return text


def _render_hook(o: Outcome, where: str, spec_file: str) -> str:
    block = f" of '{o.block}'" if o.block else (" of the file" if o.block == "" else "")
    return f"{o.hook or 'hook'}{block} failed ({o.status}):\n{_render(o, where, spec_file)}"


class SpecItem(pytest.Item):
    """One `it` (or pending, or a describe whose body failed) of a spec file."""

    parent: SpecFile

    def __init__(self, *, spec: SpecTest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self._result: SpecResult | None = None

    @property
    def runs_lua(self) -> bool:
        """False for items whose outcome is known from collection (pending, broken describe)."""
        return not self.spec.pending and self.spec.error is None

    def _where(self) -> str:
        return f"{self.path.name}:{self.spec.line}"

    def _spec_file(self) -> str:
        return specrun.display_name(self.path)

    def setup(self) -> None:
        if not self.runs_lua:
            return
        self._result = self.parent.result_for(self)
        if self._result.setup is not None:
            raise SpecError(_render_hook(self._result.setup, self._where(), self._spec_file()))

    def runtest(self) -> None:
        if self.spec.error is not None:
            raise SpecError(_render(
                SpecResult("error", self.spec.error, self.spec.trace), self._where(), self._spec_file()))
        if self.spec.pending:
            raise pytest.skip.Exception("pending", _use_item_location=True)
        r = self._result
        assert r is not None
        if r.status == "pending":
            raise pytest.skip.Exception(f"pending: {r.message}" if r.message else "pending",
                                        _use_item_location=True)
        if r.status in ("failure", "error"):
            raise SpecError(_render(r, self._where(), self._spec_file()))

    def teardown(self) -> None:
        r, self._result = self._result, None
        if r is not None and r.teardown is not None:
            raise SpecError(_render_hook(r.teardown, self._where(), self._spec_file()))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, SpecError):
            return excinfo.value.text
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, (self.spec.line - 1 if self.spec.line else None), self.spec.id
