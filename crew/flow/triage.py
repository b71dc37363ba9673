"""The triage flow for one email, as an explicit graph with fallbacks.

    classify_llm ──ok──> create_ticket ──ok──> ticketed
         │failed               │failed
         v                     v
    classify_keywords     review "ticket_failed" (+ page the support manager)
         │ok ──> create_ticket
         │unsure
         v
    review "unclassified"

Every node records what it decided, and why, in the audit log (fenced on the job's lease),
and runs inside a tracing step so the supervisor sees it live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, select

from crewguard.agents.classify import (
    Classification,
    LlmClassificationError,
    classify_with_keywords,
    classify_with_llm,
)
from crewguard.agents.email import EmailForTriage
from crewguard.agents.hooks import RunBudget
from crewguard.crew import paging
from crewguard.crew.flow.context import JobContext
from crewguard.crew.intake.parse import parse_email
from crewguard.crew.ledger import audit, db, jobs
from crewguard.crew.ledger.schema import emails
from crewguard.crew.sinks.base import (
    SinkError,
    TicketRequest,
    build_sink,
    create_ticket_with_retries,
    sink_policy,
)
from crewguard.crew.tracing.setup import TracingHandle, start_tracing
from crewguard.retry import Attempt, RetryPolicy, call_with_retries
from crewguard.settings import Settings

log = logging.getLogger("crewguard.flow")

#: How long a finished child may spend flushing traces before it exits anyway.
TRACING_SHUTDOWN_S = 2.0
#: Characters of the body copied into the ticket's summary.
TICKET_SUMMARY_CHARS = 2000

# Node names and the edges between them: (node, outcome) -> next node.
CLASSIFY_LLM = "classify_llm"
CLASSIFY_KEYWORDS = "classify_keywords"
CREATE_TICKET = "create_ticket"
REVIEW_UNCLASSIFIED = "review_unclassified"
REVIEW_TICKET_FAILED = "review_ticket_failed"
REVIEW_UNPARSEABLE = "review_unparseable"
END = "end"
EDGES: dict[tuple[str, str], str] = {
    (CLASSIFY_LLM, "ok"): CREATE_TICKET,
    (CLASSIFY_LLM, "failed"): CLASSIFY_KEYWORDS,
    (CLASSIFY_KEYWORDS, "ok"): CREATE_TICKET,
    (CLASSIFY_KEYWORDS, "unsure"): REVIEW_UNCLASSIFIED,
    (CREATE_TICKET, "ok"): END,
    (CREATE_TICKET, "failed"): REVIEW_TICKET_FAILED,
    (REVIEW_UNCLASSIFIED, "ok"): END,
    (REVIEW_TICKET_FAILED, "ok"): END,
    (REVIEW_UNPARSEABLE, "ok"): END,
}


class Cancelled(Exception):
    """The daemon asked this run to stop (SIGTERM -> cooperative cancel): it records the outcome."""


@dataclass
class FlowState:
    email: EmailForTriage
    budget: RunBudget
    classification: Classification | None = None
    llm_failure: LlmClassificationError | None = None
    ticket_error: str | None = None
    path: list[str] = field(default_factory=list)


@dataclass
class Flow:
    """One run of the graph for one claimed job."""

    engine: Engine
    settings: Settings
    claim: jobs.Claim
    tracing: TracingHandle

    # --- the graph ---------------------------------------------------------------------
    def run(self, state: FlowState, start: str = CLASSIFY_LLM) -> list[str]:
        nodes: dict[str, Callable[[FlowState], str]] = {
            CLASSIFY_LLM: self.classify_llm,
            CLASSIFY_KEYWORDS: self.classify_keywords,
            CREATE_TICKET: self.create_ticket,
            REVIEW_UNCLASSIFIED: self.review_unclassified,
            REVIEW_TICKET_FAILED: self.review_ticket_failed,
            REVIEW_UNPARSEABLE: self.review_unparseable,
        }
        node = start
        while node != END:
            state.path.append(node)
            with self.tracing.step(f"flow.{node}"):
                outcome = nodes[node](state)
            node = EDGES[(node, outcome)]
        return state.path

    # --- nodes -------------------------------------------------------------------------
    def classify_llm(self, state: FlowState) -> str:
        llm = self.settings.llm
        policy = RetryPolicy(llm.max_attempts, llm.backoff_base_s, llm.backoff_cap_s)

        def attempt(number: int) -> Classification:
            with self.tracing.step("classify.llm", attempt=number):
                return classify_with_llm(state.email, self.settings, budget=state.budget)

        def on_retry(a: Attempt) -> None:
            err = a.error
            self.tracing.event(
                "retry", step="classify.llm", attempt=a.number, delay_s=round(a.delay_s, 3), error=str(err)
            )
            self._audit(
                "llm.retry", attempt=a.number, kind=getattr(err, "kind", "other"), delay_s=round(a.delay_s, 3)
            )

        try:
            state.classification = call_with_retries(
                attempt,
                policy,
                retry_on=(LlmClassificationError,),
                retry_if=lambda e: getattr(e, "retryable", False),
                on_retry=on_retry,
            )
        except LlmClassificationError as exc:
            if exc.kind == "aborted":
                raise Cancelled(str(exc)) from None
            state.llm_failure = exc
            self._audit(
                "classify.llm_failed",
                kind=exc.kind,
                error=str(exc)[:200],
                llm_calls=state.budget.llm_calls,
                tokens=state.budget.tokens,
            )
            return "failed"
        self._audit_decision(state.classification, llm_calls=state.budget.llm_calls)
        return "ok"

    def classify_keywords(self, state: FlowState) -> str:
        result = classify_with_keywords(state.email, self.settings)
        if result is None:
            self._audit("classify.keyword_unsure")
            return "unsure"
        state.classification = result
        fallback_from = state.llm_failure.kind if state.llm_failure else None
        self._audit_decision(result, fallback_from=fallback_from)
        return "ok"

    def create_ticket(self, state: FlowState) -> str:
        c = state.classification
        assert c is not None
        sink = build_sink(self.settings)
        req = TicketRequest(
            idempotency_key=jobs.ticket_key(self.claim.email_key),
            email_key=self.claim.email_key,
            team=c.team,
            category=c.category,
            classifier=c.classifier,
            subject=state.email.subject,
            sender=state.email.sender,
            summary=f"[{c.classifier}] {c.reason}\n\n{state.email.body[:TICKET_SUMMARY_CHARS]}",
            run_id=self.claim.run_id,
        )

        def on_retry(a: Attempt) -> None:
            self.tracing.event(
                "retry", step="ticket", attempt=a.number, delay_s=round(a.delay_s, 3), error=str(a.error)
            )
            self._audit(
                "ticket.retry",
                sink=sink.name,
                attempt=a.number,
                delay_s=round(a.delay_s, 3),
                error=str(a.error)[:200],
            )

        try:
            external_id = create_ticket_with_retries(sink, req, sink_policy(self.settings), on_retry)
        except SinkError as exc:
            state.ticket_error = f"{sink.name}: {exc}"
            return "failed"
        with db.write(self.engine) as conn:
            jobs.complete_ticketed(
                conn,
                self.claim,
                sink=sink.name,
                team=c.team,
                category=c.category,
                classifier=c.classifier,
                external_id=external_id,
            )
        return "ok"

    def review_unclassified(self, state: FlowState) -> str:
        why = f"LLM failed ({state.llm_failure})" if state.llm_failure else "LLM gave no answer"
        self._review("unclassified", f"{why}; keyword classifier not confident")
        return "ok"

    def review_ticket_failed(self, state: FlowState) -> str:
        detail = state.ticket_error or "ticket creation failed"
        with db.write(self.engine) as conn:
            jobs.send_to_review(
                conn, self.claim, email_key=self.claim.email_key, reason="ticket_failed", detail=detail
            )
            paging.notify_manager(
                conn,
                text=f"ticket creation failed after {self.settings.sinks.attempts} attempts for email "
                f"{self.claim.email_key[:12]} ({detail[:160]}); it is in the review queue",
                settings=self.settings,
            )
        return "ok"

    def review_unparseable(self, state: FlowState) -> str:
        self._review("unparseable", "the message could not be parsed")
        return "ok"

    # --- recording ---------------------------------------------------------------------
    def _audit(self, event: str, **data: object) -> None:
        with db.write(self.engine) as conn:
            jobs.fence(conn, self.claim)
            audit.append(conn, event, email_key=self.claim.email_key, run_id=self.claim.run_id, **data)

    def _audit_decision(self, c: Classification, **extra: object) -> None:
        self._audit(
            "classify.decided",
            classifier=c.classifier,
            category=c.category,
            team=c.team,
            confidence=round(c.confidence, 3),
            reason=c.reason[:200],
            **extra,
        )

    def _review(self, reason: str, detail: str) -> None:
        with db.write(self.engine) as conn:
            jobs.send_to_review(
                conn, self.claim, email_key=self.claim.email_key, reason=reason, detail=detail
            )


def load_email(engine: Engine, settings: Settings, email_key: str) -> tuple[EmailForTriage, str | None]:
    """The stored raw message, parsed again (the ledger keeps bytes, not interpretations)."""
    with db.read(engine) as conn:
        raw = conn.execute(select(emails.c.raw).where(emails.c.key == email_key)).scalar_one()
    parsed = parse_email(bytes(raw), max_bytes=settings.intake.max_message_bytes)
    email = EmailForTriage(key=email_key, sender=parsed.sender, subject=parsed.subject, body=parsed.body)
    return email, parsed.parse_error


def process_email(ctx: JobContext) -> None:
    """The `crew` handler: run the graph for the claimed email inside one traced run."""
    email, parse_error = load_email(ctx.engine, ctx.settings, ctx.claim.email_key)
    tracing = start_tracing(ctx.settings, ctx.engine)
    flow = Flow(ctx.engine, ctx.settings, ctx.claim, tracing)
    state = FlowState(email=email, budget=RunBudget.from_settings(ctx.settings))
    try:
        with tracing.run_scope(
            run_id=ctx.claim.run_id, email_key=ctx.claim.email_key, job_id=ctx.claim.job_id
        ):
            flow.run(state, start=REVIEW_UNPARSEABLE if parse_error else CLASSIFY_LLM)
    except Cancelled:
        raise SystemExit(5) from None  # child.EXIT_CANCELLED: the daemon that asked records the kill
    finally:
        tracing.shutdown(timeout_s=TRACING_SHUTDOWN_S)
