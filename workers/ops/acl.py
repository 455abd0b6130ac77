"""``tierpool acl``: the Redis ACL users of contract v1.1 "Access", one line each.

Prints one ``ACL SETUSER`` line per role, for the namespaces given (or
``TIERPOOL_NAMESPACE``), ready for ``redis-cli`` (``tierpool acl | redis-cli``)
or any client that splits a line like a shell. The lines set permissions
only: they carry no password and do not ``reset`` the user, so running them
again after a change keeps the passwords already set. A new user is ``on``
with no password, which no one can log in as until one is added
(``ACL SETUSER tierpool-worker >PASSWORD``).

Why selectors (Redis 7): a plain ACL user has one set of commands and one
set of keys, and may run any of those commands on any of those keys. A
producer must XADD to its request streams and XREAD and DEL its replies;
without selectors the same user could XADD to a reply key (forge a reply)
or DEL a request stream. A selector ``(+xread +del ~tp:{NS}:reply:*)`` ties
the reply commands to the reply keys, while the root permissions tie XADD
to the request streams.

- ``tierpool-worker``: every command but admin and dangerous ones, on the
  namespace's keys and channels, and read access to smart-router's
  ``voice:tier:config`` (adopted once, when a namespace has no config);
  ``INFO`` too (dangerous by Redis's flags: it shows server details, no
  data), for the replication id that tells a failover (``core/epoch.py``);
- ``tierpool-producer``: XADD to ``req:allocate`` and ``req:release``;
  XREAD and DEL on ``reply:*``;
- ``tierpool-pod``: XADD to ``pods`` and ``req:drain`` (the pod agent
  drains itself on shutdown; a pod may deregister any pod through ``pods``
  already, so draining gives it nothing more); XREAD and DEL on ``reply:*``;
- ``tierpool-operator``: the producer's rights, XADD to ``req:config`` and
  ``req:drain``, and read-only commands on every key of the namespace
  (``status``, ``pods``, ``events``, ``dead``...); ``tierpool gateway``
  runs as this role (it drains pods and reads pool state).

Every role may also run the connection commands a client sends on its own
(``HELLO``, ``PING``, ``SELECT``, ``CLIENT SETNAME``/``ID``) and ``TIME``;
the client library's roles may ``CLIENT UNBLOCK`` (its reply reader is
woken that way). Nothing else: no role but the worker writes a reply, pool
state, the config or the audit and dead-letter streams.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Final

from tierpool.core.keys import ANCHOR_CONFIG_KEY, Keys, valid_namespace
from tierpool.core.settings import Settings
from tierpool.workers.ops.common import EXIT_OK, EXIT_USAGE, error, write

ROLES: Final = ("tierpool-worker", "tierpool-producer", "tierpool-pod", "tierpool-operator")

_RESET: Final = ("on", "resetkeys", "resetchannels", "clearselectors", "-@all")
"""Permissions start from nothing each time; passwords are left as they are."""

_CONNECTION: Final = ("+@connection", "-@dangerous", "+time", "+cluster|slots")
"""What a redis-py connection sends by itself, minus CLIENT KILL/LIST/PAUSE and the like;
and, on a Redis Cluster, ``CLUSTER SLOTS`` (which node serves the namespace's slot)."""


def _reply_selector(keys: Sequence[Keys]) -> str:
    patterns = " ".join(f"~{k.reply_prefix}*" for k in keys)
    return f"(+xread +del {patterns})"


def _writes(keys: Sequence[Keys], streams: Sequence[str]) -> list[str]:
    """``%W~`` (write-only) patterns: one may add to a stream, not read others' entries."""
    out: list[str] = []
    for k in keys:
        for stream in streams:
            name = k.pods_stream if stream == "pods" else k.request_stream(stream)
            out.append(f"%W~{name}")
    return out


def acl_rules(namespaces: Sequence[str]) -> dict[str, list[str]]:
    """Each role's ``ACL SETUSER`` arguments after the user name, for ``namespaces``."""
    keys = [Keys(ns) for ns in namespaces]
    replies = _reply_selector(keys)
    client = [*_RESET, *_CONNECTION, "+client|unblock"]
    read_all = " ".join(f"%R~{k.prefix}*" for k in keys)
    return {
        "tierpool-worker": [
            *_RESET,
            "+@all",
            "-@admin",
            "-@dangerous",
            "+info",
            *(f"~{k.prefix}*" for k in keys),
            *(f"&{k.prefix}*" for k in keys),
            f"%R~{ANCHOR_CONFIG_KEY}",
        ],
        "tierpool-producer": [*client, "+xadd", *_writes(keys, ("allocate", "release")), replies],
        "tierpool-pod": [*client, "+xadd", *_writes(keys, ("pods", "drain")), replies],
        "tierpool-operator": [
            *client,
            "+xadd",
            *_writes(keys, ("allocate", "release", "config", "drain")),
            replies,
            f"(+@read -@dangerous -scan -randomkey {read_all})",
        ],
    }


def _quote(arg: str) -> str:
    """``arg`` as one word for redis-cli and shlex (selectors hold spaces)."""
    return f'"{arg}"' if " " in arg else arg


def acl_lines(namespaces: Sequence[str]) -> list[str]:
    """One ``ACL SETUSER`` command line per role, in :data:`ROLES` order."""
    rules = acl_rules(namespaces)
    return [" ".join(["ACL", "SETUSER", role, *(_quote(a) for a in rules[role])]) for role in ROLES]


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        metavar="NS[,NS...]",
        help="namespaces the users may reach (default: TIERPOOL_NAMESPACE)",
    )


def main(args: argparse.Namespace) -> int:
    # TIERPOOL_NAMESPACE is read as text: it may name several namespaces
    # (one worker process each), and the users must reach all of them.
    raw = args.namespace or os.environ.get("TIERPOOL_NAMESPACE") or Settings().namespace
    namespaces = [ns.strip() for ns in raw.split(",") if ns.strip()]
    bad = [ns for ns in namespaces if not valid_namespace(ns)]
    if not namespaces or bad:
        error(
            "acl",
            f"--namespace: {', '.join(bad) or 'empty'}: each must be 1-64 chars of [A-Za-z0-9._:-]",
        )
        return EXIT_USAGE
    for line in acl_lines(namespaces):
        write(line)
    error(
        "acl",
        "then give each user a password (ACL SETUSER <user> >PASSWORD) "
        "and put it in that component's REDIS_URL",
    )
    return EXIT_OK
