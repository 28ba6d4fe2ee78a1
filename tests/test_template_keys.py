"""Templates that catch typos (issue 13): every unknown key in the template, in `framing`,
in a function definition, in a parameter spec and in `lifecycle` is refused at load with the
driver's own file:line and a did-you-mean; tail calls (`return driver_helper.init_tcp{...}`)
included. Loaded by the real sandbox from real files (`hubhost check` and a real hub)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hubhost.cli.check import check_driver
from hubutil import run, running_hub, write_config, write_driver

CASES = [
    # (template body lines, the key's line in init.lua, expected message)
    ('framing = { delimitr = "\\r" },', "unknown key 'delimitr' in framing (did you mean 'delimiter'?)"),
    ('on_recieve = function() end,', "unknown key 'on_recieve' in the template (did you mean 'on_receive'?)"),
    ('capabilities = { "switch" },', "unknown key 'capabilities' in the template (known keys: framing, functions"),
    ('lifecycle = { inti = function() end },', "unknown lifecycle event 'inti' (did you mean 'init'?)"),
    ('lifecycle = { shutdwon = function() end },', "unknown lifecycle event 'shutdwon' (did you mean 'shutdown'?)"),
    ('functions = { power = { hander = function() end } },',
     "unknown key 'hander' in function power (did you mean 'handler'?)"),
    ('functions = { power = { handler = function() end, parms = {} } },',
     "unknown key 'parms' in function power (did you mean 'params'?)"),
    ('functions = { power = { handler = function() end, timout = 3 } },',
     "unknown key 'timout' in function power (did you mean 'timeout'?)"),
    ('functions = { power = { handler = function() end, params = { on = { "Bool", descripton = "x" } } } },',
     "unknown key 'descripton' in parameter on of function power (did you mean 'description'?)"),
]


def _driver(tmp: Path, body: str, *, tail: bool, builder: str = "init_tcp") -> Path:
    # the offending key sits on line 5 of init.lua in both styles
    if tail:
        src = (f'local driver_helper = require "driver_helper"\n'
               f'-- the guide\'s style: a tail call\n'
               f'return driver_helper.{builder} {{\n'
               f'  name = "typo",\n'
               f'  {body}\n'
               f'}}\n')
    else:
        src = (f'local driver_helper = require "driver_helper"\n'
               f'local log = require "log"\n'
               f'local driver = driver_helper.{builder} {{\n'
               f'  name = "typo",\n'
               f'  {body}\n'
               f'}}\n'
               f'return driver\n')
    d = tmp / "typo"
    d.mkdir(exist_ok=True)
    (d / "init.lua").write_text(src)
    return d


@pytest.mark.parametrize("tail", [True, False], ids=["tail-call", "local"])
@pytest.mark.parametrize("body,message", CASES, ids=[c[1].split("'")[1] for c in CASES])
def test_typo_refused_at_the_drivers_line_with_a_suggestion(tmp_path: Path, body: str, message: str,
                                                             tail: bool) -> None:
    d = _driver(tmp_path, body, tail=tail)
    ok, report = check_driver(d)
    assert not ok
    first = report.splitlines()[0]
    m = re.match(r"^(.*):(\d+): (.*)$", first)
    assert m, first
    assert m.group(1).endswith("typo/init.lua"), first
    assert m.group(2) == "5", first
    assert m.group(3).startswith(message), first


def test_other_template_errors_in_a_tail_call_name_the_drivers_file(tmp_path: Path) -> None:
    for body, text in (('lifecycle = { init = 5 },', "template.lifecycle.init must be a function"),
                       ('functions = { p = { handler = function() end, params = { x = { "Boool" } } } },',
                        'unknown type "Boool"')):
        d = _driver(tmp_path, body, tail=True)
        ok, report = check_driver(d)
        first = report.splitlines()[0]
        assert not ok and "hubhost/runtime.lua" not in first, first
        assert re.match(r"^.*typo/init\.lua:5: .*", first) and text in first, first


def test_template_built_in_a_module_names_that_module(tmp_path: Path) -> None:
    d = tmp_path / "mod"
    (d / "lib").mkdir(parents=True)
    (d / "init.lua").write_text('return require("lib.build")()\n')
    (d / "lib" / "build.lua").write_text(textwrap.dedent("""\
        local driver_helper = require "driver_helper"
        return function()
          local d = driver_helper.init {
            name = "mod",
            lifecycl = {},
          }
          return d
        end
    """))
    ok, report = check_driver(d)
    first = report.splitlines()[0]
    assert not ok and re.match(r"^.*mod/lib/build\.lua:3: unknown key 'lifecycl' in the template "
                               r"\(did you mean 'lifecycle'\?\)", first), first


def test_own_keys_with_an_underscore_and_good_templates_load(tmp_path: Path) -> None:
    d = _driver(tmp_path, 'framing = { delimiter = "\\r", max_frame = 512 }, _cache = {}, '
                'functions = { power = { description = "on/off", params = { on = { "Bool", description = "state" } }, '
                'handler = function() end } },', tail=True)
    ok, report = check_driver(d)
    assert ok, report


def test_hubhost_check_and_a_hub_report_it(tmp_path: Path) -> None:
    d = _driver(tmp_path, 'framing = { delimitr = "\\r" },', tail=True)
    out = subprocess.run([sys.executable, "-m", "hubhost", "check", str(d)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "typo/init.lua:5: unknown key 'delimitr' in framing (did you mean 'delimiter'?)" in out.stdout
    assert "stack traceback" not in out.stdout and "runtime.lua" not in out.stdout, out.stdout
    # the framing values are checked by the device links, in a hub: located the same way
    bad = tmp_path / "badframing"
    bad.mkdir()
    (bad / "init.lua").write_text((d / "init.lua").read_text().replace('delimitr = "\\r"', "delimiter = 5"))
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "typo"
        path = "typo"
        [[drivers]]
        id = "badframing"
        path = "badframing"
    """)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            slot = sup.slots["typo"]
            assert slot.state != "running"
            assert "typo/init.lua:5: unknown key 'delimitr' in framing (did you mean 'delimiter'?)" in (
                slot.last_error or ""), slot.last_error
            err = sup.slots["badframing"].last_error or ""
            assert re.search(r"badframing/init\.lua:5: .*delimiter", err) and "runtime.lua" not in err.split("\\n")[0], err

    run(main())
