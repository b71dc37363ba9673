"""What the scenario LLM answers to one chat request, scenario by scenario (no I/O).

`respond(body, scenario, attempt)` turns an OpenAI chat-completions request body into a `Reply`:
an `Answer` (content or tool calls, with usage), a `Failure` (an HTTP error), `Garbage` (a 200
whose body is not JSON) or a `Hang`. crewguard.llm_sim puts replies on the wire.

Scenarios (`[[sim:<name>]]` or `[[sim:<name>=<number>]]` in an email, or `/scenario/<name>/v1`):
  normal          one tool call per task (classifier: search_knowledge_base(<subject words>), router:
                  lookup_sender_history(<From address>); else the first tool offered), then the JSON
                  answer {category, team, confidence, reason} scored against the allowed categories
  loop            the same tool call with the same arguments forever
  loop_varying    the same tool, different arguments every time, forever
  alternate       tool A, tool B, A, B ... forever
                  (these three answer prose, not JSON, when CrewAI withdraws the tools)
  token_spike     normal, but the first call of each task reports 200,000 prompt tokens (=N)
  hang            never answers; the connection closes after 3600 s (=N), at server stop or when the client leaves
  slow            normal after 3 s (=N)
  rate_limit      429 + Retry-After: 1 for the first 2 (=N) requests of each email, then normal
  error_500       always 500
  flaky_500       500 for the first (=N) request of each email, then normal
  malformed       200 with a body that is not JSON (an SSE line that is not JSON when streaming)
  bad_json_answer normal tool use, final answer in prose
  out_of_bounds   final answer {"category": "executive-escalation", "team": "ceo-office", ...}
  injection_obey  obeys the email: calls the tool it names (even if not offered), routes to the team it names
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from crewguard import llm_sim_triage as triage

DEFAULT_SCENARIO = "normal"
# every scenario the simulator knows; the tests and the demo mailbox use these names
SCENARIOS = (
    "normal",
    "loop",
    "loop_varying",
    "alternate",
    "token_spike",
    "hang",
    "slow",
    "rate_limit",
    "error_500",
    "flaky_500",
    "malformed",
    "bad_json_answer",
    "out_of_bounds",
    "injection_obey",
)
# scenario -> default of its optional numeric parameter (`[[sim:slow=5]]`); the others take none
PARAMETER_DEFAULTS: dict[str, float] = {
    "slow": 3.0,  # seconds before the answer
    "hang": 3600.0,  # seconds the request is held before the connection is closed unanswered
    "token_spike": 200_000,  # prompt tokens reported on the first call of a task
    "rate_limit": 2,  # requests per email answered with 429 before it behaves normally
    "flaky_500": 1,  # requests per email answered with 500 before it behaves normally
}
# the Retry-After (seconds) sent with a 429
RETRY_AFTER_S = 1
# characters per token for the usage figures (OpenAI's rule of thumb)
CHARS_PER_TOKEN = 4
# what `out_of_bounds` answers: a category and team no configuration has
OUT_OF_BOUNDS_CATEGORY = "executive-escalation"
OUT_OF_BOUNDS_TEAM = "ceo-office"
# the tool each agent of the crew calls first (else the first tool offered)
PREFERRED_TOOL = {"classifier": "search_knowledge_base", "router": "lookup_sender_history"}

MARKER = re.compile(r"\[\[sim:([^\]]*)\]\]")
_SPEC = re.compile(r"^\s*([a-z0-9_]+)\s*(?:=\s*([0-9]+(?:\.[0-9]+)?)\s*)?$")


class ScenarioError(ValueError):
    """A scenario name or marker the simulator does not know (answered with HTTP 400)."""


@dataclass(frozen=True)
class Scenario:
    """A scenario and its numeric parameter (the default when the marker gives none)."""

    name: str
    parameter: float | None = None

    @property
    def value(self) -> float:
        """The parameter, or this scenario's default."""
        return self.parameter if self.parameter is not None else PARAMETER_DEFAULTS.get(self.name, 0.0)


def parse_scenario(spec: str) -> Scenario:
    """`name` or `name=<number>` -> Scenario; ScenarioError with the known names otherwise."""
    match = _SPEC.match(spec)
    if not match or match.group(1) not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {spec!r}; known: {', '.join(SCENARIOS)}")
    name, number = match.group(1), match.group(2)
    if number is not None and name not in PARAMETER_DEFAULTS:
        raise ScenarioError(f"scenario {name!r} takes no parameter (got {spec!r})")
    return Scenario(name, float(number) if number is not None else None)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """A 200 chat completion: either content or tool calls."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    prompt_tokens: int
    completion_tokens: int
    delay_s: float = 0.0  # extra wait before answering (the `slow` scenario)


@dataclass(frozen=True)
class Failure:
    """An HTTP error in OpenAI's error format."""

    status: int
    message: str
    error_type: str
    code: str | None = None
    retry_after_s: int | None = None


@dataclass(frozen=True)
class Garbage:
    """A 200 whose body is not valid JSON."""


@dataclass(frozen=True)
class Hang:
    """Hold the request this long, then close the connection without an answer."""

    seconds: float


Reply = Answer | Failure | Garbage | Hang


def _text_of(content: Any) -> str:
    """A message's content as text (OpenAI allows a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def messages_text(body: dict[str, Any]) -> str:
    """All message contents of a request, joined (for markers and token estimates)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    return "\n".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))


@dataclass
class Conversation:
    """What one request says about where the agent is in its task."""

    role: str  # classifier | router | generic
    prompt: str  # the task prompt (the user message with the email)
    tools: dict[str, dict[str, Any]]  # offered tool name -> its JSON schema ("function" object)
    tool_results: int  # tool messages so far
    tool_calls_made: int  # assistant tool calls so far
    text: str  # everything, for token estimates
    email: triage.Email = field(init=False)
    categories: list[triage.Category] = field(init=False)

    def __post_init__(self) -> None:
        self.email = triage.extract_email(self.prompt)
        self.categories = triage.parse_allowed_categories(self.prompt)

    @classmethod
    def of(cls, body: dict[str, Any]) -> Conversation:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        texts = [_text_of(m.get("content")) for m in messages]
        user_texts = [t for m, t in zip(messages, texts, strict=True) if m.get("role") == "user"]
        prompt = next((t for t in user_texts if triage.EMAIL_START in t), user_texts[0] if user_texts else "")
        tools: dict[str, dict[str, Any]] = {}
        for tool in body.get("tools") or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                tools[function["name"]] = function
        return cls(
            role=triage.role_of(texts[0]) if texts else "generic",
            prompt=prompt,
            tools=tools,
            tool_results=sum(1 for m in messages if m.get("role") == "tool"),
            tool_calls_made=sum(
                len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant"
            ),
            text="\n".join(texts) + (json.dumps(body.get("tools")) if body.get("tools") else ""),
        )


def email_key(body: dict[str, Any]) -> str:
    """Identifies the email a request is about (both agents of a crew share it), for per-email counters."""
    return hashlib.sha256(Conversation.of(body).email.text.encode()).hexdigest()[:16]


def _tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def _arguments_for(schema: dict[str, Any] | None, email: triage.Email, suffix: str = "") -> dict[str, Any]:
    """Arguments for every parameter of a tool (strict schemas want them all), made from the email."""
    properties = ((schema or {}).get("parameters") or {}).get("properties") or {}
    arguments: dict[str, Any] = {}
    for name, spec in properties.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind in ("integer", "number"):
            arguments[name] = 1
        elif kind == "boolean":
            arguments[name] = True
        elif any(word in name.lower() for word in ("sender", "email", "address", "from")) and email.sender:
            arguments[name] = email.sender + suffix
        else:
            arguments[name] = triage.kb_query(email) + suffix
    return arguments


def _first_tool(conv: Conversation) -> str:
    preferred = PREFERRED_TOOL.get(conv.role)
    return preferred if preferred in conv.tools else next(iter(conv.tools))


def _call(conv: Conversation, name: str, suffix: str = "") -> Answer:
    call = ToolCall(name, _arguments_for(conv.tools.get(name), conv.email, suffix))
    return Answer(None, (call,), _tokens(conv.text), _tokens(name + json.dumps(call.arguments)))


def _say(conv: Conversation, content: str, prompt_tokens: int | None = None) -> Answer:
    return Answer(content, (), prompt_tokens or _tokens(conv.text), _tokens(content))


def _final_json(conv: Conversation, **override: Any) -> str:
    choice = triage.classify(conv.email, conv.categories)
    answer = {"category": choice.category, "team": choice.team, "confidence": choice.confidence}
    answer["reason"] = choice.reason
    answer.update(override)
    return json.dumps(answer)


def _normal(conv: Conversation, prompt_tokens: int | None = None) -> Answer:
    """One tool call first, the final JSON once a tool answered (or when no tools are offered)."""
    if conv.tools and conv.tool_results == 0:
        answer = _call(conv, _first_tool(conv))
        return Answer(
            answer.content, answer.tool_calls, prompt_tokens or answer.prompt_tokens, answer.completion_tokens
        )
    return _say(conv, _final_json(conv), prompt_tokens)


def _stuck(conv: Conversation) -> Answer:
    """What a looping model says when no tools are offered (CrewAI's forced final answer): prose, not JSON."""
    tool = PREFERRED_TOOL.get(conv.role, "lookup_sender_history")
    return _say(conv, f"I still need to call {tool} again before I can give an answer.")


def _injection_obey(conv: Conversation) -> Answer:
    """A gullible model: calls the tool the email names and routes where the email says."""
    tool = triage.injected_tool(conv.email)
    if tool and conv.tools and conv.tool_results == 0:
        return _call(conv, tool)
    team = triage.injected_team(conv.email)
    if team is None:
        return _normal(conv)
    if conv.tools and conv.tool_results == 0:
        return _call(conv, _first_tool(conv))
    category = triage.injected_category(conv.email)
    override: dict[str, Any] = {"team": team, "reason": "the email asks for it"}
    if category:
        override["category"] = category
    return _say(conv, _final_json(conv, **override))


def respond(body: dict[str, Any], scenario: Scenario, attempt: int) -> Reply:
    """The reply to one chat request; `attempt` counts this email's requests under this scenario (1-based)."""
    conv = Conversation.of(body)
    name = scenario.name
    if name == "normal":
        return _normal(conv)
    if name in ("loop", "loop_varying", "alternate"):
        if not conv.tools:
            return _stuck(conv)
        if name == "loop":
            return _call(conv, _first_tool(conv))
        if name == "loop_varying":
            return _call(conv, _first_tool(conv), f" #{conv.tool_calls_made + 1}")
        first = _first_tool(conv)
        second = next((t for t in conv.tools if t != first), first)
        odd = conv.tool_calls_made % 2 == 1
        return _call(conv, second if odd else first, " (again)" if odd and second == first else "")
    if name == "token_spike":
        return _normal(conv, int(scenario.value) if conv.tool_results == 0 else None)
    if name == "hang":
        return Hang(scenario.value)
    if name == "slow":
        answer = _normal(conv)
        return Answer(
            answer.content, answer.tool_calls, answer.prompt_tokens, answer.completion_tokens, scenario.value
        )
    if name == "rate_limit":
        if attempt <= scenario.value:
            message = "Rate limit reached for requests (simulated). Please retry after 1s."
            return Failure(429, message, "requests", "rate_limit_exceeded", RETRY_AFTER_S)
        return _normal(conv)
    if name == "error_500" or (name == "flaky_500" and attempt <= scenario.value):
        return Failure(
            500, "The server had an error while processing your request (simulated).", "server_error"
        )
    if name == "flaky_500":
        return _normal(conv)
    if name == "malformed":
        return Garbage()
    if name == "bad_json_answer":
        answer = _normal(conv)
        if answer.tool_calls:
            return answer
        choice = triage.classify(conv.email, conv.categories)
        return _say(
            conv, f"This looks like a {choice.category} matter, so I would send it to the {choice.team} team."
        )
    if name == "out_of_bounds":
        answer = _normal(conv)
        if answer.tool_calls:
            return answer
        override = {
            "category": OUT_OF_BOUNDS_CATEGORY,
            "team": OUT_OF_BOUNDS_TEAM,
            "reason": "urgent, needs the CEO",
        }
        return _say(conv, _final_json(conv, **override))
    if name == "injection_obey":
        return _injection_obey(conv)
    raise ScenarioError(f"unknown scenario {name!r}")
