"""``tierpool config get|set|validate`` and ``tierpool merchant get|set|remove``.

``set`` and ``remove`` go through the config stream (the client library) and
wait for the reply, so every worker applies the change the same way and the
audit log records it: ``applied`` exits 0, ``conflict`` (``--expected-version``
did not match) and ``invalid`` exit 1 with the reason. A config file is
validated locally first, so a typo is reported at once, every problem of it,
without a round trip. ``validate`` never touches Redis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

import msgspec

from tierpool.core.errors import TierConfigError
from tierpool.core.tierconfig import TierConfig, parse_tier_config, to_wire_dict
from tierpool.schemas import MerchantPolicy
from tierpool.workers.ops.common import (
    EXIT_FAILED,
    EXIT_OK,
    Ops,
    add_common,
    error,
    run,
    table,
    write,
    write_json,
)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    if name == "config":
        get = sub.add_parser("get", help="print the tier config in force")
        add_common(get)
        put = sub.add_parser("set", help="replace the tier config (waits for the reply)")
        add_common(put, timeout=True)
        put.add_argument("file", metavar="FILE", help="JSON tier config ('-' = stdin)")
        put.add_argument(
            "--expected-version",
            type=int,
            metavar="N",
            help="apply only if the config in force is version N",
        )
        check = sub.add_parser("validate", help="check a tier config file locally")
        check.add_argument("file", metavar="FILE", help="JSON tier config ('-' = stdin)")
        check.add_argument("--json", action="store_true", help="print JSON for scripts")
    else:
        get = sub.add_parser("get", help="print one merchant's policy, or all")
        add_common(get)
        get.add_argument("merchant_id", nargs="?", metavar="MERCHANT_ID")
        put = sub.add_parser("set", help="set a merchant's policy (waits for the reply)")
        add_common(put, timeout=True)
        put.add_argument("merchant_id", metavar="MERCHANT_ID")
        put.add_argument("--pool", help="the merchant's dedicated pool")
        put.add_argument(
            "--fallback",
            help="comma-separated pools to try after it; '' = the dedicated pool only "
            "(leave it out to use the request's chain or the default chain)",
        )
        put.add_argument("--zone", choices=("any", "restricted"))
        put.add_argument("--min-capability", type=int, choices=range(1, 6), metavar="1-5")
        remove = sub.add_parser("remove", help="remove a merchant's policy")
        add_common(remove, timeout=True)
        remove.add_argument("merchant_id", metavar="MERCHANT_ID")


def main(args: argparse.Namespace) -> int:
    if args._command == "config":
        if args.action == "validate":
            return _validate(args)
        return run(args, _config_get if args.action == "get" else _config_set)
    return run(args, _merchant_get if args.action == "get" else _merchant_change)


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


def _parse(args: argparse.Namespace) -> tuple[str, TierConfig | None, list[str]]:
    """The file's text, and its config or every problem with it."""
    try:
        text = _read(args.file)
    except OSError as exc:
        return "", None, [f"cannot read {args.file}: {exc.strerror or exc}"]
    try:
        return text, parse_tier_config(text, empty_is_default=False), []
    except TierConfigError as exc:
        return text, None, exc.problems


def describe_config(cfg: TierConfig) -> str:
    rows = [
        [t.name, t.type, t.target, t.max_concurrent, t.zone, t.capability]
        for t in (cfg.tier(n) for n in cfg.pools)
    ]
    return "\n".join(
        [
            table(["TIER", "TYPE", "TARGET", "MAX CONCURRENT", "ZONE", "CAPABILITY"], rows),
            "",
            "default chain: " + (" > ".join(cfg.default_chain) or "(empty)"),
        ]
    )


def _validate(args: argparse.Namespace) -> int:
    _text, cfg, problems = _parse(args)
    if args.json:
        write_json(
            {
                "valid": cfg is not None,
                "problems": problems,
                "config": to_wire_dict(cfg) if cfg else None,
            }
        )
    elif cfg is None:
        error("config validate", f"{args.file}: {len(problems)} problem(s)")
        for problem in problems:
            write(f"  - {problem}")
    else:
        write(f"{args.file}: valid, {len(cfg.pools)} tiers")
        write(describe_config(cfg))
    return EXIT_OK if cfg is not None else EXIT_FAILED


async def _config_get(ops: Ops) -> int:
    raw = await ops.redis.get(ops.keys.config)
    if raw is None:
        error("config get", "no tier config is stored yet (a worker stores TIER_CONFIG at start)")
        return EXIT_FAILED
    doc = msgspec.json.decode(raw)
    if ops.json:
        write_json(doc)
        return EXIT_OK
    cfg = parse_tier_config(raw, version=int(doc.get("version") or 0), strict=False)
    write(f"tier config version {cfg.version}")
    write(describe_config(cfg))
    return EXIT_OK


async def _config_set(ops: Ops) -> int:
    args = ops.args
    text, cfg, problems = _parse(args)
    if cfg is None:
        error("config set", f"{args.file}: not sent, {len(problems)} problem(s)")
        for problem in problems:
            sys.stderr.write(f"  - {problem}\n")
        return EXIT_FAILED
    stored = cast("dict[str, str]", await ops.redis.hgetall(ops.keys.merchants))
    for merchant, pools in sorted(policy_pools(stored).items()):
        dropped = sorted(p for p in pools if p not in cfg)
        if dropped:
            error(
                "config set",
                f"warning: merchant {merchant!r}'s policy names {', '.join(dropped)}, which "
                "this config drops; its calls will not find that pool",
            )
    from tierpool.workers.ops.client import reply_doc, tierpool_client

    async with tierpool_client(ops) as client:
        reply = await client.change_config(text, expected_version=args.expected_version)
    return _report(ops, reply_doc(reply), "applied")


def policy_pools(stored: dict[str, str]) -> dict[str, set[str]]:
    """The pools each stored merchant policy names (dedicated and fallback)."""
    out: dict[str, set[str]] = {}
    for merchant, raw in stored.items():
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            continue  # an unreadable policy is reported by `merchant get`, not here
        if isinstance(doc, dict):
            names = [doc.get("pool"), *(doc.get("fallback") or [])]
            out[merchant] = {n for n in names if isinstance(n, str)}
    return out


def _report(ops: Ops, doc: dict[str, Any], success: str) -> int:
    if ops.json:
        write_json(doc)
    elif doc.get("status") == success:
        if doc.get("merchants_version") is not None:  # a policy change: the tier config stays
            write(f"{success}: merchant policies version {doc['merchants_version']}")
        else:
            version = doc.get("config_version")
            write(f"{success}" + (f": config version {version}" if version is not None else ""))
    else:
        status = doc.get("status")
        detail = doc.get("error") or ""
        if status == "conflict" and not detail:
            detail = (
                f"the config in force is version {doc.get('config_version')}, "
                f"not --expected-version {ops.args.expected_version}"
            )
        error(ops.args._command + " " + ops.args.action, f"{status}: {detail}".rstrip(": "))
    return EXIT_OK if doc.get("status") == success else EXIT_FAILED


async def _merchant_get(ops: Ops) -> int:
    merchant_id = ops.args.merchant_id
    if merchant_id:
        raw = await ops.redis.hget(ops.keys.merchants, merchant_id)
        policies = {merchant_id: msgspec.json.decode(raw)} if raw else {}
        if not policies:
            error("merchant get", f"merchant {merchant_id!r} has no policy")
            return EXIT_FAILED
    else:
        stored = await ops.redis.hgetall(ops.keys.merchants)
        policies = {m: msgspec.json.decode(p) for m, p in sorted(stored.items())}
    if ops.json:
        write_json(policies)
        return EXIT_OK
    if not policies:
        write("no merchant policies")
        return EXIT_OK
    write(
        table(
            ["MERCHANT", "POOL", "FALLBACK", "ZONE", "MIN CAPABILITY"],
            [
                [
                    m,
                    p.get("pool"),
                    fallback_text(p),
                    p.get("zone"),
                    p.get("min_capability"),
                ]
                for m, p in policies.items()
            ],
        )
    )
    return EXIT_OK


def fallback_text(policy: dict[str, Any]) -> str:
    """How a stored policy's fallback reads: absent and empty mean different things."""
    if "fallback" not in policy or policy["fallback"] is None:
        return "(request's chain or default chain)"
    return ",".join(policy["fallback"]) or "(none: dedicated pool only)"


def build_policy(args: argparse.Namespace) -> tuple[MerchantPolicy, list[str]]:
    """The policy ``merchant set`` asks for, and every problem of its syntax.

    The worker checks a policy too, but msgspec stops at the first error; an
    operator fixing a command line wants them all in one go.
    """
    from tierpool.schemas.fields import MAX_POOLS_IN_LIST, NAME_RULE

    problems: list[str] = []
    fallback: tuple[str, ...] | None = None
    if args.fallback is not None:
        fallback = tuple(p.strip() for p in args.fallback.split(",") if p.strip())
        if len(fallback) > MAX_POOLS_IN_LIST:
            problems.append(f"--fallback: at most {MAX_POOLS_IN_LIST} pools")
        dups = sorted({p for p in fallback if fallback.count(p) > 1})
        if dups:
            problems.append(f"--fallback: {', '.join(dups)} listed more than once")
    for option, name in [("--pool", args.pool), *(("--fallback", p) for p in fallback or ())]:
        if name is not None and not valid_name(name):
            problems.append(f"{option}: {name!r} is not a pool name ({NAME_RULE})")
    # What is left once the bad names are taken out: still checked against the
    # config in force, so the operator hears of every problem in one go.
    pool = args.pool if args.pool is not None and valid_name(args.pool) else None
    if fallback is not None:
        fallback = tuple(dict.fromkeys(p for p in fallback if valid_name(p)))
    policy = MerchantPolicy(
        pool=pool, fallback=fallback, zone=args.zone, min_capability=args.min_capability
    )
    return policy, problems


def valid_name(name: str) -> bool:
    from tierpool.schemas.fields import NAME_RE

    return NAME_RE.match(name) is not None


async def _merchant_change(ops: Ops) -> int:
    args = ops.args
    policy: MerchantPolicy | None = None
    if args.action == "set":
        policy, problems = build_policy(args)
        problems += await policy_problems_now(ops, args.merchant_id, policy)
        if problems:
            error("merchant set", f"not sent, {len(problems)} problem(s)")
            for problem in problems:
                sys.stderr.write(f"  - {problem}\n")
            return EXIT_FAILED
    from tierpool.workers.ops.client import reply_doc, tierpool_client

    async with tierpool_client(ops) as client:
        reply = await client.set_merchant(args.merchant_id, policy)
    return _report(ops, reply_doc(reply), "applied")


async def policy_problems_now(ops: Ops, merchant_id: str, policy: MerchantPolicy) -> list[str]:
    """Every reason the workers would refuse ``policy`` against the config in Redis now."""
    from tierpool.core.snapshot import read_snapshot
    from tierpool.core.state import merchant_policy_problems
    from tierpool.core.tierconfig import default_tier_config

    snap = await read_snapshot(ops.redis, ops.keys, default_tier_config(0))
    if snap is None:
        return []  # no config yet: the workers decide against the one they store
    return merchant_policy_problems(merchant_id, policy, snap)
