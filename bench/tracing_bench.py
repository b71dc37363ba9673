"""Tracing figures: (1) local-feed latency from an LLM request arriving at the scenario LLM to its
start row being visible in `trace_events`; (2) per-kickoff overhead, tracing on vs off, alternating;
(3) how long `shutdown` takes when Langfuse is unreachable (refused, blackholed, 503).

Run: CREWAI_DISABLE_TELEMETRY=true CREWAI_TRACING_ENABLED=false python bench/tracing_bench.py [--calls 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any

for _key, _value in (("CREWAI_DISABLE_TELEMETRY", "true"), ("CREWAI_TRACING_ENABLED", "false"),
                     ("CREWAI_DISABLE_VERSION_CHECK", "true"), ("OPENAI_API_KEY", "sk-bench")):  # fmt: skip
    os.environ.setdefault(_key, _value)

import sqlalchemy as sa  # noqa: E402

from crewguard.crew.ledger import db, jobs  # noqa: E402
from crewguard.crew.ledger.schema import trace_events  # noqa: E402
from crewguard.crew.tracing import start_tracing  # noqa: E402
from crewguard.llm_sim import ScenarioLLM  # noqa: E402
from crewguard.settings import Settings  # noqa: E402
from crewguard.standins.langfuse import LangfuseStandin  # noqa: E402

POLL_S = 0.001  # how often the bench looks for new feed rows (the supervisor's view)
EMAIL = "Route this email.\nFrom: alice@example.com\nSubject: refund\n\nI was charged twice."


class TimedLLM(ScenarioLLM):
    """The scenario LLM, also noting when each request arrived."""

    def __init__(self) -> None:
        super().__init__(port=0)
        self.arrivals: list[float] = []

    def _record(self, body: dict[str, Any]) -> None:
        self.arrivals.append(time.time())
        super()._record(body)


def settings(langfuse: bool) -> Settings:
    return Settings(tracing={"langfuse": {"enabled": langfuse, "flush_interval_s": 1.0, "timeout_s": 2.0}})


def new_run(engine: sa.Engine) -> jobs.Claim:
    with db.write(engine) as conn:
        jobs.enqueue_email(
            conn, key=uuid.uuid4().hex * 2, raw=b"x", source="file", source_ref=None, message_id=None,
            subject="s", sender="a@b.c", parse_error=None, max_attempts=3,
        )  # fmt: skip
    claim = jobs.claim_next_job(engine, "bench", lease_s=600)
    assert claim is not None
    return claim


def kickoff(base_url: str) -> None:
    from crewai import LLM, Agent, Crew, Task
    from crewai.tools import tool

    @tool("lookup_sender_history")
    def lookup_sender_history(sender: str) -> str:
        """Past tickets of a sender."""
        return "none"

    llm = LLM(model="openai/gpt-4o-mini", base_url=base_url, api_key="sk-bench", timeout=10, max_retries=0)
    agent = Agent(role="router", goal="route", backstory="desk", llm=llm, tools=[lookup_sender_history])
    Crew(
        agents=[agent], tasks=[Task(description=EMAIL, expected_output="JSON", agent=agent, name="route")]
    ).kickoff()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(name: str, values: list[float], unit: str = "ms", scale: float = 1000.0) -> None:
    v = [x * scale for x in values]
    print(f"{name}: n={len(v)} p50={pct(v, 50):.1f}{unit} p95={pct(v, 95):.1f}{unit} max={max(v):.1f}{unit} min={min(v):.1f}{unit} "
          f"mean={statistics.mean(v):.1f}{unit}")  # fmt: skip


def feed_latency(engine: sa.Engine, calls: int) -> None:
    """(1) request arrival at the LLM -> LLM start row visible to a reader of the ledger.

    Calls inside one run are sequential, so a run's k-th request pairs with its k-th LLM start row."""
    sim = TimedLLM().start()
    handle = start_tracing(settings(langfuse=False), engine)
    seen: dict[str, list[tuple[int, float]]] = {}  # run id -> (row id, first seen at)
    stop = threading.Event()

    def watch() -> None:
        last = 0
        while not stop.is_set():
            with db.read(engine) as conn:
                rows = conn.execute(
                    sa.select(trace_events.c.id, trace_events.c.run_id)
                    .where(
                        trace_events.c.id > last,
                        trace_events.c.kind == "LLM",
                        trace_events.c.phase == "start",
                    )
                    .order_by(trace_events.c.id)
                ).all()
            now = time.time()
            for row in rows:
                seen.setdefault(row.run_id, []).append((row.id, now))
                last = row.id
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    spans_of_run: list[tuple[str, int, int]] = []  # run id, first and last arrival index
    while len(sim.arrivals) < calls:
        claim = new_run(engine)
        first = len(sim.arrivals)
        with handle.run_scope(run_id=claim.run_id, email_key=claim.email_key, job_id=claim.job_id):
            kickoff(sim.base_url)
        spans_of_run.append((claim.run_id, first, len(sim.arrivals)))
    time.sleep(0.2)
    stop.set()
    watcher.join()
    handle.shutdown(2.0)
    sim.stop()
    latencies, unpaired = [], 0
    for run_id, first, last in spans_of_run:
        rows = sorted(seen.get(run_id, []))
        if len(rows) != last - first:
            unpaired += 1
            continue
        latencies.extend(at - sim.arrivals[first + k] for k, (_, at) in enumerate(rows))
    summary("(1) LLM request arrival -> feed start row visible", latencies)
    print(f"    runs not paired: {unpaired}; feed stats: {handle.stats()}")


def overhead(engine: sa.Engine, rounds: int, standin: LangfuseStandin) -> None:
    """(2) the same kickoff with tracing (feed + Langfuse stand-in) and without, alternating."""
    sim = ScenarioLLM(port=0).start()
    on: list[float] = []
    off: list[float] = []
    kickoff(sim.base_url)  # warm-up
    for _ in range(rounds):
        handle = start_tracing(settings(langfuse=True), engine)
        claim = new_run(engine)
        t0 = time.perf_counter()
        with handle.run_scope(run_id=claim.run_id, email_key=claim.email_key, job_id=claim.job_id):
            kickoff(sim.base_url)
        on.append(time.perf_counter() - t0)
        handle.shutdown(2.0)
        t0 = time.perf_counter()
        kickoff(sim.base_url)
        off.append(time.perf_counter() - t0)
    sim.stop()
    summary("(2) kickoff with tracing   ", on)
    summary("    kickoff without tracing", off)
    print(f"    overhead: median {1000 * (statistics.median(on) - statistics.median(off)):+.1f} ms per kickoff"
          f" ({len(standin.observations())} observations at the stand-in)")  # fmt: skip


def shutdown_delay(engine: sa.Engine, trials: int) -> None:
    """(3) shutdown(timeout_s=2.0) after a kickoff while Langfuse is unreachable."""
    sim = ScenarioLLM(port=0).start()
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    keys = os.environ["LANGFUSE_PUBLIC_KEY"], os.environ["LANGFUSE_SECRET_KEY"]
    failing = LangfuseStandin(0, *keys).start()
    failing.fail_next(10_000, 503)
    cases = {
        "refused": refused_url,
        "blackhole": f"http://127.0.0.1:{hole.getsockname()[1]}",
        "503": failing.base_url,
    }
    for name, url in cases.items():
        os.environ["LANGFUSE_BASE_URL"] = url
        delays = []
        for _ in range(trials):
            handle = start_tracing(settings(langfuse=True), engine)
            claim = new_run(engine)
            with handle.run_scope(run_id=claim.run_id):
                kickoff(sim.base_url)
            t0 = time.perf_counter()
            handle.shutdown(timeout_s=2.0)
            delays.append(time.perf_counter() - t0)
        summary(f"(3) shutdown(2.0) with Langfuse {name:9}", delays, "s", 1.0)
    hole.close()
    failing.stop()
    sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="LLM calls for the latency figure (>= 50)")
    parser.add_argument("--rounds", type=int, default=10, help="kickoff pairs for the overhead figure")
    parser.add_argument("--trials", type=int, default=3, help="shutdowns per Langfuse failure mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LangfuseStandin(port=0) as standin:
        os.environ.update(
            LANGFUSE_PUBLIC_KEY=standin.public_key,
            LANGFUSE_SECRET_KEY=standin.secret_key,
            LANGFUSE_BASE_URL=standin.base_url,
        )
        engine = db.open_engine(db.default_sqlite_url(tmp))
        feed_latency(engine, args.calls)
        overhead(engine, args.rounds, standin)
        shutdown_delay(engine, args.trials)
        engine.dispose()


if __name__ == "__main__":
    main()
