"""What the demo did, read back from its ledger: outcomes per mailbox file and the printed summary.

Everything here reads the ledger (and the scenario LLM's request count); nothing writes. The
tests use `email_outcomes` and `compare_with_expected` to hold the run against expected.json.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from crewguard.crew.ledger import db
from crewguard.crew.ledger.queries import list_incidents, list_tickets, status_snapshot
from crewguard.crew.ledger.review import list_review
from crewguard.crew.ledger.schema import FINAL_EMAIL_STATES, audit_log, emails

#: expected.json next to this file: per mailbox file, the outcome the demo should reach.
EXPECTED_PATH = Path(__file__).with_name("expected.json")
#: In expected.json, a value that accepts any outcome (review reason, classifier).
ANY = "any"
#: Audit events counted as "our retries" in the summary.
RETRY_EVENTS = ("llm.retry", "ticket.retry")
#: Characters of a subject shown in the summary.
SUBJECT_CHARS = 48


@dataclass
class EmailOutcome:
    """Where one mailbox file ended up.

    file: the mailbox file name; state: the email's state in the ledger; team/category/classifier:
    of its ticket (None without one); review_reason: of its latest review item (None without one);
    incidents: kinds of the incidents opened for it; actions: what the supervisor did about them.
    """

    file: str
    key: str
    subject: str
    state: str
    team: str | None = None
    category: str | None = None
    classifier: str | None = None
    review_reason: str | None = None
    incidents: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_EMAIL_STATES


def load_expected(path: Path = EXPECTED_PATH) -> dict[str, dict[str, Any]]:
    """expected.json: {file: {"team": T | "review": R, "fallback": "llm"|"keyword"|"any", ...}}."""
    return json.loads(path.read_text(encoding="utf-8"))


def email_outcomes(engine: Engine) -> dict[str, EmailOutcome]:
    """Every email in the ledger by source file name (the key when it has no file)."""
    with db.read(engine) as conn:
        rows = conn.execute(select(emails.c.key, emails.c.subject, emails.c.state, emails.c.source_ref)).all()
    by_key: dict[str, EmailOutcome] = {}
    for key, subject, state, ref in rows:
        by_key[key] = EmailOutcome(
            file=Path(ref).name if ref else key, key=key, subject=subject or "", state=state
        )
    for ticket in list_tickets(engine):
        out = by_key.get(ticket["email_key"])
        if out is not None:
            out.team, out.category, out.classifier = ticket["team"], ticket["category"], ticket["classifier"]
    for item in list_review(engine, state=None):  # oldest first: the latest reason wins
        out = by_key.get(item["email_key"])
        if out is not None:
            out.review_reason = item["reason"]
    for incident in reversed(list_incidents(engine)):  # oldest first
        out = by_key.get(incident.get("email_key") or "")
        if out is not None:
            out.incidents.append(incident["kind"])
            out.actions.append(incident.get("action") or "none")
    return {out.file: out for out in by_key.values()}


def compare_with_expected(
    outcomes: dict[str, EmailOutcome], expected: dict[str, dict[str, Any]]
) -> list[str]:
    """One line per mailbox file whose outcome differs from expected.json ([] when all match)."""
    problems = []
    for file, want in sorted(expected.items()):
        got = outcomes.get(file)
        if got is None:
            problems.append(f"{file}: not in the ledger")
            continue
        if "team" in want:
            if got.state != "ticketed" or got.team != want["team"]:
                problems.append(f"{file}: expected a {want['team']} ticket, got {_describe(got)}")
            elif want.get("fallback", ANY) != ANY and got.classifier != want["fallback"]:
                problems.append(f"{file}: expected classifier {want['fallback']}, got {got.classifier}")
        elif "review" in want and (
            got.state != "in_review" or want["review"] not in (ANY, got.review_reason)
        ):
            problems.append(f"{file}: expected review {want['review']!r}, got {_describe(got)}")
        if want.get("incident") and want["incident"] not in got.incidents:
            problems.append(f"{file}: expected a {want['incident']} incident, got {got.incidents or 'none'}")
    return problems


def truth_team(want: dict[str, Any]) -> str | None:
    """The team a human would pick for the email (expected team, else its "truth"), None when there is none."""
    return want.get("team") or want.get("truth")


def team_accuracy(outcomes: dict[str, EmailOutcome], expected: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(ticketed to the right team, emails with a right team) over the mailbox."""
    judged = {file: truth_team(want) for file, want in expected.items() if truth_team(want)}
    right = sum(1 for file, team in judged.items() if file in outcomes and outcomes[file].team == team)
    return right, len(judged)


def _describe(out: EmailOutcome) -> str:
    if out.state == "ticketed":
        return f"a {out.team} ticket ({out.classifier})"
    if out.state == "in_review":
        return f"review {out.review_reason!r}"
    return out.state


def audit_counts(engine: Engine) -> Counter[str]:
    """Audit events by name, plus `llm_failed:<kind>` per failed LLM classification."""
    counts: Counter[str] = Counter()
    with db.read(engine) as conn:
        for (body,) in conn.execute(select(audit_log.c.body)):
            entry = json.loads(body)
            event = entry.get("event", "?")
            counts[event] += 1
            if event == "classify.llm_failed":
                counts[f"llm_failed:{entry.get('kind', 'other')}"] += 1
    return counts


@dataclass
class DemoSummary:
    """The figures the demo prints at the end."""

    outcomes: dict[str, EmailOutcome]
    status: dict[str, Any]
    incidents: list[dict[str, Any]]
    review: list[dict[str, Any]]
    audit_events: Counter[str]
    audit_ok: bool
    audit_message: str
    llm_requests: int | None  # requests the scenario LLM received (None: an outside LLM)
    wall_s: float
    mismatches: list[str] | None  # None: not compared (another LLM than the built-in one)
    accuracy: tuple[int, int]

    @property
    def all_final(self) -> bool:
        return bool(self.outcomes) and all(out.final for out in self.outcomes.values())


def collect(
    engine: Engine,
    *,
    audit_ok: bool,
    audit_message: str,
    llm_requests: int | None,
    wall_s: float,
    expected: dict[str, dict[str, Any]],
    compare: bool = True,
) -> DemoSummary:
    """compare: hold the outcomes against `expected` (it describes a run on the built-in scenario LLM)."""
    outcomes = email_outcomes(engine)
    return DemoSummary(
        outcomes=outcomes,
        status=status_snapshot(engine),
        incidents=list(reversed(list_incidents(engine))),
        review=list_review(engine),
        audit_events=audit_counts(engine),
        audit_ok=audit_ok,
        audit_message=audit_message,
        llm_requests=llm_requests,
        wall_s=wall_s,
        mismatches=compare_with_expected(outcomes, expected) if compare else None,
        accuracy=team_accuracy(outcomes, expected),
    )


def format_summary(s: DemoSummary, *, config_file: str | None) -> str:
    """The human summary: tickets, review, fallbacks, incidents, audit, usage, what to run next."""
    lines: list[str] = []
    out = lines.append
    e = s.status["emails"]
    out("")
    out("=" * 72)
    out("crewguard demo: summary")
    out("=" * 72)
    out(
        f"emails: {e['total']} | ticketed {e['ticketed']} | in review {e['in_review']} | "
        f"still queued {e['queued']} | running {e['running']}"
    )
    tickets = [o for o in s.outcomes.values() if o.state == "ticketed"]
    out("")
    out(f"tickets per team ({len(tickets)}):")
    per_team = Counter(o.team for o in tickets)
    for team, n in sorted(per_team.items(), key=lambda item: (-item[1], str(item[0]))):
        by = Counter(o.classifier for o in tickets if o.team == team)
        how = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
        out(f"  {team:<10} {n:>3}   ({how})")
    out("")
    out(f"review queue ({len(s.review)} open):")
    for item in s.review:
        subject = (item.get("subject") or "(no subject)")[:SUBJECT_CHARS]
        incident = f" incident #{item['incident_id']}" if item.get("incident_id") else ""
        out(f"  #{item['id']:<3} {item['reason']:<13} {subject}{incident}")
        if item.get("detail"):
            out(f"        {str(item['detail']).splitlines()[0][:90]}")
    classifiers = Counter(o.classifier for o in tickets)
    ev = s.audit_events
    failed = {k.split(":", 1)[1]: v for k, v in ev.items() if k.startswith("llm_failed:")}
    out("")
    out("fallbacks:")
    out(
        f"  classified by the LLM {classifiers.get('llm', 0)}, by keyword rules {classifiers.get('keyword', 0)}, "
        f"left to a human (review) {e['in_review']}"
    )
    out(f"  LLM retries {ev.get('llm.retry', 0)}, ticket retries {ev.get('ticket.retry', 0)} (audit log)")
    if failed:
        out(
            "  LLM classification failed, by kind: "
            + ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))
        )
    out("")
    out(f"incidents ({len(s.incidents)}):")
    by_key = {o.key: o for o in s.outcomes.values()}
    for inc in s.incidents:
        email = by_key.get(inc.get("email_key") or "")
        about = f"'{email.subject[:SUBJECT_CHARS]}'" if email else "(fleet)"
        out(f"  #{inc['id']:<3} {inc['kind']:<12} action {inc.get('action') or 'none':<8} {about}")
    out("")
    mark = "ok" if s.audit_ok else "FAILED"
    out(f"audit verify: {mark}: {s.audit_message}")
    runs = s.status.get("runs") or {}
    requests = f", {s.llm_requests} requests seen by the scenario LLM" if s.llm_requests is not None else ""
    out(
        f"LLM usage: {runs.get('llm_calls', 0)} calls, {runs.get('tokens', 0)} tokens, "
        f"${runs.get('cost_usd', 0.0):.4f} in {runs.get('total', 0)} runs{requests}"
    )
    right, judged = s.accuracy
    if judged:
        out(f"routing: {right}/{judged} emails ticketed to the team a human would pick (others: review)")
    if s.mismatches is None:
        out("expected.json describes a run on the built-in scenario LLM: not compared")
    elif s.mismatches:
        out(f"differs from expected.json ({len(s.mismatches)}):")
        for line in s.mismatches:
            out(f"  {line}")
    else:
        out("every email ended as expected.json says")
    out(f"wall time: {s.wall_s:.1f} s")
    if config_file:
        out("")
        out("explore further:")
        for command in ("status", "tickets list", "review list", "incidents list", "audit verify"):
            out(f"  crewguard --config {config_file} {command}")
    out("")
    return "\n".join(lines)
