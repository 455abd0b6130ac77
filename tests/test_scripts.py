"""The calling convention: core/scripts.py builds what _prelude.lua reads.

The KEYS/ARGV header is built in one Python place (``CallBuilder``); these
tests read the prelude's own text, so a field moved on one side only fails
here rather than as a wrong key deep inside a script.
"""

from __future__ import annotations

import re

import pytest

from tierpool.core.keys import Keys
from tierpool.core.scripts import (
    LUA_DIR,
    POOL_ARGS,
    POOL_KEYS,
    PRELUDE_ARGS,
    PRELUDE_KEYS,
    CallBuilder,
    PoolTable,
    script,
)
from tierpool.core.tierconfig import parse_tier_config

PRELUDE = (LUA_DIR / "_prelude.lua").read_text()
KEYS = Keys("conv")


def _fields(table: str, source: str) -> dict[str, int]:
    """``name = ...KEYS[n]`` / ``ARGV[n]`` pairs of the prelude's K or H table."""
    body = re.search(rf"local {table} = \{{(.*?)\n\}}", PRELUDE, re.S)
    assert body, f"no `local {table} = {{...}}` in _prelude.lua"
    return {
        name: int(n) for name, n in re.findall(rf"(\w+) = [\w(]*{source}\[(\d+)\]", body.group(1))
    }


def test_header_keys_match_the_prelude() -> None:
    k = _fields("K", "KEYS")
    assert k == {name: i for i, (name, _) in enumerate(PRELUDE_KEYS, 1)}


def test_header_args_match_the_prelude() -> None:
    h = _fields("H", "ARGV")
    assert h == {name: i for i, name in enumerate(PRELUDE_ARGS, 1)}


def test_pool_table_layout_matches_the_prelude() -> None:
    n_keys, n_args = len(PRELUDE_KEYS), len(PRELUDE_ARGS)
    assert f"local n = tonumber(ARGV[{n_args + 1}])" in PRELUDE
    for i, name in enumerate(POOL_ARGS):
        assert re.search(
            rf"{name} = [\w(]*ARGV\[{n_args + 2 + i} \+ {len(POOL_ARGS)} \* i\]", PRELUDE
        )
    for i, name in enumerate(POOL_KEYS):
        assert f"{name} = KEYS[{n_keys + 1 + i} + {len(POOL_KEYS)} * i]" in PRELUDE
    assert f"local ARG0 = {n_args + 2} + {len(POOL_ARGS)} * #POOLS" in PRELUDE
    assert f"local KEY0 = {n_keys + 1} + {len(POOL_KEYS)} * #POOLS" in PRELUDE


def test_a_built_call_puts_each_value_where_the_prelude_reads_it() -> None:
    """Distinct values for every header field land at the prelude's index for that field."""
    builder = CallBuilder(
        KEYS,
        reply_ttl_ms=11,
        events_maxlen=12,
        pod_ttl_ms=13,
        lease_ttl_ms=14,
        draining_ttl_ms=15,
        dead_maxlen=16,
    )
    cfg = parse_tier_config('{"gold": {"target": 1, "zone": "restricted", "capability": 3}}')
    table = PoolTable.of(KEYS, cfg)
    call = builder.call(
        "release",
        table,
        ("a0", "a1"),
        stream="the-stream",
        entry_id="1-1",
        request_id="rid",
        now_ms=7,
        deadline_ms=8,
        want_cfgv=9,
        want_mv=10,
        kind="release",
        echo=("call_id", "c9"),
        extra_keys=("x0",),
    )
    k = _fields("K", "KEYS")
    h = _fields("H", "ARGV")
    expected_keys = {
        "stream": "the-stream",
        "reply": KEYS.reply("rid"),
        **{name: getattr(KEYS, attr) for name, attr in PRELUDE_KEYS[2:]},
    }
    assert {name: call.keys[i - 1] for name, i in k.items()} == expected_keys
    expected_args = {
        "now": "7",
        "entry": "1-1",
        "rid": "rid",
        "deadline": "8",
        "reply_ttl": "11",
        "events_max": "12",
        "want_cfgv": "9",
        "want_mv": "10",
        "pod_ttl": "13",
        "lease_ttl": "14",
        "draining_ttl": "15",
        "dead_max": "16",
        "kind": "release",
        "echo_field": "call_id",
        "echo_value": "c9",
    }
    assert {name: call.args[i - 1] for name, i in h.items()} == expected_args
    n = len(PRELUDE_ARGS)
    assert call.args[n:] == ("1", "gold", "1", "restricted", "3", "0", "a0", "a1")
    assert call.keys[len(PRELUDE_KEYS) :] == (
        KEYS.pool_free("gold", "open"),
        KEYS.pool_free("gold", "restricted"),
        "x0",
    )
    assert call.script is script("release")


@pytest.mark.parametrize("name", sorted(p.stem for p in LUA_DIR.glob("[!_]*.lua")))
def test_no_script_reads_a_header_slot_by_number(name: str) -> None:
    """Prelude scripts reach KEYS/ARGV only through K, H, P, ARG0 and KEY0."""
    body = (LUA_DIR / f"{name}.lua").read_text()
    code = "\n".join(line.split("--")[0] for line in body.splitlines())
    if name.startswith(("leader_", "group_")):
        return
    fixed = re.findall(r"(?:KEYS|ARGV)\[\d[^]]*\]", code)
    assert not fixed, f"{name}.lua indexes {fixed} by number: use K, H, P, ARG0, KEY0"
