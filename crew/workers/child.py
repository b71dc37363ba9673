"""The entry point of a job's child process (forked by the fork server with crewai preloaded)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

from crewguard.settings import Settings

#: Exit code of a child that finished its job and recorded the outcome itself.
EXIT_DONE = 0
#: Exit code of a child whose handler raised: the daemon records a failed attempt.
EXIT_HANDLER_ERROR = 3
#: Exit code of a child that stopped because it lost its lease (another owner has the job).
EXIT_LEASE_LOST = 4
#: Exit code of a child that stopped on a cooperative cancel (SIGTERM from its daemon).
EXIT_CANCELLED = 5


def _on_sigterm(_signum: int, _frame: object) -> None:
    """First SIGTERM: cooperative cancel at the next LLM/tool boundary; SIGKILL follows anyway."""
    agents_hooks = sys.modules.get("crewguard.agents.hooks")
    if agents_hooks is not None:
        agents_hooks.CANCEL.set()
    else:
        raise SystemExit(EXIT_CANCELLED)


def run_child(settings: Settings, claim_fields: dict[str, object]) -> None:
    from crewguard.crew.workers.procgroup import become_group_leader_tied_to_parent

    become_group_leader_tied_to_parent()  # first, before slow imports: the daemon waits for it

    from crewguard.crew.flow.context import JobContext
    from crewguard.crew.ledger import db, jobs
    from crewguard.crew.workers.handlers import get_handler, job_retry_policy

    for noisy in ("crewai", "crewai.llms.base_llm", "crewai.flow.runtime", "openinference"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # our flow records what matters
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the daemon
    claim = jobs.Claim(**claim_fields)  # type: ignore[arg-type]
    engine = db.open_engine(settings.db_url, create=False)
    try:
        get_handler(settings.workers.handler)(JobContext(engine, settings, claim))
    except jobs.LeaseLost:
        os._exit(EXIT_LEASE_LOST)
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else EXIT_CANCELLED)
    except Exception as exc:
        logging.getLogger("crewguard.child").error("job %s failed:\n%s", claim.job_id, traceback.format_exc())
        try:  # record the failed attempt with its reason; the daemon only sees an exit code
            jobs.fail_attempt(
                engine,
                claim,
                error=f"{type(exc).__name__}: {exc}"[:500],
                retryable=True,
                policy=job_retry_policy(settings),
            )
        except Exception:
            os._exit(EXIT_HANDLER_ERROR)
    finally:
        engine.dispose()
    os._exit(EXIT_DONE)  # skip atexit hooks (telemetry flushes) so a finished child leaves at once
