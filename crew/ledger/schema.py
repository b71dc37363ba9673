"""The ledger's tables: one SQL schema for SQLite and PostgreSQL (SQLAlchemy Core).

Timestamps are float epoch seconds from `crewguard.clock`. JSON columns hold canonical
JSON text so both engines store the same bytes.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# Email states (user-facing): queued -> running -> ticketed | in_review -> resolved.
EMAIL_QUEUED = "queued"
EMAIL_RUNNING = "running"
EMAIL_TICKETED = "ticketed"
EMAIL_IN_REVIEW = "in_review"
EMAIL_RESOLVED = "resolved"
EMAIL_STATES = (EMAIL_QUEUED, EMAIL_RUNNING, EMAIL_TICKETED, EMAIL_IN_REVIEW, EMAIL_RESOLVED)
FINAL_EMAIL_STATES = (EMAIL_TICKETED, EMAIL_IN_REVIEW, EMAIL_RESOLVED)

# Job states: queued -> running -> done | review (retries go back to queued).
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_REVIEW = "review"

emails = Table(
    "emails",
    metadata,
    Column("key", String(64), primary_key=True),  # sha256 hex of normalized Message-ID (or raw bytes)
    Column("message_id", Text),
    Column("subject", Text),
    Column("sender", Text),
    Column("source", String(32), nullable=False),  # file | maildir | imap | rabbitmq
    Column("source_ref", Text),  # path, imap uid, amqp delivery ...
    Column("raw", LargeBinary, nullable=False),  # kept for replay; capped at intake
    Column("size", Integer, nullable=False),
    Column("raw_sha256", String(64), nullable=False),
    Column("parse_error", Text),  # set when the message could not be parsed: it goes to review
    Column("state", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_emails_state", "state"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("email_key", String(64), ForeignKey("emails.key"), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("available_at", Float, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", Float),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("pgid", Integer),
    Column("run_id", String(36)),  # the current (or last) run
    Column("kill_requested_at", Float),
    Column("kill_reason", Text),
    Column("kill_incident_id", Integer),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_jobs_claim", "state", "available_at"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(36), primary_key=True),  # uuid4; also the Langfuse session id
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("email_key", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker", String(128), nullable=False),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("last_progress_at", Float),
    Column("outcome", String(32)),  # ticketed | review | error | killed | lost
    Column("classifier", String(32)),  # llm | keyword | none
    Column("team", Text),
    Column("category", Text),
    Column("llm_calls", Integer, nullable=False, default=0),
    Column("tool_calls", Integer, nullable=False, default=0),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Column("wall_s", Float),
    Column("error", Text),
    Index("ix_runs_active", "ended_at"),
    Index("ix_runs_email", "email_key"),
)

tickets = Table(
    "tickets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(80), nullable=False, unique=True),  # "<email key>:ticket"
    Column("email_key", String(64), nullable=False),
    Column("sink", String(32), nullable=False),  # helpdesk | salesforce
    Column("team", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("classifier", String(32), nullable=False),
    Column("external_id", Text),
    Column("run_id", String(36)),
    Column("created_at", Float, nullable=False),
)

review_items = Table(
    "review_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("email_key", String(64), nullable=False),
    Column("job_id", Integer),
    Column("run_id", String(36)),
    Column(
        "reason", String(64), nullable=False
    ),  # unparseable | unclassified | attempts_exhausted | killed | ...
    Column("detail", Text),
    Column("incident_id", Integer),
    Column("state", String(16), nullable=False),  # open | resolved | requeued
    Column("created_at", Float, nullable=False),
    Column("closed_at", Float),
    Column("resolution", Text),
    Index("ix_review_state", "state"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("ts", Float, nullable=False),
    Column("body", Text, nullable=False),  # canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
)

incidents = Table(
    "incidents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dedupe_key", String(200), nullable=False),  # one open incident per problem
    Column(
        "kind", String(32), nullable=False
    ),  # loop | token_spike | budget | stall | error_burst | queue_depth ...
    Column("severity", String(16), nullable=False, default="warning"),
    Column("run_id", String(36)),
    Column("job_id", Integer),
    Column("email_key", String(64)),
    Column("summary", Text, nullable=False),
    Column("evidence", Text),  # JSON
    Column("action", String(32)),  # killed | paged | none
    Column("state", String(16), nullable=False),  # open | resolved
    Column("count", Integer, nullable=False, default=1),
    Column("opened_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("resolved_at", Float),
    Column("escalated_at", Float),
    Index("ix_incidents_open", "dedupe_key", "state"),
)

pages = Table(
    "pages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("incident_id", Integer),
    Column("kind", String(16), nullable=False),  # post | update | reply
    Column("text", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("available_at", Float, nullable=False),
    Column("channel", Text),
    Column("ts", Text),  # Slack message ts, once posted
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float),
)

trace_events = Table(
    "trace_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(36), nullable=False),
    Column("trace_id", String(32)),
    Column("span_id", String(16), nullable=False),
    Column("parent_span_id", String(16)),
    Column("phase", String(8), nullable=False),  # start | end
    Column("kind", String(16), nullable=False),  # LLM | TOOL | AGENT | CHAIN | FLOW
    Column("name", Text, nullable=False),
    Column("at", Float, nullable=False),
    Column("attributes", Text),  # JSON: model, tokens, tool name + normalized args, error ...
    Index("ix_trace_events_run", "run_id", "id"),
)

heartbeats = Table(
    "heartbeats",
    metadata,
    Column("component", String(64), primary_key=True),  # supervisor | crew:<host>:<pid>
    Column("host", String(255)),
    Column("pid", Integer),
    Column("at", Float, nullable=False),
    Column("info", Text),  # JSON
)

intake_cursors = Table(
    "intake_cursors",
    metadata,
    Column("source", String(200), primary_key=True),  # e.g. imap:user@host/INBOX
    Column("uidvalidity", BigInteger),
    Column("last_uid", BigInteger),
    Column("state", Text),  # JSON: connected, last message, lag ...
    Column("updated_at", Float, nullable=False),
)
