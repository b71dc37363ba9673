"""Builders shared by the supervisor tests: settings, snapshots, and ledger rows made through the ledger API."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from sqlalchemy import Engine

from crewguard.clock import Clock
from crewguard.crew.ledger import db, jobs
from crewguard.crew.ledger.schema import trace_events
from crewguard.settings import Settings
from crewguard.supervisor.model import LLM, TOOL, ActiveRun, Observation

T0 = 1_700_000_000.0
_span_ids = itertools.count(1)


def make_settings(tmp_path: Any = None, **overrides: Any) -> Settings:
    data = {"data_dir": str(tmp_path) if tmp_path is not None else "/tmp/crewguard-test"}
    data.update(overrides)
    return Settings(**data)


def run(run_id: str = "r1", *, started_at: float = T0, **kw: Any) -> ActiveRun:
    return ActiveRun(
        run_id=run_id,
        job_id=kw.pop("job_id", 1),
        email_key=kw.pop("email_key", "e" * 64),
        started_at=started_at,
        **kw,
    )


def tool(run_id: str, name: str, args: Any, at: float, *, end: float | None = None) -> Observation:
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    return Observation(
        run_id=run_id,
        span_id=f"s{next(_span_ids)}",
        kind=TOOL,
        name=name,
        tool=name,
        args_key=key,
        started_at=at,
        ended_at=at + 0.5 if end is None else end,
        seq=next(_span_ids),
    )


def llm(
    run_id: str,
    at: float,
    tokens: int = 1000,
    *,
    prompt: str | None = None,
    end: float | None = None,
    error: str | None = None,
) -> Observation:
    return Observation(
        run_id=run_id,
        span_id=f"s{next(_span_ids)}",
        kind=LLM,
        name="llm",
        model="openai/gpt-4o-mini",
        prompt_sha=hashlib.sha256((prompt or f"p{next(_span_ids)}").encode()).hexdigest()[:16],
        started_at=at,
        ended_at=at + 1.0 if end is None else end,
        prompt_tokens=tokens * 3 // 4,
        completion_tokens=tokens - tokens * 3 // 4,
        error=error,
        seq=next(_span_ids),
    )


def add_email(engine: Engine, clock: Clock, n: int) -> str:
    key = hashlib.sha256(f"<msg-{n}@example.test>".encode()).hexdigest()
    with db.write(engine) as conn:
        jobs.enqueue_email(
            conn,
            key=key,
            raw=b"Subject: hi\r\n\r\nbody",
            source="file",
            source_ref=None,
            message_id=f"<msg-{n}@example.test>",
            subject="hi",
            sender="a@example.test",
            parse_error=None,
            max_attempts=3,
            clock=clock,
        )
    return key


def start_run(
    engine: Engine,
    clock: Clock,
    n: int = 1,
    *,
    owner: str = "host:1",
    host: str = "host",
    lease_s: float = 30.0,
) -> jobs.Claim:
    """Enqueue email `n` and claim it: a running job with an active run."""
    add_email(engine, clock, n)
    claim = jobs.claim_next_job(engine, owner, lease_s=lease_s, host=host, clock=clock)
    assert claim is not None
    return claim


def feed(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Insert trace_events rows like the tracing span processor does."""
    with db.write(engine) as conn:
        conn.execute(
            trace_events.insert(),
            [
                {
                    "trace_id": None,
                    "parent_span_id": None,
                    **r,
                    "attributes": json.dumps(r.get("attributes") or {}, sort_keys=True),
                }
                for r in rows
            ],
        )


def tool_events(
    run_id: str, span_id: str, name: str, args: dict, at: float, end: float | None
) -> list[dict[str, Any]]:
    norm = json.dumps(args, sort_keys=True)
    rows = [
        dict(
            run_id=run_id,
            span_id=span_id,
            phase="start",
            kind="TOOL",
            name=name,
            at=at,
            attributes={"tool": name, "args": norm},
        )
    ]
    if end is not None:
        rows.append(
            dict(
                run_id=run_id,
                span_id=span_id,
                phase="end",
                kind="TOOL",
                name=name,
                at=end,
                attributes={"tool": name},
            )
        )
    return rows


def llm_events(
    run_id: str, span_id: str, at: float, end: float | None, *, tokens: int = 1000, prompt_sha: str = "p"
) -> list[dict[str, Any]]:
    model = "openai/gpt-4o-mini"
    rows = [
        dict(
            run_id=run_id,
            span_id=span_id,
            phase="start",
            kind="LLM",
            name="llm",
            at=at,
            attributes={"model": model, "prompt_sha": prompt_sha},
        )
    ]
    if end is not None:
        rows.append(
            dict(
                run_id=run_id,
                span_id=span_id,
                phase="end",
                kind="LLM",
                name="llm",
                at=end,
                attributes={
                    "model": model,
                    "prompt_tokens": tokens - 100,
                    "completion_tokens": 100,
                    "total_tokens": tokens,
                },
            )
        )
    return rows
