"""What a job does once its child process runs: a registry of handlers by name.

`crew` is the real triage flow; `echo` is a first-class test double that exercises the same
ledger path (fencing, ticket, audit) without an LLM, for chaos tests and benchmarks; `crash`,
`crash_once`, `sleep` and `hang` are test doubles for dying and runaway workers.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable

from crewguard.crew.flow.context import JobContext
from crewguard.crew.ledger import db, jobs
from crewguard.crew.sinks.helpdesk import helpdesk_ticket_id
from crewguard.retry import RetryPolicy
from crewguard.settings import Settings


def job_retry_policy(settings: Settings) -> RetryPolicy:
    """Backoff between attempts of a whole job (the ledger re-queues it)."""
    return RetryPolicy(settings.db.max_attempts, settings.db.backoff_base_s, settings.db.backoff_cap_s)


Handler = Callable[[JobContext], None]

#: Upper bound of the echo handler's random pause, so chaos kills land mid-job.
ECHO_MAX_SLEEP_S = 0.3


def echo_handler(ctx: JobContext) -> None:
    """Ticket every email to the first configured team after a short random pause."""
    time.sleep(random.uniform(0, ECHO_MAX_SLEEP_S))
    team = ctx.settings.teams[0] if ctx.settings.teams else "general"
    category = next(iter(ctx.settings.categories), "other")
    with db.write(ctx.engine) as conn:
        jobs.complete_ticketed(
            conn,
            ctx.claim,
            sink="helpdesk",
            team=team,
            category=category,
            classifier="echo",
            external_id=helpdesk_ticket_id(ctx.claim.email_key),
        )


#: How long the `sleep` and `hang` test doubles run: far longer than any test waits for them.
SLEEP_HANDLER_S = 3600.0
#: Exit status of the `crash` test doubles: a worker that dies without recording anything.
CRASH_EXIT_CODE = 9


def crash_handler(ctx: JobContext) -> None:
    """Test double: the worker process dies on every attempt (the job ends in review)."""
    os._exit(CRASH_EXIT_CODE)


def crash_once_handler(ctx: JobContext) -> None:
    """Test double: the worker dies on the first attempt only; a retry tickets the email."""
    if ctx.claim.attempt == 1:
        os._exit(CRASH_EXIT_CODE)
    echo_handler(ctx)


def sleep_handler(ctx: JobContext) -> None:
    """Test double: a runaway run that a SIGTERM (cooperative cancel) ends."""
    time.sleep(SLEEP_HANDLER_S)


def hang_handler(ctx: JobContext) -> None:
    """Test double: a runaway run that ignores SIGTERM, blocked on a subprocess in its process group.

    The subprocess inherits the ignored SIGTERM, so only a SIGKILL of the whole group ends both.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.run(["sleep", str(int(SLEEP_HANDLER_S))], check=False)


def crew_handler(ctx: JobContext) -> None:
    from crewguard.crew.flow.triage import process_email

    process_email(ctx)


HANDLERS: dict[str, Handler] = {
    "crew": crew_handler,
    "echo": echo_handler,
    "crash": crash_handler,
    "crash_once": crash_once_handler,
    "sleep": sleep_handler,
    "hang": hang_handler,
}


def get_handler(name: str) -> Handler:
    try:
        return HANDLERS[name]
    except KeyError:
        raise ValueError(f"unknown worker handler {name!r}; known: {', '.join(sorted(HANDLERS))}") from None
