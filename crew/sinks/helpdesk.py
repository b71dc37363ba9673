"""The embedded helpdesk: the ledger's `tickets` table is the helpdesk itself.

The ticket row is written by the lead in the same fenced transaction as the job's
completion (`jobs.complete_ticketed`), so this sink does no I/O: it only names the ticket.
"""

from __future__ import annotations

from crewguard.crew.sinks.base import TicketRequest

#: External ids look like HD-3f2a9c01b7de: the prefix plus this many hex digits of the email key.
HELPDESK_ID_HEX_DIGITS = 12


def helpdesk_ticket_id(email_key: str) -> str:
    """The deterministic helpdesk id for an email (same email, same id)."""
    return f"HD-{email_key[:HELPDESK_ID_HEX_DIGITS]}"


class HelpdeskSink:
    name = "helpdesk"

    def create_ticket(self, req: TicketRequest) -> str:
        return helpdesk_ticket_id(req.email_key)
