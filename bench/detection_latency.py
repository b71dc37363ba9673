"""Detection latency of the supervisor, end to end: from the moment a run goes wrong to the moment its
kill is recorded, with the crew daemon and the supervisor as separate processes and real CrewAI
against the scenario LLM, once with the LOCAL trace source and once with the LANGFUSE source.

  problem start  loop: start of the tool call that makes the loop (the NEAR_REPEATS-th call of one tool
                 whose arguments differ only in numbers, `[[sim:loop_varying]]`); hang: start of the LLM
                 call that never answers (`[[sim:hang]]`); both read from the ledger's trace feed
  kill done      the `job.killed` audit entry (the process group is gone and the email is in review)

A hang is only a stall after `call_s` seconds, so its latency includes that threshold; the table also
shows the part beyond it. For loops it also shows how many LLM calls the model answered before the kill.

    python bench/detection_latency.py [--n 10] [--normal 6] [--sources local,langfuse]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the harness lives in tests/e2e (one implementation for tests and bench).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crewguard.standins.langfuse import LangfuseStandin  # noqa: E402
from crewguard.supervisor.sources.base import shape_key  # noqa: E402
from tests.e2e.harness import System, make_email, normal_emails, start_system, wait_until  # noqa: E402

#: One tool called with this many arguments differing only in numbers is a loop (as in tests/e2e).
NEAR_REPEATS = 3
#: The stall limit: a call in flight (local) or no progress (Langfuse: in-flight calls are invisible) this long.
STALL_S = 5.0
#: The local source sees calls in flight; its no-progress limit stays well above a cold child start.
LOCAL_NO_PROGRESS_S = 30.0
#: Seconds per LLM answer: realistic enough that a loop is seen while its next call is in flight.
LLM_LATENCY_S = 0.5
#: Supervisor scan period.
SCAN_S = 0.25
#: Langfuse: span export period of the crew's children, and the supervisor's poll period.
LANGFUSE_FLUSH_S = 0.2
LANGFUSE_POLL_S = 0.5
#: Upper bound for one source's batch to reach final states.
BATCH_TIMEOUT_S = 600.0


def overrides(source: str) -> dict[str, Any]:
    return {
        "supervisor": {
            "source": source,
            "scan_interval_s": SCAN_S,
            "langfuse_poll_s": LANGFUSE_POLL_S,
            "detectors": {
                "loop": {"near_repeat_threshold": NEAR_REPEATS},
                # Langfuse never shows a call in flight: there a hang is seen as no progress.
                "stall": {
                    "call_s": STALL_S,
                    "no_progress_s": STALL_S if source == "langfuse" else LOCAL_NO_PROGRESS_S,
                },
            },
        },
        "tracing": {"langfuse": {"enabled": source == "langfuse", "flush_interval_s": LANGFUSE_FLUSH_S}},
    }


@dataclass
class Result:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"loop": [], "hang": []})
    missed: dict[str, int] = field(default_factory=lambda: {"loop": 0, "hang": 0})
    loop_llm_calls: list[int] = field(default_factory=list)
    caught_by: dict[str, set[str]] = field(default_factory=lambda: {"loop": set(), "hang": set()})
    false_kills: int = 0
    missed_detail: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def loop_start(s: System, run_id: str) -> float | None:
    """Start of the tool call that completed the near repeat (the earliest a detector can know)."""
    variants: dict[tuple[str, str | None], set[str]] = {}
    for row in s.trace_rows(run_id, "TOOL"):
        if row["phase"] != "start":
            continue
        args = json.loads(row["attributes"] or "{}").get("args")
        seen = variants.setdefault((row["name"], shape_key(args)), set())
        seen.add(args)
        if len(seen) == NEAR_REPEATS:
            return float(row["at"])
    return None


def hang_start(s: System, run_id: str) -> float | None:
    """Start of the LLM call that never ended."""
    rows = s.trace_rows(run_id, "LLM")
    ended = {r["span_id"] for r in rows if r["phase"] == "end"}
    starts = [r["at"] for r in rows if r["phase"] == "start" and r["span_id"] not in ended]
    return float(starts[0]) if starts else None


def measure(source: str, n: int, n_normal: int, root: Path) -> Result:
    env: dict[str, str] = {}
    langfuse = None
    if source == "langfuse":
        langfuse = LangfuseStandin(port=0).start()
        env = {
            "LANGFUSE_PUBLIC_KEY": langfuse.public_key,
            "LANGFUSE_SECRET_KEY": langfuse.secret_key,
            "LANGFUSE_BASE_URL": langfuse.base_url,
        }
    s = start_system(root / source, overrides(source), env=env, latency_s=LLM_LATENCY_S)
    result = Result()
    try:
        loops = [
            make_email(f"loop{i}", "CSV import stuck", f"[[sim:loop_varying]]\nImport case L{i}x is stuck.")
            for i in range(n)
        ]
        hangs = [
            make_email(f"hang{i}", "Invoice download", f"[[sim:hang]]\nDownload case H{i}x never ends.")
            for i in range(n)
        ]
        normal = normal_emails(n_normal)
        batch: list[tuple[str, bytes]] = []
        for i in range(max(n, n_normal)):  # interleaved, as mail arrives
            batch += [("loop", loops[i])] if i < n else []
            batch += [("hang", hangs[i])] if i < n else []
            batch += [("normal", normal[i])] if i < n_normal else []
        s.start_both()
        started = time.monotonic()
        keys = s.enqueue([raw for _, raw in batch])
        wait_until(lambda: s.all_final(keys), BATCH_TIMEOUT_S, f"the {source} batch to finish")
        result.wall_s = time.monotonic() - started
        killed_at = {e["email_key"]: e["ts"] for e in s.audit_events("job.killed")}
        incidents = {i["email_key"]: i for i in s.incidents() if i.get("email_key")}
        for (kind, raw), key in zip(batch, keys, strict=True):
            if kind == "normal":
                result.false_kills += key in killed_at
                continue
            if key not in killed_at:
                result.missed[kind] += 1
                run = s.runs_of(key)[-1]
                inc = incidents.get(key, {})
                result.missed_detail.append(
                    f"{kind} {key[:10]}: {s.email_states([key])[key]}, run outcome {run['outcome']}, "
                    f"{run['llm_calls']} LLM calls, {run['tool_calls']} tool calls, "
                    f"incident {inc.get('kind')} {inc.get('action')}"
                )
                continue
            run = s.runs_of(key)[-1]
            start = loop_start(s, run["id"]) if kind == "loop" else hang_start(s, run["id"])
            if start is None:
                result.missed[kind] += 1
                inc = incidents.get(key, {})
                result.missed_detail.append(
                    f"{kind} {key[:10]}: killed before the problem showed, by {inc.get('kind')} "
                    f"{(inc.get('summary') or '')[:90]}"
                )
                continue
            result.latencies[kind].append(killed_at[key] - start)
            inc = incidents.get(key, {})
            evidence = inc.get("evidence") or {}
            result.caught_by[kind].add(
                f"{inc.get('kind')}/{evidence.get('pattern') or evidence.get('reason') or '-'}"
            )
            if kind == "loop":
                token = raw.split(b"Import case ")[1].split(b" ")[0].decode()
                result.loop_llm_calls.append(s.llm.calls(f"Import case {token} "))
    finally:
        s.close()
        if langfuse is not None:
            langfuse.stop()
    return result


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="looping and hanging emails each")
    parser.add_argument("--normal", type=int, default=6, help="well-behaved emails mixed in")
    parser.add_argument("--sources", default="local,langfuse")
    args = parser.parse_args()
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="crewguard-detect-") as tmp:
        for source in args.sources.split(","):
            print(
                f"[{source}] running {args.n} loops + {args.n} hangs + {args.normal} normal ...", flush=True
            )
            results[source] = measure(source, args.n, args.normal, Path(tmp))
    print(
        f"\nLLM latency {LLM_LATENCY_S} s, scan every {SCAN_S} s, stall limit {STALL_S:g} s, "
        f"near repeats {NEAR_REPEATS}, Langfuse flush {LANGFUSE_FLUSH_S} s / poll {LANGFUSE_POLL_S} s, 2 workers"
    )
    head = f"{'source':<9} {'problem':<5} {'killed':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7}  {'note'}"
    print(head)
    print("-" * len(head))
    for source, r in results.items():
        for kind in ("loop", "hang"):
            lat = r.latencies[kind]
            killed = f"{len(lat)}/{len(lat) + r.missed[kind]}"
            if not lat:
                print(f"{source:<9} {kind:<5} {killed:>7} {'-':>7} {'-':>7} {'-':>7}")
                continue
            cells = [percentile(lat, 50), percentile(lat, 95), max(lat)]
            if kind == "hang":
                note = f"beyond the stall limit: p50 {cells[0] - STALL_S:.2f} max {cells[2] - STALL_S:.2f} s"
            else:
                calls = r.loop_llm_calls
                note = f"LLM calls answered per loop: max {max(calls)}, mean {sum(calls) / len(calls):.1f}"
            note += f"; caught by {', '.join(sorted(r.caught_by[kind]))}"
            print(f"{source:<9} {kind:<5} {killed:>7} " + " ".join(f"{c:>7.2f}" for c in cells) + f"  {note}")
        print(f"{source:<9} normal emails killed: {r.false_kills}; batch wall time {r.wall_s:.0f} s")
        for line in r.missed_detail:
            print(f"{source:<9} not killed: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
