"""The agents' tools: deterministic local answers, no I/O, and the registry they are picked from.

Only a tool that is both in TOOL_REGISTRY and in `settings.tools_allowed` is ever given to an
agent (`tools_for`); the PRE_TOOL_CALL hook refuses anything else at run time (agents/hooks.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # crewai is imported only when a crew is built: config checks stay fast
    from crewai.tools import BaseTool


log = logging.getLogger(__name__)

#: Longest tool argument we look at; the LLM may echo a whole email into a query.
MAX_ARG_CHARS = 500
#: Knowledge-base hits returned per query.
MAX_KB_HITS = 2

# Senders' domains with a support history; stands in for a CRM lookup without any I/O.
_SENDER_HISTORY: dict[str, str] = {
    "acme.example": "3 previous tickets (billing x2, integration x1); enterprise customer",
    "globex.example": "1 previous ticket (outage); standard plan",
    "initech.example": "no previous tickets; trial account",
}
# (keywords, article): a tiny built-in FAQ.
_KNOWLEDGE_BASE: tuple[tuple[frozenset[str], str], ...] = (
    (
        frozenset({"invoice", "refund", "charge", "charged", "payment", "billing"}),
        "KB-101 Refunds and double charges are handled by the billing team within 3 business days.",
    ),
    (
        frozenset({"password", "login", "2fa", "locked", "reset", "account"}),
        "KB-201 Password resets and 2FA recovery are handled by the accounts team.",
    ),
    (
        frozenset({"api", "webhook", "sso", "saml", "token", "integration", "sdk"}),
        "KB-301 API keys, webhooks and SSO setup are handled by technical support (integrations).",
    ),
    (
        frozenset({"down", "outage", "error", "crash", "500", "slow", "bug"}),
        "KB-401 Outages and errors go to technical support; check the status page first.",
    ),
    (
        frozenset({"pricing", "quote", "upgrade", "seats", "demo", "discount", "trial"}),
        "KB-501 Pricing, quotes and upgrades are handled by the sales team.",
    ),
)
_WORD = re.compile(r"[a-z0-9]+")


def lookup_sender_history(sender: str) -> str:
    """The history of the sender's domain, or a 'no history' line."""
    domain = sender[:MAX_ARG_CHARS].strip().strip("<>").rpartition("@")[2].lower()
    return _SENDER_HISTORY.get(domain, "no support history on record for this sender")


def search_knowledge_base(query: str) -> str:
    """The best matching FAQ articles (keyword overlap), or a 'no article' line."""
    words = set(_WORD.findall(query[:MAX_ARG_CHARS].lower()))
    scored = sorted(((len(words & keys), article) for keys, article in _KNOWLEDGE_BASE), key=lambda s: -s[0])
    hits = [article for score, article in scored[:MAX_KB_HITS] if score > 0]
    return "\n".join(hits) if hits else "no matching knowledge-base article"


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it: one string argument, a local function behind it."""

    name: str
    description: str
    argument: str
    argument_description: str
    function: Callable[[str], str]


#: Every tool an agent may be configured with, by the name used in agents.yaml.
TOOL_REGISTRY: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "lookup_sender_history",
            "Look up the support history of an email sender (previous tickets, plan).",
            "sender",
            "the sender's email address",
            lookup_sender_history,
        ),
        ToolSpec(
            "search_knowledge_base",
            "Search the support knowledge base for articles about a problem.",
            "query",
            "a few keywords describing the customer's problem",
            search_knowledge_base,
        ),
    )
}


@cache
def _tool_class(name: str) -> type[BaseTool]:
    """A CrewAI BaseTool subclass for the registered tool `name` (built once, on first use)."""
    from crewai.tools import BaseTool
    from pydantic import BaseModel, Field, create_model

    spec = TOOL_REGISTRY[name]
    args = create_model(
        f"{name}_args", **{spec.argument: (str, Field(description=spec.argument_description))}
    )

    def _run(self: BaseTool, **kwargs: str) -> str:
        return spec.function(str(kwargs.get(spec.argument, "")))

    return type(
        f"{name}_tool",
        (BaseTool,),
        {
            "__module__": __name__,
            "__annotations__": {"name": str, "description": str, "args_schema": type[BaseModel]},
            "name": spec.name,
            "description": spec.description,
            "args_schema": args,
            "_run": _run,
        },
    )


def make_tool(name: str) -> BaseTool:
    """A fresh instance of a registered tool (usage counters are per crew)."""
    return _tool_class(name)()


class UnknownToolError(ValueError):
    """agents.yaml names a tool that is not in TOOL_REGISTRY."""


_warned_not_allowed: set[str] = set()


def allowed_tool_names(names: Iterable[str], tools_allowed: Iterable[str]) -> list[str]:
    """The names from `names` that are both registered and allowed; an unregistered name is an error."""
    allowed = set(tools_allowed)
    result = []
    for name in names:
        if name not in TOOL_REGISTRY:
            raise UnknownToolError(f"unknown tool {name!r} (known: {', '.join(sorted(TOOL_REGISTRY))})")
        if name in allowed:
            result.append(name)
        elif name not in _warned_not_allowed:  # once per process, not once per email
            _warned_not_allowed.add(name)
            log.warning("tool %r is configured for an agent but not in tools_allowed: not given", name)
    return result


def tools_for(names: Iterable[str], tools_allowed: Iterable[str]) -> list[BaseTool]:
    """Fresh tool instances (usage counters are per crew) for the registered and allowed names."""
    return [make_tool(name) for name in allowed_tool_names(names, tools_allowed)]
