"""The tier config: which pools exist, how they are shared, and the default chain.

Same meaning as the anchor's ``TIER_CONFIG`` (digest §0, seed 003), so an
existing deployment's value carries over unchanged. Three JSON formats are
accepted, recognised in this order:

1. **structured**: ``{"tiers": {NAME: SPEC, ...}, "default_chain": [...], "version": N}``.
   A document with any of the keys ``tiers``, ``default_chain`` or
   ``version`` is read as this format (so those three words cannot name a
   tier in the other two formats; the structured format can still use them).
2. **flat**: ``{NAME: {"type": "exclusive", "target": 1, ...}, ...}``.
3. **integer map**: ``{NAME: TARGET, ...}``: exclusive tiers with a target.

A SPEC is an object (``type``, ``target``, ``max_concurrent``, ``zone``,
``capability``) or a bare integer target, in every format; the anchor
rejected a document mixing the two, we accept it because each value means
the same either way.

Normalisation, as in the anchor: a missing (or empty) type is exclusive; a
shared tier's missing or zero ``max_concurrent`` is 5; an exclusive tier's is 1;
a missing target is 0. A missing chain is built as the exclusive tiers sorted
by name, then the shared ones sorted. An empty document is the built-in
default (gold 10, standard 20, overflow 5, all exclusive).

Where we differ from the anchor, on purpose: every problem is reported at
once in a :class:`~core.errors.TierConfigError` instead of being repaired in
silence. A chain naming an unknown tier, or naming one twice, is an error
(the anchor dropped the names and rebuilt the chain); so are an unknown type,
a negative or absurd count, an exclusive tier with ``max_concurrent`` above 1
(it would never be honoured), a tier name that cannot go into a Redis key,
and (by default) an unknown key, which is usually a typo such as
``max_concurent`` that would otherwise fall back to a default unnoticed.

Everything here is pure: no Redis, no clock, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Final, Literal

import msgspec

from tierpool.core.errors import TierConfigError
from tierpool.schemas.fields import NAME_RE, NAME_RULE

TierType = Literal["exclusive", "shared"]
Zone = Literal["restricted", "open"]

TIER_TYPES: Final = ("exclusive", "shared")
ZONES: Final = ("restricted", "open")

DEFAULT_SHARED_MAX_CONCURRENT: Final = 5
"""A shared tier's ``max_concurrent`` when it is missing or 0 (the anchor's default)."""
MAX_CONCURRENT_LIMIT: Final = 10_000
"""Above this a ``max_concurrent`` is a typo, not a pod."""
MAX_TARGET: Final = 100_000
"""Above this a ``target`` is a typo: no pool has that many pods."""
MAX_TIERS: Final = 256
"""Every request script receives the whole pool table, so it must stay small."""
MIN_CAPABILITY: Final = 1
MAX_CAPABILITY: Final = 5

_STRUCTURED_KEYS: Final = ("tiers", "default_chain", "version")
_SPEC_KEYS: Final = ("type", "target", "max_concurrent", "zone", "capability")


class Tier(msgspec.Struct, frozen=True, kw_only=True):
    """One pool of pods.

    ``zone`` is the zone a pod must meet to join this tier: a ``restricted``
    pod meets both ``restricted`` and ``open``, an ``open`` pod meets only
    ``open``. So a ``restricted`` tier holds only restricted pods, and a
    request asking for ``zone=restricted`` can be served from it safely.

    ``capability`` (1-5) is the least pod capability this tier accepts, and
    it is the capability the pool offers: a request with ``min_capability``
    N is placed only on pools whose ``capability`` is at least N.

    ``max_concurrent`` is the number of live calls a pod of this tier may
    hold: always 1 for an exclusive tier. Constructing a ``Tier`` checks all
    of this and raises :class:`~core.errors.TierConfigError`, so no invalid
    tier exists anywhere in the program.
    """

    name: str
    type: TierType
    target: int
    max_concurrent: int
    zone: Zone = "open"
    capability: int = 1

    def __post_init__(self) -> None:
        problems = _tier_problems(
            self.name, self.type, self.target, self.max_concurrent, self.zone, self.capability
        )
        if problems:
            raise TierConfigError(problems)

    @property
    def shared(self) -> bool:
        return self.type == "shared"


class TierConfig(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """A validated, immutable tier config: one version of the namespace's pools.

    ``tiers`` is kept sorted by name whatever order it was given in, so two
    configs with the same content compare and hash equal, and the canonical
    JSON (sorted keys) parses back to an equal value. ``default_chain`` is the
    order in which pools are tried when a request names no chain.
    """

    version: int
    tiers: tuple[Tier, ...]
    default_chain: tuple[str, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.tiers, key=lambda t: t.name))
        if ordered != self.tiers:
            msgspec.structs.force_setattr(self, "tiers", ordered)
        problems = _version_problems(self.version)
        seen: set[str] = set()
        for tier in ordered:
            if tier.name in seen:
                problems.append(f"tier {tier.name!r}: defined twice")
            seen.add(tier.name)
        if not ordered:
            problems.append("tiers: at least one tier is required")
        if len(ordered) > MAX_TIERS:
            problems.append(f"too many tiers: {len(ordered)} (at most {MAX_TIERS})")
        problems += _chain_problems(list(self.default_chain), seen)
        if not self.default_chain and ordered:
            problems.append("default_chain: must name at least one tier")
        if problems:
            raise TierConfigError(problems)

    @cached_property
    def _by_name(self) -> dict[str, Tier]:
        return {t.name: t for t in self.tiers}

    def tier(self, name: str) -> Tier:
        """The tier called ``name``; :class:`KeyError` if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tier {name!r} in config version {self.version}") from None

    def get(self, name: str) -> Tier | None:
        """The tier called ``name``, or ``None``."""
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def is_shared(self, name: str) -> bool:
        """Whether ``name`` is a configured shared tier (an unknown name is not)."""
        tier = self._by_name.get(name)
        return tier is not None and tier.shared

    @cached_property
    def pools(self) -> tuple[str, ...]:
        """Every tier name in a stable order: the chain first, then the others sorted.

        This is the order of the pool table handed to the Lua scripts, so it
        must not depend on dict or set iteration order.
        """
        in_chain = set(self.default_chain)
        return self.default_chain + tuple(t.name for t in self.tiers if t.name not in in_chain)

    def with_version(self, version: int) -> TierConfig:
        """The same tiers and chain under another version (when a change is applied)."""
        return TierConfig(version=version, tiers=self.tiers, default_chain=self.default_chain)


def pod_may_join(tier: Tier, pod_zone: Zone, pod_capability: int) -> bool:
    """Whether a pod of ``pod_zone`` and ``pod_capability`` may be assigned to ``tier``.

    A restricted pod meets both zones; an open pod only ``open``. The pod's
    capability must be at least the tier's, so a pool never offers more than
    its pods can do. An unknown zone is a programming error (messages are
    validated at the edge), so it raises :class:`ValueError`.
    """
    if pod_zone not in ZONES:
        raise ValueError(f"unknown pod zone {pod_zone!r} (expected restricted or open)")
    zone_ok = pod_zone == "restricted" or tier.zone == "open"
    return zone_ok and pod_capability >= tier.capability


def default_tier_config(version: int = 0) -> TierConfig:
    """The anchor's built-in config: gold 10, standard 20, overflow 5, all exclusive.

    Its chain is given, not built: built would sort ``overflow`` before
    ``standard``.
    """
    return TierConfig(
        version=version,
        tiers=(
            Tier(name="gold", type="exclusive", target=10, max_concurrent=1),
            Tier(name="standard", type="exclusive", target=20, max_concurrent=1),
            Tier(name="overflow", type="exclusive", target=5, max_concurrent=1),
        ),
        default_chain=("gold", "standard", "overflow"),
    )


EMPTY_REFUSED = (
    "the config is empty: applying it would replace the config in force with the "
    "built-in default; send the tiers you want (the default is printed by "
    "`tierpool config get` on a fresh namespace)"
)


def parse_tier_config(
    raw: str | bytes | Mapping[str, Any],
    *,
    version: int | None = None,
    strict: bool = True,
    empty_is_default: bool = True,
) -> TierConfig:
    """Read a tier config in any of the three formats (see the module docstring).

    ``version`` overrides the document's own ``version`` (the applier of a
    change decides the next version, not the operator); without either it
    is 0. ``strict=False`` ignores unknown keys instead of rejecting them,
    for reading back a config that a newer tierpool wrote during a rolling
    upgrade; operator input should stay strict. An empty document means the
    built-in default where a deployment may leave ``TIER_CONFIG`` unset;
    ``empty_is_default=False`` refuses it, for a change sent to a live
    namespace, where ``{}`` is far more likely a mistake than a wish to
    drop every configured pool.

    Raises :class:`~core.errors.TierConfigError` listing every problem.
    """
    problems: list[str] = []
    if version is not None:
        problems += _version_problems(version)

    doc: object
    if isinstance(raw, str | bytes):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            problems.append(f"not valid JSON: {exc}")
            raise TierConfigError(problems) from None
        if not text.strip():
            doc = {}
        else:
            doc, json_problems = _load_json(text)
            problems += json_problems
            if doc is None and json_problems:  # nothing to look into
                raise TierConfigError(problems)
    else:
        doc = raw

    if not isinstance(doc, Mapping):
        problems.append(f"top level must be a JSON object, got {_json_type(doc)}")
        raise TierConfigError(problems)

    if not doc:
        if not empty_is_default:
            problems.append(EMPTY_REFUSED)
        if problems:
            raise TierConfigError(problems)
        return default_tier_config(version if version is not None else 0)

    chain_value: object = None
    doc_version: object = None
    if any(key in doc for key in _STRUCTURED_KEYS):
        if strict:
            for key in doc:
                if key not in _STRUCTURED_KEYS:
                    problems.append(f"unknown key {key!r} (expected tiers, default_chain, version)")
        specs: object = doc.get("tiers")
        chain_value = doc.get("default_chain")
        doc_version = doc.get("version")
        if specs is None:
            problems.append(
                "tiers: missing (a document with default_chain or version "
                'must list its tiers under "tiers")'
            )
            specs = {}
        elif not isinstance(specs, Mapping):
            problems.append(f"tiers: must be an object, got {_json_type(specs)}")
            specs = {}
        elif not specs:
            problems.append(
                "tiers: at least one tier is required "
                "(an empty document means the built-in default)"
            )
    else:
        specs = doc
    assert isinstance(specs, Mapping)

    if len(specs) > MAX_TIERS:
        problems.append(f"too many tiers: {len(specs)} (at most {MAX_TIERS})")

    tiers: list[Tier] = []
    for name, spec in specs.items():
        tier, tier_problems = _read_tier(name, spec, strict)
        problems += tier_problems
        if tier is not None:
            tiers.append(tier)

    chain: tuple[str, ...] = ()
    if chain_value is not None:
        if isinstance(chain_value, list | tuple):
            names = list(chain_value)
            problems += _chain_problems(names, set(specs))
            chain = tuple(n for n in names if isinstance(n, str))
        else:
            problems.append(
                f"default_chain: must be an array of tier names, got {_json_type(chain_value)}"
            )

    if version is None and doc_version is not None:
        problems += _version_problems(doc_version)

    if problems:
        raise TierConfigError(problems)

    if not chain:  # absent or [], as in the anchor: build it
        chain = _build_chain(tiers)
    final_version = version if version is not None else doc_version
    assert final_version is None or isinstance(final_version, int)
    return TierConfig(version=final_version or 0, tiers=tuple(tiers), default_chain=chain)


def to_wire_dict(cfg: TierConfig) -> dict[str, Any]:
    """The structured form as plain JSON-ready data, every field explicit.

    Explicit types and counts mean a reader never depends on our defaults,
    which may change; ``parse_tier_config(to_wire_dict(c)) == c``.
    """
    return {
        "version": cfg.version,
        "default_chain": list(cfg.default_chain),
        "tiers": {
            t.name: {
                "type": t.type,
                "target": t.target,
                "max_concurrent": t.max_concurrent,
                "zone": t.zone,
                "capability": t.capability,
            }
            for t in cfg.tiers
        },
    }


def to_json(cfg: TierConfig) -> str:
    """Canonical JSON: structured, sorted keys, no spaces, version included.

    Equal configs give equal strings, so the text in ``tp:{NS}:config`` can be
    compared or hashed directly; ``parse_tier_config(to_json(c)) == c``.
    """
    return msgspec.json.encode(to_wire_dict(cfg), order="sorted").decode()


# --- internals -------------------------------------------------------------


def _build_chain(tiers: Sequence[Tier]) -> tuple[str, ...]:
    """The anchor's chain: exclusive tiers by name, then shared ones by name.

    Exclusive first because a dedicated pod is the better placement; shared
    pools are the last resort.
    """
    exclusive = sorted(t.name for t in tiers if not t.shared)
    shared = sorted(t.name for t in tiers if t.shared)
    return (*exclusive, *shared)


def _read_tier(name: object, spec: object, strict: bool) -> tuple[Tier | None, list[str]]:
    """Normalise one SPEC into a ``Tier``, or say everything wrong with it."""
    label = f"tier {name!r}"
    problems: list[str] = []
    if not isinstance(name, str):  # only from a Mapping built in Python
        return None, [f"{label}: name must be a string"]

    fields: Mapping[str, object]
    if _is_int(spec):
        fields = {"target": spec}
    elif isinstance(spec, Mapping):
        fields = spec
        if strict:
            for key in fields:
                if key not in _SPEC_KEYS:
                    problems.append(
                        f"{label}: unknown key {key!r} (expected {', '.join(_SPEC_KEYS)})"
                    )
    else:
        return None, [
            f"{label}: expected an object or an integer target, got {_json_type(spec)} {spec!r}"
        ]

    type_value = fields.get("type")
    if type_value is None or type_value == "":  # the anchor's normalisation
        type_value = "exclusive"
    target = _int_field(fields, "target", 0, label, problems)
    max_concurrent = _int_field(fields, "max_concurrent", 0, label, problems)
    capability = _int_field(fields, "capability", MIN_CAPABILITY, label, problems)
    zone = fields.get("zone")
    if zone is None:
        zone = "open"

    if type_value == "shared" and max_concurrent == 0:
        max_concurrent = DEFAULT_SHARED_MAX_CONCURRENT
    elif type_value == "exclusive" and max_concurrent == 0:
        max_concurrent = 1

    problems += _tier_problems(name, type_value, target, max_concurrent, zone, capability)
    if problems:
        return None, problems
    return (
        Tier(
            name=name,
            type=type_value,  # type: ignore[arg-type]  # checked just above
            target=target,
            max_concurrent=max_concurrent,
            zone=zone,  # type: ignore[arg-type]
            capability=capability,
        ),
        [],
    )


def _int_field(
    fields: Mapping[str, object], key: str, default: int, label: str, problems: list[str]
) -> int:
    """An integer field; null or missing is ``default``; a non-integer is a problem."""
    value = fields.get(key)
    if value is None:
        return default
    if not _is_int(value):
        problems.append(f"{label}: {key} must be an integer, got {_json_type(value)} {value!r}")
        return default
    assert isinstance(value, int)
    return value


def _tier_problems(
    name: str, type_: object, target: int, max_concurrent: int, zone: object, capability: int
) -> list[str]:
    """Every rule a normalised tier must keep; shared by parsing and ``Tier()``."""
    label = f"tier {name!r}"
    problems: list[str] = []
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(f"{label}: name must be {NAME_RULE} (tier names go into Redis keys)")
    if type_ not in TIER_TYPES:
        problems.append(f"{label}: unknown type {type_!r} (expected exclusive or shared)")
    if target < 0:
        problems.append(f"{label}: target must be >= 0, got {target}")
    elif target > MAX_TARGET:
        problems.append(f"{label}: target must be <= {MAX_TARGET}, got {target}")
    if max_concurrent < 0:
        problems.append(f"{label}: max_concurrent must be >= 0, got {max_concurrent}")
    elif max_concurrent > MAX_CONCURRENT_LIMIT:
        problems.append(
            f"{label}: max_concurrent must be <= {MAX_CONCURRENT_LIMIT}, got {max_concurrent}"
        )
    elif type_ == "exclusive" and max_concurrent != 1:
        problems.append(
            f"{label}: max_concurrent {max_concurrent} is not possible for an exclusive "
            "tier, which holds one call per pod (use type shared)"
        )
    elif type_ == "shared" and max_concurrent == 0:
        problems.append(f"{label}: max_concurrent must be >= 1 for a shared tier")
    if zone not in ZONES:
        problems.append(f"{label}: zone must be restricted or open, got {zone!r}")
    if not MIN_CAPABILITY <= capability <= MAX_CAPABILITY:
        problems.append(
            f"{label}: capability must be {MIN_CAPABILITY}-{MAX_CAPABILITY}, got {capability}"
        )
    return problems


def _chain_problems(names: Sequence[object], known: set[str]) -> list[str]:
    """Unknown, repeated or non-string chain entries (the anchor dropped them silently)."""
    problems: list[str] = []
    seen: set[str] = set()
    for entry in names:
        if not isinstance(entry, str):
            problems.append(
                f"default_chain: entries must be tier names, got {_json_type(entry)} {entry!r}"
            )
            continue
        if entry not in known:
            problems.append(f"default_chain: names unknown tier {entry!r}")
        elif entry in seen:
            problems.append(f"default_chain: lists {entry!r} twice")
        seen.add(entry)
    return problems


def _version_problems(version: object) -> list[str]:
    if not _is_int(version):
        return [f"version: must be an integer, got {_json_type(version)}"]
    assert isinstance(version, int)
    if version < 0:
        return [f"version: must be >= 0, got {version}"]
    return []


def _load_json(text: str) -> tuple[object, list[str]]:
    """Decode JSON, reporting repeated keys.

    The one use of the standard library's ``json``: msgspec, the project's JSON
    library, keeps the last of a repeated key silently and has no hook to see
    it, and an operator's config with a pool written twice must be refused.
    """
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in items:
            if key in out:
                duplicates.append(f"duplicate key {key!r} in a JSON object")
            out[key] = value
        return out

    try:
        doc = json.loads(text, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except ValueError as exc:
        return None, [f"not valid JSON: {exc}"]
    return doc, duplicates


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: object) -> bool:
    """A JSON integer: Python ``bool`` is an ``int`` but ``true`` is not a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    """The JSON name of a value's type, for messages an operator reads."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def read_anchor_tier_config(
    raw: str | bytes, *, version: int | None = None
) -> tuple[TierConfig, tuple[str, ...]]:
    """Read a config smart-router accepted, and say what tierpool reads differently.

    For ``TIER_CONFIG`` and the anchor's ``voice:tier:config``: a value that
    ran the anchor must start tierpool, not stop it. Three things the strict
    reading refuses are read as the anchor read them, each with a note (to
    be logged as a warning): an unknown key is ignored; an exclusive tier's
    ``max_concurrent`` above 1 is read as 1 (the anchor never put two calls
    on an exclusive pod either); a chain entry naming no tier, or repeating
    one, is dropped (an empty chain is then built). Anything else wrong is
    still a :class:`~core.errors.TierConfigError`.

    Operator input (``tierpool config set``, the config stream) stays strict:
    there a typo is better refused than read around.
    """
    notes: list[str] = []
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    doc, json_problems = _load_json(text) if text.strip() else ({}, [])
    if json_problems or not isinstance(doc, dict):
        return parse_tier_config(raw, version=version), ()  # raises, or the default
    if any(key in doc for key in _STRUCTURED_KEYS):
        for key in [k for k in doc if k not in _STRUCTURED_KEYS]:
            notes.append(
                f"key {key!r} ignored (not a tier config key; smart-router ignored it too)"
            )
            del doc[key]
        specs = doc.get("tiers")
    else:
        specs = doc
    if isinstance(specs, dict):
        for name, spec in specs.items():
            if isinstance(spec, dict):
                notes += _loosen_spec(str(name), spec)
        chain = doc.get("default_chain")
        if isinstance(chain, list):
            kept: list[object] = []
            for entry in chain:
                if isinstance(entry, str) and (entry not in specs or entry in kept):
                    why = "names no tier" if entry not in specs else "repeats a tier"
                    notes.append(
                        f"default_chain entry {entry!r} dropped: it {why}, as smart-router did"
                    )
                else:
                    kept.append(entry)
            if kept:
                doc["default_chain"] = kept
            else:
                del doc["default_chain"]
                notes.append("default_chain had no usable entry: built from the tiers instead")
    return parse_tier_config(doc, version=version), tuple(notes)


def _loosen_spec(name: str, spec: dict[str, object]) -> list[str]:
    """Fix one tier SPEC in place as the anchor read it; the notes saying what changed."""
    notes: list[str] = []
    for key in [k for k in spec if k not in _SPEC_KEYS]:
        notes.append(f"tier {name!r}: key {key!r} ignored (smart-router ignored it too)")
        del spec[key]
    kind = spec.get("type")
    mc = spec.get("max_concurrent")
    if kind in (None, "", "exclusive") and _is_int(mc) and isinstance(mc, int) and mc > 1:
        notes.append(
            f"tier {name!r}: max_concurrent {mc} read as 1: an exclusive pod holds one call "
            "(smart-router never gave it more either; use type shared for several)"
        )
        spec["max_concurrent"] = 1
    return notes
