"""How spec results read in reports: shared by the pytest plugin and the fast path of
`hubhost test`, so both print the same text (and the fast path need not import pytest)."""

from __future__ import annotations

from hubhost.testing.specrun import Outcome, SpecResult


def item_name(spec_id: str) -> str:
    """The pytest item name of a spec id ("::" separates node-id parts: keep it out)."""
    return spec_id.replace("::", ": :")


def head_line(spec_id: str) -> str:
    """The item's pytest "domain" (section headers). pytest -v shows a node id whose tail
    equals it with "." turned into "::" (Python's module.Class.test); a trailing space
    keeps a name like "parses 1.5" as it is written."""
    return spec_id + " " if "." in spec_id else spec_id


def _located(message: str | None, file: str | None, line: int | None, fallback: str) -> str:
    text = message or "(no error message)"
    first = text.split("\n", 1)[0]
    if file and line and f":{line}:" not in first:
        text = f"{file}:{line}: {text}"
    return text or fallback


def render(o: Outcome | SpecResult, where: str, spec_file: str) -> str:
    """Lua errors get their traceback; assertion failures only when they happened outside
    the spec file (in a driver module), to show which spec line led there."""
    text = _located(o.message, o.file, o.line, where)
    shows_trace = o.status == "error" or (o.file is not None and o.file != spec_file)
    if shows_trace and o.trace and o.trace.strip() != "stack traceback:":
        text += "\n" + o.trace
    return text


def render_hook(o: Outcome, where: str, spec_file: str) -> str:
    """A failing hook around a test: which hook, of which block, and its failure."""
    block = f" of '{o.block}'" if o.block else (" of the file" if o.block == "" else "")
    return f"{o.hook or 'hook'}{block} failed ({o.status}):\n{render(o, where, spec_file)}"
