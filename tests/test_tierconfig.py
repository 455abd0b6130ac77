"""Tier config: the anchor's three formats and defaults, plus the validation it lacked."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierpool.core.errors import TierConfigError
from tierpool.core.snapshot import dedicated_pools
from tierpool.core.tierconfig import (
    MAX_TIERS,
    Tier,
    TierConfig,
    default_tier_config,
    parse_tier_config,
    pod_may_join,
    to_json,
    to_wire_dict,
)

PRODUCTION_FLAT = (
    '{"gold":{"type":"exclusive","target":1},"standard":{"type":"exclusive","target":1},'
    '"basic":{"type":"shared","target":1,"max_concurrent":3}}'
)
"""The anchor's production configmap value (seed 003)."""


def problems_of(raw: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(TierConfigError) as info:
        parse_tier_config(raw, **kwargs)
    assert str(info.value).startswith("invalid tier config: ")
    return info.value.problems


def only_problem(raw: Any, **kwargs: Any) -> str:
    problems = problems_of(raw, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --- formats -----------------------------------------------------------------


def test_production_flat_config_means_what_it_meant_in_the_anchor() -> None:
    cfg = parse_tier_config(PRODUCTION_FLAT)
    assert cfg.tier("gold") == Tier(name="gold", type="exclusive", target=1, max_concurrent=1)
    assert cfg.tier("standard") == Tier(
        name="standard", type="exclusive", target=1, max_concurrent=1
    )
    assert cfg.tier("basic") == Tier(name="basic", type="shared", target=1, max_concurrent=3)
    assert cfg.default_chain == ("gold", "standard", "basic")
    assert cfg.version == 0


def test_structured_envelope() -> None:
    cfg = parse_tier_config(
        {
            "tiers": {
                "gold": {"type": "exclusive", "target": 2, "zone": "restricted", "capability": 4},
                "basic": {"type": "shared", "target": 1, "max_concurrent": 5},
            },
            "default_chain": ["basic", "gold"],
            "version": 7,
        }
    )
    assert cfg.version == 7
    assert cfg.default_chain == ("basic", "gold")
    gold = cfg.tier("gold")
    assert (gold.zone, gold.capability, gold.target) == ("restricted", 4, 2)


def test_structured_without_chain_builds_it() -> None:
    cfg = parse_tier_config('{"tiers": {"b": 1, "a": {"type": "shared"}, "c": 3}}')
    assert cfg.default_chain == ("b", "c", "a")


def test_integer_map_is_exclusive_tiers_with_targets() -> None:
    cfg = parse_tier_config('{"gold": 10, "standard": 20, "overflow": 5}')
    assert [(t.name, t.type, t.target, t.max_concurrent) for t in cfg.tiers] == [
        ("gold", "exclusive", 10, 1),
        ("overflow", "exclusive", 5, 1),
        ("standard", "exclusive", 20, 1),
    ]
    # Auto-built, so alphabetical: not the built-in default's hand-written order.
    assert cfg.default_chain == ("gold", "overflow", "standard")


def test_mixed_flat_and_integer_values_are_accepted() -> None:
    cfg = parse_tier_config('{"gold": 3, "pool": {"type": "shared", "target": 2}}')
    assert cfg.tier("gold").target == 3
    assert cfg.tier("pool").max_concurrent == 5


def test_bytes_and_mappings_are_accepted() -> None:
    assert parse_tier_config(PRODUCTION_FLAT.encode()) == parse_tier_config(PRODUCTION_FLAT)
    assert parse_tier_config(json.loads(PRODUCTION_FLAT)) == parse_tier_config(PRODUCTION_FLAT)


@pytest.mark.parametrize("raw", ["", "   ", "\n", b"", "{}", " { } ", {}])
def test_empty_config_is_the_builtin_default(raw: Any) -> None:
    assert parse_tier_config(raw) == default_tier_config()


def test_builtin_default() -> None:
    cfg = default_tier_config()
    assert cfg.version == 0
    assert {t.name: (t.type, t.target, t.max_concurrent) for t in cfg.tiers} == {
        "gold": ("exclusive", 10, 1),
        "standard": ("exclusive", 20, 1),
        "overflow": ("exclusive", 5, 1),
    }
    assert cfg.default_chain == ("gold", "standard", "overflow")
    assert all(t.zone == "open" and t.capability == 1 for t in cfg.tiers)
    assert default_tier_config(4).version == 4
    assert parse_tier_config("", version=9) == default_tier_config(9)


# --- normalisation -------------------------------------------------------------


@pytest.mark.parametrize("spec", [{}, {"type": ""}, {"type": None}, {"target": 0}])
def test_missing_type_is_exclusive(spec: dict[str, Any]) -> None:
    tier = parse_tier_config({"gold": spec}).tier("gold")
    assert tier.type == "exclusive"
    assert tier.max_concurrent == 1


@pytest.mark.parametrize("spec", [{"type": "shared"}, {"type": "shared", "max_concurrent": 0}])
def test_shared_max_concurrent_defaults_to_5(spec: dict[str, Any]) -> None:
    assert parse_tier_config({"basic": spec}).tier("basic").max_concurrent == 5


@pytest.mark.parametrize("given_max", [0, 1, None])
def test_exclusive_max_concurrent_is_1(given_max: int | None) -> None:
    tier = parse_tier_config({"gold": {"type": "exclusive", "max_concurrent": given_max}})
    assert tier.tier("gold").max_concurrent == 1


def test_missing_target_zone_capability_get_defaults() -> None:
    tier = parse_tier_config({"gold": {"type": "exclusive"}}).tier("gold")
    assert (tier.target, tier.zone, tier.capability) == (0, "open", 1)


def test_version_from_document_and_override() -> None:
    doc = '{"tiers": {"gold": 1}, "version": 3}'
    assert parse_tier_config(doc).version == 3
    assert parse_tier_config(doc, version=11).version == 11
    assert parse_tier_config('{"gold": 1}', version=2).version == 2


# --- default chain ---------------------------------------------------------------


def test_chain_auto_build_is_exclusive_sorted_then_shared_sorted() -> None:
    cfg = parse_tier_config(
        {
            "zeta": {"type": "shared"},
            "beta": 1,
            "alpha": {"type": "shared"},
            "gamma": {"type": "exclusive"},
            "Aardvark": 1,
        }
    )
    assert cfg.default_chain == ("Aardvark", "beta", "gamma", "alpha", "zeta")


def test_explicit_empty_chain_is_built_as_in_the_anchor() -> None:
    cfg = parse_tier_config({"tiers": {"b": 1, "a": 1}, "default_chain": []})
    assert cfg.default_chain == ("a", "b")


def test_explicit_chain_is_kept_in_its_order() -> None:
    cfg = parse_tier_config({"tiers": {"a": 1, "b": 1, "c": 1}, "default_chain": ["c", "a"]})
    assert cfg.default_chain == ("c", "a")


# --- helpers -----------------------------------------------------------------------


def test_dedicated_pools_are_every_tier_outside_the_chain_shared_ones_included() -> None:
    """One definition (core.snapshot.dedicated_pools); the anchor's exclusive-only
    ``merchant_tiers`` contradicted it and is gone."""
    cfg = parse_tier_config(
        {
            "tiers": {
                "gold": 1,
                "acme": 1,
                "zenith": 2,
                "pool": {"type": "shared"},
                "spare": {"type": "shared"},
            },
            "default_chain": ["gold", "pool"],
        }
    )
    assert dedicated_pools(cfg) == {"acme", "zenith", "spare"}
    assert dedicated_pools(parse_tier_config(PRODUCTION_FLAT)) == frozenset()


def test_pools_are_chain_first_then_the_rest_sorted() -> None:
    cfg = parse_tier_config(
        {"tiers": {"d": 1, "c": 1, "b": 1, "a": 1}, "default_chain": ["c", "a"]}
    )
    assert cfg.pools == ("c", "a", "b", "d")


def test_lookup_helpers() -> None:
    cfg = parse_tier_config(PRODUCTION_FLAT)
    assert cfg.is_shared("basic")
    assert not cfg.is_shared("gold")
    assert not cfg.is_shared("nope")
    assert "gold" in cfg
    assert "nope" not in cfg
    assert cfg.get("nope") is None
    assert cfg.get("gold") is cfg.tier("gold")
    with pytest.raises(KeyError, match="nope"):
        cfg.tier("nope")
    assert cfg.tier("gold").shared is False


def test_config_is_immutable_and_hashable() -> None:
    cfg = parse_tier_config(PRODUCTION_FLAT)
    with pytest.raises(AttributeError):
        cfg.version = 5  # type: ignore[misc]
    assert isinstance(cfg.tiers, tuple)
    assert hash(cfg) == hash(parse_tier_config(PRODUCTION_FLAT))
    assert len({cfg, parse_tier_config(PRODUCTION_FLAT)}) == 1


def test_input_order_does_not_matter() -> None:
    a = parse_tier_config('{"gold": 1, "basic": {"type": "shared"}, "std": 2}')
    b = parse_tier_config('{"std": 2, "gold": 1, "basic": {"type": "shared"}}')
    assert a == b
    assert [t.name for t in a.tiers] == ["basic", "gold", "std"]


def test_with_version() -> None:
    cfg = parse_tier_config(PRODUCTION_FLAT)
    newer = cfg.with_version(8)
    assert newer.version == 8
    assert (newer.tiers, newer.default_chain) == (cfg.tiers, cfg.default_chain)
    assert cfg.version == 0


# --- zones and capability ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tier_zone", "pod_zone", "expected"),
    [
        ("open", "open", True),
        ("open", "restricted", True),  # a restricted pod meets open too
        ("restricted", "restricted", True),
        ("restricted", "open", False),  # an open pod never joins a restricted tier
    ],
)
def test_pod_may_join_zone(tier_zone: Any, pod_zone: Any, expected: bool) -> None:
    tier = Tier(name="t", type="exclusive", target=1, max_concurrent=1, zone=tier_zone)
    assert pod_may_join(tier, pod_zone, 1) is expected


@pytest.mark.parametrize(
    ("tier_cap", "pod_cap", "expected"),
    [(1, 1, True), (3, 2, False), (3, 3, True), (3, 5, True), (5, 4, False)],
)
def test_pod_may_join_capability(tier_cap: int, pod_cap: int, expected: bool) -> None:
    tier = Tier(name="t", type="shared", target=1, max_concurrent=2, capability=tier_cap)
    assert pod_may_join(tier, "open", pod_cap) is expected
    assert pod_may_join(tier, "restricted", pod_cap) is expected


def test_pod_may_join_rejects_an_unknown_zone() -> None:
    tier = Tier(name="t", type="exclusive", target=1, max_concurrent=1)
    with pytest.raises(ValueError, match="zone"):
        pod_may_join(tier, "any", 1)  # type: ignore[arg-type]


# --- validation: each problem, named ----------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"target": -1}, "tier 'gold': target must be >= 0, got -1"),
        ({"target": 100_001}, "tier 'gold': target must be <= 100000, got 100001"),
        ({"type": "premium"}, "tier 'gold': unknown type 'premium' (expected exclusive or shared)"),
        ({"type": "Shared"}, "tier 'gold': unknown type 'Shared' (expected exclusive or shared)"),
        ({"capability": 9}, "tier 'gold': capability must be 1-5, got 9"),
        ({"capability": 0}, "tier 'gold': capability must be 1-5, got 0"),
        ({"zone": "any"}, "tier 'gold': zone must be restricted or open, got 'any'"),
        (
            {"type": "shared", "max_concurrent": -1},
            "tier 'gold': max_concurrent must be >= 0, got -1",
        ),
        (
            {"type": "shared", "max_concurrent": 10_001},
            "tier 'gold': max_concurrent must be <= 10000, got 10001",
        ),
        ({"target": "3"}, "tier 'gold': target must be an integer, got string '3'"),
        ({"target": 1.5}, "tier 'gold': target must be an integer, got number 1.5"),
        ({"target": True}, "tier 'gold': target must be an integer, got boolean True"),
        ({"capability": "high"}, "tier 'gold': capability must be an integer, got string 'high'"),
        (
            {"max_concurent": 3},
            "tier 'gold': unknown key 'max_concurent' "
            "(expected type, target, max_concurrent, zone, capability)",
        ),
    ],
)
def test_tier_field_problems(spec: dict[str, Any], message: str) -> None:
    assert only_problem({"gold": spec}) == message


def test_exclusive_with_max_concurrent_above_1_is_an_error() -> None:
    message = only_problem({"gold": {"type": "exclusive", "max_concurrent": 3}})
    assert message.startswith("tier 'gold': max_concurrent 3 is not possible for an exclusive")


@pytest.mark.parametrize("value", ["x", None, [1], True, 2.0])
def test_tier_spec_of_wrong_type(value: Any) -> None:
    assert only_problem({"gold": value}).startswith(
        "tier 'gold': expected an object or an integer target, got "
    )


@pytest.mark.parametrize(
    "name",
    ["", "a b", "gold:1", "a{b}", "x" * 65, "g\u00f6ld", "tier/1", "merchant:acme"],
)
def test_bad_tier_names(name: str) -> None:
    message = only_problem({name: 1})
    assert message == (
        f"tier {name!r}: name must be 1-64 chars of [A-Za-z0-9._-] (tier names go into Redis keys)"
    )


@pytest.mark.parametrize("name", ["a", "x" * 64, "gold-2", "pool_1.v2", "A.b_C-9"])
def test_good_tier_names(name: str) -> None:
    assert name in parse_tier_config({name: 1})


def test_chain_naming_an_unknown_tier_is_an_error_not_repaired() -> None:
    message = only_problem({"tiers": {"gold": 1}, "default_chain": ["gold", "platinum"]})
    assert message == "default_chain: names unknown tier 'platinum'"


def test_chain_listing_a_tier_twice() -> None:
    message = only_problem(
        {"tiers": {"gold": 1, "std": 1}, "default_chain": ["gold", "std", "gold"]}
    )
    assert message == "default_chain: lists 'gold' twice"


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ("gold", "default_chain: must be an array of tier names, got string"),
        ({"gold": 1}, "default_chain: must be an array of tier names, got object"),
        (["gold", 3], "default_chain: entries must be tier names, got number 3"),
    ],
)
def test_chain_of_wrong_type(chain: Any, message: str) -> None:
    assert only_problem({"tiers": {"gold": 1}, "default_chain": chain}) == message


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        ("{bad", "not valid JSON: "),
        ('{"gold": 1,}', "not valid JSON: "),
        (b"\xff\xfe", "not valid JSON: "),
        ('{"gold": NaN}', "not valid JSON: NaN"),
        ("[1, 2]", "top level must be a JSON object, got array"),
        ('"gold"', "top level must be a JSON object, got string"),
        ("null", "top level must be a JSON object, got null"),
        ("5", "top level must be a JSON object, got number"),
    ],
)
def test_document_problems(raw: str | bytes, start: str) -> None:
    assert only_problem(raw).startswith(start)


def test_duplicate_json_key_is_reported() -> None:
    """Guards a silent last-one-wins: ``{"gold": 1, "gold": 50}`` would hide a typo."""
    assert only_problem('{"gold": 1, "gold": 50}') == "duplicate key 'gold' in a JSON object"


def test_too_many_tiers() -> None:
    problems = problems_of({f"t{i}": 1 for i in range(MAX_TIERS + 1)})
    assert problems == [f"too many tiers: {MAX_TIERS + 1} (at most {MAX_TIERS})"]
    assert len(parse_tier_config({f"t{i}": 1 for i in range(MAX_TIERS)}).tiers) == MAX_TIERS


@pytest.mark.parametrize(
    ("doc", "start"),
    [
        ({"tiers": {}}, "tiers: at least one tier is required"),
        ({"tiers": [1]}, "tiers: must be an object, got array"),
        ({"version": 3}, "tiers: missing"),
        ({"default_chain": ["gold"], "gold": 1}, "unknown key 'gold' (expected tiers"),
        ({"tiers": {"gold": 1}, "version": -1}, "version: must be >= 0, got -1"),
        ({"tiers": {"gold": 1}, "version": "3"}, "version: must be an integer, got string"),
        ({"tiers": {"gold": 1}, "defualt_chain": []}, "unknown key 'defualt_chain'"),
    ],
)
def test_structured_envelope_problems(doc: dict[str, Any], start: str) -> None:
    assert problems_of(doc)[0].startswith(start)


def test_version_argument_is_checked() -> None:
    assert only_problem('{"gold": 1}', version=-2) == "version: must be >= 0, got -2"


def test_every_problem_is_named_at_once() -> None:
    problems = problems_of(
        {
            "tiers": {
                "gold": {"type": "premium", "target": -1},
                "bad name": 1,
                "basic": {"type": "shared", "max_concurrent": 99_999, "zone": "x"},
            },
            "default_chain": ["gold", "platinum", "gold"],
            "version": -1,
        }
    )
    assert problems == [
        "tier 'gold': unknown type 'premium' (expected exclusive or shared)",
        "tier 'gold': target must be >= 0, got -1",
        "tier 'bad name': name must be 1-64 chars of [A-Za-z0-9._-] "
        "(tier names go into Redis keys)",
        "tier 'basic': max_concurrent must be <= 10000, got 99999",
        "tier 'basic': zone must be restricted or open, got 'x'",
        "default_chain: names unknown tier 'platinum'",
        "default_chain: lists 'gold' twice",
        "version: must be >= 0, got -1",
    ]


def test_lenient_mode_ignores_unknown_keys() -> None:
    """For reading back a config a newer tierpool wrote during a rolling upgrade."""
    doc = {"tiers": {"gold": {"target": 1, "weight": 3}}, "default_chain": ["gold"], "new": 1}
    assert len(problems_of(doc)) == 2
    cfg = parse_tier_config(doc, strict=False)
    assert cfg.tier("gold").target == 1
    # Lenient about unknown keys only: a bad value is still an error.
    assert problems_of({"gold": {"target": -1, "weight": 3}}, strict=False) == [
        "tier 'gold': target must be >= 0, got -1"
    ]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(TierConfigError, match="capability must be 1-5"):
        Tier(name="gold", type="exclusive", target=1, max_concurrent=1, capability=7)
    with pytest.raises(TierConfigError, match="not possible for an exclusive"):
        Tier(name="gold", type="exclusive", target=1, max_concurrent=2)
    with pytest.raises(TierConfigError, match="max_concurrent must be >= 1 for a shared"):
        Tier(name="gold", type="shared", target=1, max_concurrent=0)
    gold = Tier(name="gold", type="exclusive", target=1, max_concurrent=1)
    with pytest.raises(TierConfigError, match="names unknown tier 'std'"):
        TierConfig(version=1, tiers=(gold,), default_chain=("gold", "std"))
    with pytest.raises(TierConfigError, match="'gold': defined twice"):
        TierConfig(version=1, tiers=(gold, gold), default_chain=("gold",))
    with pytest.raises(TierConfigError, match="at least one tier"):
        TierConfig(version=1, tiers=(), default_chain=())
    with pytest.raises(TierConfigError, match="default_chain: must name at least one tier"):
        TierConfig(version=1, tiers=(gold,), default_chain=())
    with pytest.raises(TierConfigError, match="version: must be >= 0"):
        TierConfig(version=-1, tiers=(gold,), default_chain=("gold",))


# --- canonical form ----------------------------------------------------------------


def test_canonical_json_is_structured_sorted_and_explicit() -> None:
    text = to_json(parse_tier_config('{"std": 2, "gold": 1}', version=3))
    assert text == (
        '{"default_chain":["gold","std"],"tiers":{'
        '"gold":{"capability":1,"max_concurrent":1,"target":1,"type":"exclusive","zone":"open"},'
        '"std":{"capability":1,"max_concurrent":1,"target":2,"type":"exclusive","zone":"open"}},'
        '"version":3}'
    )


def test_round_trip_of_the_canonical_form() -> None:
    for cfg in (default_tier_config(5), parse_tier_config(PRODUCTION_FLAT, version=2)):
        assert parse_tier_config(to_json(cfg)) == cfg
        assert parse_tier_config(to_wire_dict(cfg)) == cfg
        assert to_json(parse_tier_config(to_json(cfg))) == to_json(cfg)


def test_wire_dict_is_plain_json_data() -> None:
    wire = to_wire_dict(default_tier_config())
    assert json.loads(json.dumps(wire)) == wire
    assert wire["default_chain"] == ["gold", "standard", "overflow"]
    assert wire["tiers"]["gold"]["type"] == "exclusive"


_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=64,
)


@st.composite
def tier_configs(draw: st.DrawFn) -> TierConfig:
    names = draw(st.lists(_names, min_size=1, max_size=12, unique=True))
    tiers = []
    for name in names:
        shared = draw(st.booleans())
        tiers.append(
            Tier(
                name=name,
                type="shared" if shared else "exclusive",
                target=draw(st.integers(0, 100_000)),
                max_concurrent=draw(st.integers(1, 10_000)) if shared else 1,
                zone=draw(st.sampled_from(["open", "restricted"])),
                capability=draw(st.integers(1, 5)),
            )
        )
    chain = draw(
        st.permutations(names).flatmap(lambda p: st.integers(1, len(p)).map(lambda n: tuple(p[:n])))
    )
    return TierConfig(version=draw(st.integers(0, 2**53)), tiers=tuple(tiers), default_chain=chain)


@given(tier_configs())
def test_round_trip_property(cfg: TierConfig) -> None:
    assert parse_tier_config(to_json(cfg)) == cfg
    assert parse_tier_config(to_json(cfg).encode()) == cfg
    assert parse_tier_config(to_wire_dict(cfg)) == cfg
    chain = set(cfg.default_chain)
    assert set(cfg.pools) == {t.name for t in cfg.tiers}
    assert cfg.pools[: len(cfg.default_chain)] == cfg.default_chain
    assert dedicated_pools(cfg) == {t.name for t in cfg.tiers} - chain
