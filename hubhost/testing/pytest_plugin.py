"""pytest plugin: busted-style Lua specs (`*_spec.lua`) become pytest items.

Registered through the `pytest11` entry point, so a plain `pytest` runs the specs next to
the Python tests. Each `it` is one item with node id `path/x_spec.lua::describe > it`, so
`-k`, `--lf`, `-x`, `--junitxml` and node-id selection work as usual. `#tags` in names
become markers.

busted has no collection step: describe bodies run in execution order, after the earlier
siblings' tests and hooks. So collecting a file runs it whole, once, as busted would, and
keeps the results; each item then reports its own (hook failures appear as errors at
setup or teardown of that item; what the test printed is its captured output). When
pytest deselects some of a file's items (-k, --lf, node ids), the first selected item
runs the file again with only the selected ones, like busted's --filter. A file that
fails to load is one failing item named after the file; the other files still run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubhost.testing import specrun
from hubhost.testing.render import head_line
from hubhost.testing.render import item_name as _item_name
from hubhost.testing.render import render as _render
from hubhost.testing.render import render_hook as _render_hook
from hubhost.testing.specrun import SpecResult, SpecTest

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


class SpecFile(pytest.File):
    """A `*_spec.lua` file: run whole at collection; reruns a selection when pytest asks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._results: dict[str, SpecResult] = {}
        self._full: dict[str, SpecResult] = {}
        self._decided = False

    def collect(self) -> Iterator[SpecItem]:
        fr = specrun.run_file(self.path, None, _time_limit(self.config))
        if fr.load_error is not None:
            test = SpecTest(id=fr.file_item, name=fr.file_item, tags=(), line=fr.load_error.line or 0)
            self._full = {test.id: fr.load_error}
            yield SpecItem.from_parent(self, name=_item_name(test.id), spec=test)
            return
        self._full = fr.results
        for test in fr.tests:
            item = SpecItem.from_parent(self, name=_item_name(test.id), spec=test)
            for tag in test.tags:
                if tag not in _RESERVED_MARKERS:
                    item.add_marker(_marker(self.config, tag))
            yield item

    def result_for(self, item: SpecItem) -> SpecResult:
        """The item's result: from the run at collection when every item of this file is
        selected, else from one rerun of the selected ones."""
        if not self._decided:
            self._decided = True
            mine = [i for i in item.session.items if isinstance(i, SpecItem) and i.parent is self]
            if len(mine) == len(self._full) and all(i.spec.id in self._full for i in mine):
                self._results = self._full
            else:
                ids = [i.spec.id for i in mine] or [item.spec.id]
                if item.spec.id not in ids:
                    ids.append(item.spec.id)
                self._results = specrun.run(self.path, ids, _time_limit(self.config))
        sid = item.spec.id
        if sid not in self._results:
            self._results.update(specrun.run(self.path, [sid], _time_limit(self.config)))
        return self._results[sid]


class SpecError(Exception):
    """A failing spec or hook; rendered by SpecItem.repr_failure."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class SpecItem(pytest.Item):
    """One `it` (or pending, or a describe whose body failed, or a file that failed to
    load) of a spec file."""

    parent: SpecFile

    def __init__(self, *, spec: SpecTest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self._result: SpecResult | None = None

    def _where(self) -> str:
        return f"{self.path.name}:{self.spec.line}"

    def _spec_file(self) -> str:
        return specrun.display_name(self.path)

    def setup(self) -> None:
        self._result = self.parent.result_for(self)
        if self._result.setup is not None:
            sys.stdout.write(self._result.output)
            raise SpecError(_render_hook(self._result.setup, self._where(), self._spec_file()))

    def runtest(self) -> None:
        r = self._result
        assert r is not None
        if r.output:
            sys.stdout.write(r.output)   # the test's captured output, as pytest shows it
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
        return self.path, (self.spec.line - 1 if self.spec.line else None), head_line(self.spec.id)
