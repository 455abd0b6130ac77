"""Load the Lua scripts of ``core/lua`` and call them by SHA, in pipelines.

Each script file is one state transition; ``_prelude.lua`` is prepended to
every script except the standalone ``leader_*`` and ``group_*`` ones. Scripts are loaded once
per connection pool and called with ``EVALSHA``; when Redis answers
``NOSCRIPT`` (it restarted or failed over and lost its script cache) the
batch's unanswered calls are loaded and sent again, so callers never see it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

LUA_DIR = Path(__file__).with_name("lua")


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


@cache
def script(name: str) -> Script:
    """The script ``core/lua/{name}.lua``, with the prelude unless standalone."""
    body = (LUA_DIR / f"{name}.lua").read_text()
    if not name.startswith(("leader_", "group_")):
        body = (LUA_DIR / "_prelude.lua").read_text() + "\n" + body
    return Script(name, body, hashlib.sha1(body.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Call:
    """One script invocation, ready to be sent."""

    script: Script
    keys: Sequence[str]
    args: Sequence[str | int]


def _is_noscript(result: object) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT")
    )


async def run_calls(redis: Redis, calls: Sequence[Call]) -> list[object]:
    """Send every call in one pipelined round trip; results in order.

    A result is the script's return value or the exception Redis raised for
    that call (a bad call never hides the others' results). NOSCRIPT is
    handled here: the missing scripts are loaded and those calls resent.
    """
    results: list[object] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(3):
        async with redis.pipeline(transaction=False) as pipe:
            for i in todo:
                c = calls[i]
                pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
            answers = await pipe.execute(raise_on_error=False)
        missing: list[int] = []
        for i, answer in zip(todo, answers, strict=True):
            if _is_noscript(answer) and attempt < 2:
                missing.append(i)
            else:
                results[i] = answer
        if not missing:
            break
        async with redis.pipeline(transaction=False) as pipe:
            for s in {calls[i].script for i in missing}:
                pipe.script_load(s.source)
            await pipe.execute()
        todo = missing
    return results


async def run_one(redis: Redis, call: Call) -> object:
    """One call; raises what Redis raised."""
    (result,) = await run_calls(redis, [call])
    if isinstance(result, BaseException):
        raise result
    return result
