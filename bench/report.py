"""The benchmark's table: Markdown, so it can go into the README as printed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _ms(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1000:.2f} ms"


def _met(ok: bool | None, by: str = "") -> str:
    if ok is None:
        return "-"
    return "yes" if ok else f"**no**{f' ({by})' if by else ''}"


def render_table(results: Mapping[str, Any], targets: Mapping[str, float]) -> str:
    meta = results.get("meta", {})
    rows: list[tuple[str, str, str, str]] = []

    raw = results.get("raw")
    if raw:
        by_procs: dict[int, float] = {}
        for r in raw["runs"]:
            by_procs[r["processes"]] = max(
                by_procs.get(r["processes"], 0.0), r["allocations_per_s"]
            )
        per = ", ".join(f"{p} proc: {_num(v)}" for p, v in sorted(by_procs.items()))
        best = raw["best"]
        rows.append(
            (
                f"Raw ceiling: `PoolState.run`, batches of {raw['batch']} "
                f"(best of {len(raw['runs'])} runs: {raw['ceiling_processes']} client proc)",
                f"{_num(raw['ceiling'])} allocations/s ({per}); CPU per allocation: Redis "
                f"{_num(best.get('redis_us'), '{:.0f}')} µs, client "
                f"{_num(best.get('clients_us'), '{:.0f}')} µs",
                "-",
                "-",
            )
        )

    e2e = results.get("e2e")
    if e2e:
        best = e2e["best"]
        ratio = e2e.get("ratio_to_raw")
        target = targets["e2e_ratio"]
        rows.append(
            (
                f"End to end: closed loop, {e2e['max_concurrency']} concurrent, "
                f"{e2e['workers']} workers, {e2e['client_processes']} client proc "
                f"(best of {len(e2e['runs'])} runs)",
                f"{_num(e2e['max'])} allocations/s"
                + (f" = {ratio:.0%} of raw" if ratio else "")
                + f"; CPU per allocation: Redis {_num(best.get('redis_us'), '{:.0f}')} µs, "
                f"workers {_num(best.get('workers_us'), '{:.0f}')} µs, "
                f"client {_num(best.get('clients_us'), '{:.0f}')} µs",
                f">= {target:.0%} of raw",
                _met(
                    None if ratio is None else ratio >= target,
                    "" if ratio is None else f"{ratio / target:.0%} of target",
                ),
            )
        )

    lat = results.get("latency")
    if lat:
        solo = lat.get("one_at_a_time")
        if solo:
            rows.append(
                (
                    "Latency, one request at a time (the floor): p50 / p99 / p99.9",
                    f"{_ms(solo['p50_s'])} / {_ms(solo['p99_s'])} / {_ms(solo['p999_s'])}",
                    "-",
                    "-",
                )
            )
        for r in lat["runs"]:
            label = f"{_num(r['rate'])}/s"
            if r.get("of_max"):
                label += f" ({r['of_max']:.0%} of max)"
            is_1000 = r["rate"] == 1000
            target_s = targets["latency_p99_s_at_1000"]
            achieved = (
                f"; achieved {_num(r['achieved_per_s'])}/s"
                if (r["achieved_per_s"] < 0.95 * r["rate"])
                else ""
            )
            fails = (
                f"; {r['rejected']} rejected, {r['errors']} errors"
                if (r["rejected"] or r["errors"])
                else ""
            )
            server = ""
            if r.get("server_p99_le_s") is not None:
                server = (
                    f" (in the worker: p50 <= {_ms(r['server_p50_le_s'])}, "
                    f"p99 <= {_ms(r['server_p99_le_s'])})"
                )
            rows.append(
                (
                    f"Latency, open loop {label}: p50 / p99 / p99.9",
                    f"{_ms(r['p50_s'])} / {_ms(r['p99_s'])} / {_ms(r['p999_s'])}{server}"
                    f"{achieved}{fails}",
                    f"p99 <= {target_s * 1000:.0f} ms" if is_1000 else "-",
                    _met(r["p99_s"] <= target_s, f"{r['p99_s'] / target_s:.1f}x the target")
                    if is_1000
                    else "-",
                )
            )

    prop = results.get("propagation")
    if prop:
        target = targets["propagation_p99_s"]
        p99 = prop["gauge_p99_s"]
        inst = ""
        if prop.get("installed_p99_s") is not None and not math.isnan(prop["installed_p99_s"]):
            inst = (
                f"; snapshot installed (worker log): p50 {_ms(prop['installed_p50_s'])}, "
                f"p99 {_ms(prop['installed_p99_s'])}"
            )
        rows.append(
            (
                f"Config propagation, {prop['changes']} changes: `applied` -> last worker's "
                "`tierpool_config_version`",
                f"p50 {_ms(prop['gauge_p50_s'])}, p99 {_ms(p99)}{inst}",
                f"p99 <= {target * 1000:.0f} ms",
                _met(
                    None if p99 is None or math.isnan(p99) else p99 <= target,
                    "" if p99 is None or math.isnan(p99) else f"{p99 / target:.1f}x the target",
                ),
            )
        )

    fo = results.get("failover")
    if fo:
        target = targets["failover_s"]
        rows.append(
            (
                "Failover: SIGKILL the leader -> new leader serving (gauges under its token)",
                f"{fo['serving_s']:.2f} s (new lease after {fo['lease_s']:.2f} s)",
                f"<= {target:.0f} s",
                _met(fo["serving_s"] <= target, f"{fo['serving_s'] / target:.1f}x the target"),
            )
        )

    mem = results.get("memory")
    if mem:
        target = targets["worker_rss_mb"]
        rss = mem["worker_rss_max_mb"]
        lens = mem["stream_lengths"]
        rows.append(
            (
                f"Memory after {_num(mem['requests'])} requests: worker RSS (max)",
                f"{rss:.1f} MB",
                f"<= {target:.0f} MB",
                _met(rss <= target, f"{rss / target:.1f}x the target"),
            )
        )
        peak = mem.get("during_load_max")
        during = ""
        if peak:
            during = (
                f" (max while loaded: {peak['redis_used_memory_mb']:.1f} MB; allocate "
                f"{_num(peak['allocate_len'])}, release {_num(peak['release_len'])}, "
                f"events {_num(peak['events_len'])}; worker RSS "
                f"{peak['worker_rss_max_mb']:.1f} MB)"
            )
        rows.append(
            (
                "Redis `used_memory`; stream lengths at the end",
                f"{mem['redis_used_memory_mb']:.1f} MB; allocate {_num(lens['allocate'])}, "
                f"release {_num(lens['release'])}, events {_num(lens['events'])}, "
                f"reply streams left {_num(mem['reply_streams_left'])}{during}",
                "bounded",
                "-",
            )
        )

    gw = results.get("gateway")
    if gw:
        target = targets["gateway_added_p50_s"]
        added = gw["added_p50_s"]
        fails = ""
        if gw["closed_rejected"] or gw["closed_errors"]:
            fails = f"; {gw['closed_rejected']} rejected, {gw['closed_errors']} errors"
        rows.append(
            (
                f"Gateway: HTTP allocate + release, closed loop, {gw['concurrency']} connections",
                f"{_num(gw['allocations_per_s'])} allocations/s; allocate p50 / p99 "
                f"{_ms(gw['closed_p50_s'])} / {_ms(gw['closed_p99_s'])}{fails}; CPU per "
                f"allocation: gateway {_num(gw.get('gateway_us'), '{:.0f}')} µs, workers "
                f"{_num(gw.get('workers_us'), '{:.0f}')} µs, Redis "
                f"{_num(gw.get('redis_us'), '{:.0f}')} µs",
                "-",
                "-",
            )
        )
        solo = gw.get("solo")
        if solo:
            rows.append(
                (
                    "Gateway: latency added, one request at a time: p50 / p99",
                    f"+{_ms(solo['added_p50_s'])} / +{_ms(solo['added_p99_s'])} (through the "
                    f"gateway {_ms(solo['http_p50_s'])} / {_ms(solo['http_p99_s'])}; direct "
                    f"{_ms(solo['direct_p50_s'])} / {_ms(solo['direct_p99_s'])})",
                    "-",
                    "-",
                )
            )
        h, d = gw["http"], gw["direct"]
        rows.append(
            (
                f"Gateway: latency added over a direct stream request, open loop "
                f"{_num(gw['rate'])}/s: p50 / p99",
                f"+{_ms(added)} / +{_ms(gw['added_p99_s'])} (through the gateway "
                f"{_ms(h['p50_s'])} / {_ms(h['p99_s'])}; direct {_ms(d['p50_s'])} / "
                f"{_ms(d['p99_s'])})",
                f"p50 <= +{target * 1000:.0f} ms",
                _met(added <= target, f"{added / target:.1f}x the target"),
            )
        )

    head = (
        f"tierpool bench, {meta.get('date', '?')}, {meta.get('cpus', '?')} cores, "
        f"Redis {meta.get('redis', '?')}, Python {meta.get('python', '?')}; "
        f"{meta.get('pods', '?')} pods, tiers `{meta.get('tiers', '?')}`, "
        f"{meta.get('workers', '?')} workers; load average at start "
        f"{_num(meta.get('loadavg_1m_at_start'), '{:.2f}')}"
    )
    lines = [head, "", "| measure | result | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)
