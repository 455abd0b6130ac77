"""Operator commands of the ``tierpool`` CLI (status, pods, config, requests, events, dead).

Each module is one family of subcommands with ``add_arguments(parser, name)``
and ``main(args) -> int``, wired by ``workers/cli.py``. What they share
(connection options, the exit codes, tables and JSON output) is in
:mod:`workers.ops.common`. Commands that change state go through the
request streams (the client library), like any producer; read-only ones read
Redis directly.
"""
