"""What the scenario LLM understands of a triage prompt, and how it picks a category.

The crew's contract (see crewguard.llm_sim): the task's user message carries the email between
`--- EMAIL START ---` and `--- EMAIL END ---` and one line
`Allowed categories: <name> (team <team>): <description>; ...`. This module reads those, scores
the email against each allowed category (its name, its description and a small built-in synonym
table) and reads the instructions a gullible model would obey (route to team X, call tool Y).
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMAIL_START = "--- EMAIL START ---"
EMAIL_END = "--- EMAIL END ---"
ALLOWED_PREFIX = "Allowed categories:"
CLASSIFIER_PREFIX = "You are Support email classifier"
ROUTER_PREFIX = "You are Support email router"

# how many subject words make a knowledge-base query
QUERY_WORDS = 5
# a term found in the subject counts this much more than one found only in the body
SUBJECT_BONUS = 1.0
# words so common in support mail that they barely say anything about the category
WEAK_WORD_WEIGHT = 0.25
WEAK_WORDS = frozenset(
    {"account", "service", "app", "issue", "problem", "help", "support", "user", "plan", "card"}
)
# description words that carry no topic
STOPWORDS = frozenset(
    {
        "a",
        "all",
        "an",
        "and",
        "answer",
        "any",
        "anything",
        "are",
        "as",
        "at",
        "be",
        "by",
        "else",
        "for",
        "from",
        "human",
        "in",
        "is",
        "it",
        "its",
        "method",
        "methods",
        "need",
        "needs",
        "new",
        "no",
        "not",
        "of",
        "on",
        "or",
        "other",
        "our",
        "product",
        "so",
        "still",
        "that",
        "the",
        "their",
        "these",
        "this",
        "those",
        "to",
        "with",
        "your",
    }
)
# confidence when no category scored at all (the fallback category is chosen)
FALLBACK_CONFIDENCE = 0.3

# the synonyms of the catch-all category ("other", "general" or "anything else" in its description)
FALLBACK_CONCEPT = "anything else"
# concept word (as it may appear in a category name or description) -> words an email uses for it
SYNONYMS: dict[str, tuple[str, ...]] = {
    "invoice": (
        "invoice",
        "invoiced",
        "bill",
        "billed",
        "billing",
        "receipt",
        "vat",
        "charged",
        "refund",
        "payment",
    ),
    "charge": ("charge", "charged", "overcharged", "double charged", "charged twice", "debited", "deducted"),
    "refund": ("refund", "refunded", "money back", "reimburse", "chargeback"),
    "payment": (
        "payment",
        "pay",
        "paid",
        "credit card",
        "debit card",
        "paypal",
        "declined",
        "renewal",
        "subscription fee",
    ),
    "down": (
        "down",
        "outage",
        "unavailable",
        "offline",
        "not loading",
        "won't load",
        "503",
        "502",
        "unreachable",
    ),
    "broken": (
        "broken",
        "bug",
        "crash",
        "crashes",
        "crashed",
        "not working",
        "doesn't work",
        "does not work",
        "stopped working",
    ),
    "error": ("error", "errors", "exception", "500", "stack trace", "fails", "failing", "failed", "erroring"),
    "slow": (
        "slow",
        "slowly",
        "latency",
        "timeout",
        "timing out",
        "times out",
        "takes forever",
        "lag",
        "laggy",
    ),
    "api": (
        "api",
        "rest api",
        "endpoint",
        "endpoints",
        "sdk",
        "rate limit",
        "graphql",
        "api key",
        "client library",
    ),
    "webhook": ("webhook", "webhooks", "callback url", "event delivery"),
    "sso": (
        "sso",
        "saml",
        "okta",
        "azure ad",
        "oauth",
        "oidc",
        "single sign-on",
        "scim",
        "identity provider",
    ),
    "integration": (
        "integration",
        "integrate",
        "integrations",
        "zapier",
        "connector",
        "plugin",
        "token",
        "tokens",
    ),
    "login": (
        "login",
        "log in",
        "sign in",
        "signin",
        "logged out",
        "locked out",
        "can't log",
        "cannot log",
        "locked",
    ),
    "password": ("password", "reset my password", "forgot my password", "password reset"),
    "2fa": ("2fa", "two-factor", "two factor", "mfa", "authenticator", "verification code", "otp"),
    "ownership": ("owner", "ownership", "transfer the account", "admin rights", "left the company"),
    "deletion": (
        "delete my account",
        "deletion",
        "close my account",
        "remove my account",
        "gdpr",
        "erase my data",
    ),
    "pricing": ("pricing", "price", "prices", "cost", "how much", "quote"),
    "quote": ("quote", "quotation", "proposal", "purchase order", "procurement"),
    "upgrade": ("upgrade", "upgrading", "enterprise plan", "enterprise", "premium", "higher tier"),
    "seats": ("seats", "licenses", "licences", "more users", "add users", "additional users"),
    "demo": ("demo", "trial", "evaluate", "walkthrough", "talk to sales"),
    FALLBACK_CONCEPT: (
        "feedback",
        "suggestion",
        "thank you",
        "thanks",
        "partnership",
        "press",
        "interview",
        "compliment",
    ),
}

_ALLOWED_ITEM = re.compile(r"^([^\s;:()]+) \(team ([^)]+)\)(?::\s*(.*))?$", re.DOTALL)
_ALLOWED_SPLIT = re.compile(r";\s*(?=[^\s;:()]+ \(team )")
_SUBJECT_LINE = re.compile(r"^subject:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_FROM_LINE = re.compile(r"^from:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")
_MARKER = re.compile(r"\[\[sim:[^\]]*\]\]")
_INJECTED_TEAM = (
    re.compile(
        r"\b(?:route|forward|send|assign|escalate|transfer)\s+(?:(?:this|it|the|my)\s+)?"
        r"(?:(?:email|ticket|message|case|request)\s+)?"
        r"(?:directly\s+|immediately\s+|straight\s+)?to\s+(?:the\s+)?[\"'`]?([\w-]+)[\"'`]?",
        re.IGNORECASE,
    ),
    re.compile(r"\bteam\s*[:=]\s*[\"'`]?([\w-]+)", re.IGNORECASE),
)
_INJECTED_CATEGORY = re.compile(r"\bcategory\s*[:=]\s*[\"'`]?([\w-]+)", re.IGNORECASE)
_INJECTED_TOOL = re.compile(
    r"\b(?:call|use|run|invoke|execute|trigger)\s+(?:the\s+)?(?:tool\s+)?[\"'`]?([a-z][a-z0-9]*(?:_[a-z0-9]+)+)[\"'`]?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Category:
    """One allowed category as the prompt lists it."""

    name: str
    team: str
    description: str


@dataclass(frozen=True)
class Email:
    """The parts of the email the model looks at."""

    text: str  # everything between the delimiters (or the whole prompt when there are none)
    subject: str
    sender: str  # the address on the From: line, "" when there is none


@dataclass(frozen=True)
class Choice:
    """The model's classification of one email."""

    category: str
    team: str
    confidence: float
    reason: str


def role_of(system_prompt: str) -> str:
    """`classifier`, `router` or `generic`, from the agent's system prompt."""
    text = system_prompt.lstrip()
    if text.startswith(CLASSIFIER_PREFIX):
        return "classifier"
    if text.startswith(ROUTER_PREFIX):
        return "router"
    return "generic"


def extract_email(prompt: str) -> Email:
    """The email inside the delimiters of a task prompt; the whole prompt when they are missing."""
    start = prompt.find(EMAIL_START)
    end = prompt.find(EMAIL_END, start + 1) if start >= 0 else -1
    text = prompt[start + len(EMAIL_START) : end].strip() if start >= 0 and end > start else prompt.strip()
    subject_match = _SUBJECT_LINE.search(text)
    from_match = _FROM_LINE.search(text)
    address = _ADDRESS.search(from_match.group(1)) if from_match else None
    return Email(
        text=text,
        subject=subject_match.group(1).strip() if subject_match else "",
        sender=address.group(0) if address else "",
    )


def parse_allowed_categories(prompt: str) -> list[Category]:
    """The categories on the prompt's `Allowed categories:` line, in order ([] when there is none)."""
    for line in prompt.splitlines():
        position = line.find(ALLOWED_PREFIX)
        if position >= 0:
            items = _ALLOWED_SPLIT.split(line[position + len(ALLOWED_PREFIX) :].strip())
            matches = [_ALLOWED_ITEM.match(item.strip()) for item in items]
            return [
                Category(
                    name=m.group(1), team=m.group(2).strip(), description=(m.group(3) or "").strip(" .;")
                )
                for m in matches
                if m
            ]
    return []


def kb_query(email: Email) -> str:
    """A few words of the subject (or of the body when there is no subject) for the knowledge base."""
    source = email.subject or _MARKER.sub(" ", email.text)
    words = [word for word in _WORD.findall(source.lower()) if word not in STOPWORDS]
    return " ".join(words[:QUERY_WORDS]) or "support request"


def _terms_for(category: Category) -> set[str]:
    """The words and phrases that speak for a category: its own words plus their synonyms."""
    own = [w for w in _WORD.findall(f"{category.name} {category.description}".lower().replace("_", " "))]
    terms = {w for w in own if w not in STOPWORDS and len(w) > 2}
    for word in own:
        if word in STOPWORDS:
            continue
        for concept, synonyms in SYNONYMS.items():
            if word == concept or (len(concept) > 3 and word.startswith(concept)):
                terms.update(synonyms)
    if _is_fallback(category):
        terms.update(SYNONYMS[FALLBACK_CONCEPT])
    return terms


def _found(term: str, text: str) -> bool:
    """Whether a term occurs in text as whole words (a trailing plural s/es allowed)."""
    return re.search(rf"(?<![\w-]){re.escape(term)}(?:s|es)?(?![\w-])", text) is not None


def _is_fallback(category: Category) -> bool:
    return (
        category.name.lower() in {"other", "general", "misc"}
        or "anything else" in category.description.lower()
    )


def classify(email: Email, categories: list[Category]) -> Choice:
    """The best allowed category for the email by keyword scoring; the fallback category when nothing matches."""
    if not categories:
        return Choice(
            category="unknown", team="unknown", confidence=0.0, reason="no allowed categories given"
        )
    subject = email.subject.lower()
    body = _MARKER.sub(" ", email.text).lower()
    term_sets = {category.name: _terms_for(category) for category in categories}
    # a term that speaks for several categories says less about each of them
    spread: dict[str, int] = {}
    for terms in term_sets.values():
        for term in terms:
            spread[term] = spread.get(term, 0) + 1
    scored: list[tuple[float, int, Category, list[str]]] = []
    for index, category in enumerate(categories):
        score, hits = 0.0, []
        for term in sorted(term_sets[category.name]):
            if not _found(term, body):
                continue
            weight = (WEAK_WORD_WEIGHT if term in WEAK_WORDS else 1.0) / spread[term]
            if subject and _found(term, subject):
                weight += SUBJECT_BONUS / spread[term]
            score += weight
            hits.append(term)
        scored.append((score, -index, category, hits))
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    best_score, _, best, hits = scored[0]
    runner_up = scored[1][0] if len(scored) > 1 else 0.0
    if best_score <= 0:
        fallback = next((c for c in categories if _is_fallback(c)), categories[-1])
        return Choice(fallback.name, fallback.team, FALLBACK_CONFIDENCE, "no specific topic recognised")
    confidence = round(min(0.97, 0.55 + 0.4 * (best_score - runner_up) / (best_score + 1.0)), 2)
    return Choice(best.name, best.team, confidence, "mentions " + ", ".join(hits[:4]))


def injected_team(email: Email) -> str | None:
    """The team the email tells the model to route it to, if it does."""
    for pattern in _INJECTED_TEAM:
        match = pattern.search(email.text)
        if match and match.group(1).lower() not in {"me", "us", "you", "them", "a", "an"}:
            return match.group(1)
    return None


def injected_category(email: Email) -> str | None:
    """The category the email tells the model to pick, if it does."""
    match = _INJECTED_CATEGORY.search(email.text)
    return match.group(1) if match else None


def injected_tool(email: Email) -> str | None:
    """The tool (a snake_case name) the email tells the model to call, if it does."""
    match = _INJECTED_TOOL.search(email.text)
    return match.group(1) if match else None
