"""The `crewguard` command: a thin layer over agents, crew and supervisor.

Heavy imports (crewai, langfuse) happen inside the commands that need them, so `--help`
and the read-only commands start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from crewguard.settings import ConfigError, Settings, load_settings

Command = Callable[[argparse.Namespace, Settings], int]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _since(at: float | None) -> float | None:
    import time

    return None if at is None else max(0.0, time.time() - at)


def _engine(settings: Settings):  # type: ignore[no-untyped-def]
    from crewguard.crew.ledger import db

    return db.open_engine(settings.db_url)


# --- commands --------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.intake.cursors import intake_states
    from crewguard.crew.ledger import queries

    engine = _engine(settings)
    snap = queries.status_snapshot(engine)
    snap["intakes"] = intake_states(engine)
    if args.json:
        _print_json(snap)
        return 0
    e = snap["emails"]
    print(
        f"emails: {e['total']} total | queued {e['queued']} | running {e['running']} | "
        f"ticketed {e['ticketed']} | in review {e['in_review']} | resolved {e['resolved']}"
    )
    q = snap["queue"]
    print(f"queue: depth {q['depth']}, oldest {_age(q['oldest_age_s'])}")
    r = snap["review"]
    print(f"review: {r['open']} open, oldest {_age(r['oldest_age_s'])}")
    print(f"incidents open: {snap['incidents_open']}")
    runs = snap.get("runs") or {}
    if runs:
        print(
            f"runs: {runs.get('total', 0)} | LLM calls {runs.get('llm_calls', 0)} | "
            f"tokens {runs.get('tokens', 0)} | cost ${runs.get('cost_usd', 0.0):.4f}"
        )
    for job in snap["running"]:
        print(
            f"  running job {job['job_id']} attempt {job['attempt']} pid {job['pid']} run {job['run_id']}: "
            f"{job.get('llm_calls', 0)} LLM calls, {job.get('prompt_tokens', 0) + job.get('completion_tokens', 0)} tokens"
        )
    sup = snap.get("supervisor")
    if sup is None:
        print("supervisor: never seen (WARNING: runaway runs are not watched)")
    elif sup["age_s"] > settings.supervisor.heartbeat_timeout_s:
        print(f"supervisor: WARNING last heartbeat {_age(sup['age_s'])} ago")
    else:
        print(f"supervisor: alive ({_age(sup['age_s'])} ago)")
    for intake in snap["intakes"]:
        state = (
            "connected" if intake.get("connected") else f"DISCONNECTED ({intake.get('last_error') or '?'})"
        )
        print(
            f"intake {intake['source']}: {state}, last message {_age(_since(intake.get('last_message_at')))} ago, "
            f"lag {_age(intake.get('lag_s'))}, received {intake.get('received', 0)}"
        )
    return 0


def cmd_tickets_list(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger import queries

    rows = queries.list_tickets(_engine(settings))
    if args.json:
        _print_json(rows)
        return 0
    for t in rows:
        print(
            f"{t['id']:>5}  {t['email_key'][:12]}  {t['team']:<10} {t['category']:<12} "
            f"{t['sink']:<10} {t['classifier']:<8} {t.get('external_id') or ''}"
        )
    print(f"{len(rows)} tickets")
    return 0


def cmd_review_list(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger import review

    rows = review.list_review(_engine(settings), None if args.all else "open")
    if args.json:
        _print_json(rows)
        return 0
    for item in rows:
        detail = (item.get("detail") or "").replace("\n", " ")[:80]
        print(f"{item['id']:>5}  {item['state']:<9} {item['email_key'][:12]}  {item['reason']:<20} {detail}")
    print(f"{len(rows)} review items")
    return 0


def cmd_review_show(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger import review

    item = review.get_review(_engine(settings), args.id)
    if item is None:
        print(f"no review item {args.id}", file=sys.stderr)
        return 1
    _print_json(item)
    return 0


def cmd_review_resolve(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger import review

    if args.team not in settings.teams:
        print(f"unknown team {args.team!r}; configured teams: {', '.join(settings.teams)}", file=sys.stderr)
        return 2
    try:
        item = review.resolve_review(_engine(settings), args.id, team=args.team, category=args.category)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"review item {args.id} resolved: routed to {args.team}")
    del item
    return 0


def cmd_review_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger import review

    try:
        review.requeue_review(_engine(settings), args.id)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"review item {args.id} requeued")
    return 0


def cmd_incidents_list(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger.queries import list_incidents

    rows = list_incidents(_engine(settings))
    if args.json:
        _print_json(rows)
        return 0
    for i in rows:
        print(
            f"{i['id']:>5}  {i['state']:<8} {i['kind']:<12} {i.get('action') or '-':<8} "
            f"x{i.get('count', 1):<3} {(i.get('email_key') or '')[:12]:<12} {i['summary'][:70]}"
        )
    print(f"{len(rows)} incidents")
    return 0


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.ledger import audit

    result = audit.verify_with_settings(settings)
    print(audit.format_result(result))
    return 0 if result.ok else 1


def cmd_config_check(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.agents.config_check import check_agents_config

    problems = check_agents_config(settings)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"configuration OK: {args.config_file} and {settings.agents_config_dir}/{{agents,tasks}}.yaml")
    return 0


def cmd_intake_add(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.intake.receive import receive_files

    results = receive_files(_engine(settings), args.files, settings=settings)
    new = sum(1 for r in results if not r.duplicate and not getattr(r, "error", None))
    for path, r in zip(args.files, results, strict=False):
        note = getattr(r, "error", None) or ("duplicate" if r.duplicate else "queued")
        if r.parse_error:
            note = f"in review: {r.parse_error}"
        print(f"{path}: {note}")
    print(f"{new} new emails queued, {len(results) - new} not")
    return 0


def cmd_crew_run(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.workers.runner import run_crew_daemon

    run_crew_daemon(settings, once=args.once, workers=args.workers, config_path=args.config_file)
    return 0


def cmd_supervisor_run(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.supervisor.daemon import run_supervisor

    run_supervisor(settings, once=args.once)
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.crew.workers.runner import run_up

    return run_up(args.config_file, workers=args.workers)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.demo.run import run_demo

    return run_demo(workers=args.workers, data_dir=args.data_dir, keep=args.keep)


def cmd_llm_sim(args: argparse.Namespace, settings: Settings) -> int:
    from crewguard.llm_sim import serve

    serve(args.host, args.port, args.latency, default_scenario=args.scenario)
    return 0


# --- parser ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crewguard",
        description="An email-triage crew (CrewAI) that keeps working in production.",
    )
    parser.add_argument(
        "--config", dest="config_file", help="crewguard.yaml (default: $CREWGUARD_CONFIG or the packaged one)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Command, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    p = add("demo", cmd_demo, "the whole system on the embedded default with a sample mailbox")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--data-dir", default=None, help="keep the demo's ledger here (default: a temporary folder)"
    )
    p.add_argument("--keep", action="store_true", help="do not delete the temporary folder")
    p = add("up", cmd_up, "crew daemon and supervisor together, as two processes")
    p.add_argument("--workers", type=int, default=None)

    crew = sub.add_parser("crew", help="the crew daemon").add_subparsers(dest="crew_command", required=True)
    p = add("run", cmd_crew_run, "claim queued emails and run the crew on each", crew)
    p.add_argument("--once", action="store_true", help="exit when every queued email reached a final state")
    p.add_argument("--workers", type=int, default=None)

    sup = sub.add_parser("supervisor", help="the watchdog").add_subparsers(dest="sup_command", required=True)
    p = add("run", cmd_supervisor_run, "watch runs for loops, token spikes and stalls", sup)
    p.add_argument("--once", action="store_true", help="one scan, then exit")

    intake = sub.add_parser("intake", help="bring emails in").add_subparsers(
        dest="intake_command", required=True
    )
    p = add("add", cmd_intake_add, "enqueue .eml files", intake)
    p.add_argument("files", nargs="+")

    p = add("status", cmd_status, "emails by state, queue, running jobs, incidents, supervisor heartbeat")
    p.add_argument("--json", action="store_true")

    tickets = sub.add_parser("tickets", help="tickets created").add_subparsers(
        dest="t_command", required=True
    )
    p = add("list", cmd_tickets_list, "tickets with email key, team, category, sink, external id", tickets)
    p.add_argument("--json", action="store_true")

    review = sub.add_parser("review", help="the human review queue").add_subparsers(
        dest="r_command", required=True
    )
    p = add("list", cmd_review_list, "open review items", review)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="include resolved and requeued items")
    p = add("show", cmd_review_show, "one review item with its email and history", review)
    p.add_argument("id", type=int)
    p = add("resolve", cmd_review_resolve, "route the email to a team by hand", review)
    p.add_argument("id", type=int)
    p.add_argument("--team", required=True)
    p.add_argument("--category", default=None)
    p = add("requeue", cmd_review_requeue, "send the email through the crew again", review)
    p.add_argument("id", type=int)

    incidents = sub.add_parser("incidents", help="what the supervisor found").add_subparsers(
        dest="i_command", required=True
    )
    p = add("list", cmd_incidents_list, "incidents with kind, run, email and action", incidents)
    p.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="a_command", required=True
    )
    add("verify", cmd_audit_verify, "verify the hash chain and signed checkpoints", audit)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="c_command", required=True)
    add("check", cmd_config_check, "validate every YAML file (errors name file, line and field)", config)

    p = add("llm-sim", cmd_llm_sim, "the scenario LLM: an OpenAI-compatible server for demos and tests")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every response")
    p.add_argument("--scenario", default="normal", help="behaviour when a request names none ([[sim:NAME]])")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    from crewguard.settings import config_path

    args.config_file = str(config_path(args.config_file))
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
