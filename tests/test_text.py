"""Driver-made text shown to operators (hubhost/text.py, `hubhost describe`, CLI errors):
one line, no terminal control, whatever the driver put in it."""

from __future__ import annotations

from hubhost.api.client import describe_text
from hubhost.text import one_line


def test_one_line_escapes_every_control_but_the_tab_and_caps_the_length() -> None:
    assert one_line("a\nb\r\x1b[2J\x07\x00\u2028\u202e\tc") == "a\\nb\\r\\e[2J\\x07\\x00\\u2028\\u202e\tc"
    cut = one_line("x" * 100, cap=10)
    assert cut.startswith("x" * 10) and "90 more characters cut" in cut


def test_describe_shows_hostile_names_and_descriptions_as_one_escaped_line_each() -> None:
    doc = {
        "device": {"id": "att1", "label": "evil\nlabel: forged"},
        "driver": {"id": "att", "name": "\x1b]0;pwned\x07", "path": "/x", "condition": "running",
                   "restarts": 0, "last_error": None},
        "status": {"\x1b[2J\x1b]0;pwned\x07evil": 1, "nl\nname: forged": "\x1b[31m"},
        "transport": None,
        "interface": {"functions": {"f": {"p\x1b[1m": ["String"]}},
                      "descriptions": {"f": {"description": "\x1b[31mRED\x1b[0m\nfake: line",
                                             "params": {"p\x1b[1m": "\x1b]0;title\x07"}}}},
        "recent_errors": [],
    }
    text = describe_text(doc)
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert not any(ln.startswith(("label:", "name:", "fake:")) for ln in lines), lines
    assert any("nl\\nname: forged" in ln for ln in lines)
