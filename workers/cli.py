"""The ``tierpool`` command: one entry point, one subcommand per role.

Each subcommand lives in its own module and is imported only when used, so
``tierpool status`` does not pay for the worker's imports. Exit codes that
scripts can use: 0 ok, 1 the operation failed or was refused, 2 bad usage or
settings, 3 Redis unreachable, 4 timed out waiting for a reply.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REDIS, EXIT_TIMEOUT = 0, 1, 2, 3, 4

# subcommand -> (module, help). Each module has ``add_arguments(parser)`` and
# ``main(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "worker": (
        "tierpool.workers.worker",
        "run one worker process (consumer, claimer, leader candidate)",
    ),
    "gateway": (
        "tierpool.gateway.server",
        "serve the anchor's HTTP API (JSON and Twilio/Plivo/Exotel webhooks) on HTTP_PORT",
    ),
    "run": ("tierpool.workers.embedded", "run a private Redis, workers, simulated pods and load"),
    "bench": ("tierpool.bench.run", "measure throughput, latency, propagation, failover"),
    "status": (
        "tierpool.workers.ops.status",
        "pools, targets, capacity, leader, config, stream lag",
    ),
    "pods": ("tierpool.workers.ops.pods", "list pods with pool, state and calls"),
    "config": ("tierpool.workers.ops.config", "get, set or validate the tier config"),
    "merchant": ("tierpool.workers.ops.config", "get, set or remove a merchant policy"),
    "drain": ("tierpool.workers.ops.requests", "drain a pod (no new calls)"),
    "undrain": ("tierpool.workers.ops.requests", "return a drained pod to service"),
    "allocate": ("tierpool.workers.ops.requests", "allocate a call (for testing)"),
    "release": ("tierpool.workers.ops.requests", "release a call (for testing)"),
    "events": ("tierpool.workers.ops.events", "show the audit log (--follow to tail it)"),
    "dead": ("tierpool.workers.ops.dead", "list dead letters, or requeue them"),
    "pod-sim": ("tierpool.workers.podsim", "simulate pods that register and heartbeat"),
    "acl": ("tierpool.workers.ops.acl", "print the Redis ACL users of each role (ACL SETUSER)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its options.

    Importing every subcommand's module just to print ``--help`` made each
    ``tierpool`` call pay for the worker's imports (~1.3 s).
    """
    parser = argparse.ArgumentParser(
        prog="tierpool",
        description="Places live sessions on pods from tiered pools, over Redis Streams.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _command=name)
        if name != command:
            continue
        mod = importlib.import_module(module)
        add = getattr(mod, "add_arguments", None)
        if add is not None:
            add(p, name)
    return parser


GLOBAL_OPTIONS = {"--redis-url": True, "--namespace": True, "-n": True, "--json": False}
"""Options every Redis-facing command takes, that may also come before the command
(``tierpool --namespace eu status``); True when the option takes a value."""


def hoist_global_options(argv: Sequence[str]) -> list[str]:
    """Move the common options written before the subcommand to after it.

    argparse only knows them on each subcommand; an operator writes them
    first as often as last. A subcommand that does not take one refuses it
    by name, as it would after the command.
    """
    before: list[str] = []
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        name = rest[0].split("=", 1)[0]
        if name not in GLOBAL_OPTIONS:
            break
        takes_value = GLOBAL_OPTIONS[name] and "=" not in rest[0]
        count = 2 if takes_value else 1
        before.extend(rest[:count])
        rest = rest[count:]
    if not before or not rest:
        return list(argv)
    return [rest[0], *before, *rest[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    argv = hoist_global_options(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage error (2) or --help (0), as a return code
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    mod = importlib.import_module(args._module)
    code: int = mod.main(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
