"""crewguard's configuration: `config/crewguard.yaml` validated by pydantic, overridable by env.

Precedence: environment (`CREWGUARD_` prefix, `__` for nesting) > the YAML file > defaults.
Secrets never live here: they come from their usual variables (OPENAI_API_KEY, SLACK_BOT_TOKEN,
LANGFUSE_*, SALESFORCE_*) and are read where they are used.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

import crewguard.config as _packaged_config
from crewguard.yamlconf import YamlError, load_yaml_with_lines

#: The packaged default configuration folder (agents.yaml, tasks.yaml, crewguard.yaml): the
#: `crewguard.config` package, i.e. `config/` in a checkout, `crewguard/config/` once installed.
PACKAGED_CONFIG_DIR = Path(_packaged_config.__file__).resolve().parent
CONFIG_ENV = "CREWGUARD_CONFIG"


class DbSettings(BaseModel):
    url: str | None = None  # default: sqlite in data_dir
    lease_s: float = 30.0  # a job whose lease expired is claimed again
    heartbeat_s: float = 5.0  # lease renewal period, well under lease_s
    max_attempts: int = 3  # attempts per job before it becomes a review item
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 60.0


class WorkerSettings(BaseModel):
    count: int = 2  # concurrent jobs (one child process each)
    handler: str = "crew"  # crew | echo (the test double)
    kill_grace_s: float = 3.0  # SIGTERM -> SIGKILL of a job's process group
    poll_s: float = 0.5  # idle wait between claim attempts
    preload: list[str] = Field(default_factory=lambda: ["crewguard.crew.workers.warm"])  # fork-server imports


class MaildirSettings(BaseModel):
    path: str | None = None  # a maildir (new/, cur/) or a plain folder of .eml files
    poll_s: float = 1.0


class ImapSettings(BaseModel):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 993
    security: Literal["tls", "starttls", "none"] = "tls"
    username: str = ""
    password_env: str = "CREWGUARD_IMAP_PASSWORD"  # the password itself is never in config
    folder: str = "INBOX"
    processed: Literal["flag", "move"] = "flag"
    processed_folder: str = "Processed"
    processed_flag: str = "$CrewguardProcessed"  # keyword set when processed == "flag" (or "\\Seen")
    poll_s: float = 30.0
    idle_s: float = 25 * 60  # re-issue IDLE before the 29-minute limit
    reconnect_cap_s: float = 60.0


class RabbitSettings(BaseModel):
    enabled: bool = False
    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue: str = "crewguard.inbox"
    dead_letter_exchange: str = "crewguard.dlx"
    prefetch: int = 16
    reconnect_cap_s: float = 30.0


class IntakeSettings(BaseModel):
    max_message_bytes: int = 25 * 1024 * 1024  # larger messages are stored truncated and sent to review
    maildir: MaildirSettings = Field(default_factory=MaildirSettings)
    imap: ImapSettings = Field(default_factory=ImapSettings)
    rabbitmq: RabbitSettings = Field(default_factory=RabbitSettings)


class LlmSettings(BaseModel):
    base_url: str = "http://127.0.0.1:8765/v1"
    model: str = "openai/gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0  # per HTTP call; the SDK's own default is 600 s
    max_attempts: int = 3  # our retries (SDK retries are off)
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 20.0
    temperature: float = 0.0
    stream: bool = False


class Category(BaseModel):
    team: str
    description: str = ""
    keywords: list[str] = Field(default_factory=list)


class BudgetSettings(BaseModel):
    max_llm_calls: int = 8
    max_tokens: int = 30_000
    max_wall_s: float = 120.0
    max_cost_usd: float = 1.0


class KeywordSettings(BaseModel):
    min_score: float = 1.0  # below this the keyword classifier is not confident
    min_margin: float = 1.0  # best must beat the runner-up by this much


class SalesforceSettings(BaseModel):
    enabled: bool = False
    instance_url: str = ""
    api_version: str = "62.0"
    external_id_field: str = "Support_Email_Key__c"
    team_field: str = "Team__c"
    category_field: str = "Type"
    session_id_env: str = "SALESFORCE_SESSION_ID"
    timeout_s: float = 10.0


class SinkSettings(BaseModel):
    primary: Literal["helpdesk", "salesforce"] = "helpdesk"
    attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 10.0
    salesforce: SalesforceSettings = Field(default_factory=SalesforceSettings)


class SlackSettings(BaseModel):
    base_url: str = "https://slack.com/api/"
    channel: str = "#support-oncall"
    manager: str = "@support-manager"  # mentioned on escalation and sink failures
    token_env: str = "SLACK_BOT_TOKEN"
    timeout_s: float = 10.0


class NotifySettings(BaseModel):
    slack: SlackSettings = Field(default_factory=SlackSettings)
    escalate_after_s: float = 900.0


class Price(BaseModel):
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0


class LangfuseSettings(BaseModel):
    enabled: bool = False
    base_url: str = ""  # LANGFUSE_BASE_URL wins when set
    flush_interval_s: float = 1.0
    timeout_s: float = 2.0


class TracingSettings(BaseModel):
    local_feed: bool = True
    langfuse: LangfuseSettings = Field(default_factory=LangfuseSettings)
    mask: Literal["off", "contacts", "bodies"] = "contacts"
    prices: dict[str, Price] = Field(default_factory=dict)


class LoopDetector(BaseModel):
    enabled: bool = True
    repeat_threshold: int = 3  # same tool call / same prompt this many times
    cycle_min_repeats: int = 2  # A-B-A-B: pattern seen this many times in a row
    near_repeat_threshold: int = 0  # 0: off; N: one tool called with N arguments that differ only in numbers


class TokenSpikeDetector(BaseModel):
    enabled: bool = True
    call_factor: float = 5.0  # one call this many MADs-scaled above the baseline
    min_call_tokens: int = 4000
    fleet_rate_factor: float = 4.0
    fleet_min_tokens_per_min: int = 50_000


class StallDetector(BaseModel):
    enabled: bool = True
    no_progress_s: float = 60.0
    call_s: float = 45.0
    heartbeat_s: float = 30.0


class ErrorBurstDetector(BaseModel):
    enabled: bool = True
    window_s: float = 300.0
    min_errors: int = 5
    min_success_rate: float = 0.5


class QueueDetector(BaseModel):
    enabled: bool = True
    max_review_depth: int = 20
    max_review_age_s: float = 4 * 3600
    max_queue_age_s: float = 900.0


class DetectorSettings(BaseModel):
    loop: LoopDetector = Field(default_factory=LoopDetector)
    token_spike: TokenSpikeDetector = Field(default_factory=TokenSpikeDetector)
    stall: StallDetector = Field(default_factory=StallDetector)
    error_burst: ErrorBurstDetector = Field(default_factory=ErrorBurstDetector)
    queue: QueueDetector = Field(default_factory=QueueDetector)


class SupervisorSettings(BaseModel):
    scan_interval_s: float = 1.0
    source: Literal["local", "langfuse"] = "local"
    langfuse_poll_s: float = 5.0
    page_interval_s: float = 2.0
    heartbeat_timeout_s: float = 30.0
    update_interval_s: float = 300.0  # a repeating incident's Slack message is updated at most this often
    resolve_quiet_s: float = 30.0  # a fleet/queue incident resolves after its condition is gone this long
    detectors: DetectorSettings = Field(default_factory=DetectorSettings)


class AuditSettings(BaseModel):
    checkpoint_every: int = 200  # entries between signed checkpoints
    checkpoint_dir: str | None = None  # default: <data_dir>/audit-checkpoints (outside the database)
    key_path: str | None = None  # default: <data_dir>/audit-signing-key.pem


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREWGUARD_", env_nested_delimiter="__", extra="forbid")

    data_dir: str = ".crewguard"
    config_dir: str | None = None  # where agents.yaml / tasks.yaml live; default: next to this file
    db: DbSettings = Field(default_factory=DbSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    categories: dict[str, Category] = Field(default_factory=dict)
    teams: list[str] = Field(default_factory=list)
    tools_allowed: list[str] = Field(default_factory=list)
    keyword: KeywordSettings = Field(default_factory=KeywordSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    sinks: SinkSettings = Field(default_factory=SinkSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @model_validator(mode="after")
    def _categories_name_configured_teams(self) -> Settings:
        for name, cat in self.categories.items():
            if self.teams and cat.team not in self.teams:
                raise ValueError(f"category {name!r} names team {cat.team!r}, which is not in teams")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env beats the YAML file, which arrives as init kwargs
        return (env_settings, init_settings)

    # --- derived paths -------------------------------------------------------------
    @cached_property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def db_url(self) -> str:
        from crewguard.crew.ledger.db import default_sqlite_url

        return self.db.url or default_sqlite_url(self.data_path)

    @property
    def agents_config_dir(self) -> Path:
        return Path(self.config_dir).resolve() if self.config_dir else PACKAGED_CONFIG_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.audit.checkpoint_dir or self.data_path / "audit-checkpoints")

    @property
    def audit_key_path(self) -> Path:
        return Path(self.audit.key_path or self.data_path / "audit-signing-key.pem")

    def team_of(self, category: str) -> str | None:
        cat = self.categories.get(category)
        return cat.team if cat else None


class ConfigError(Exception):
    """A configuration problem, located: `file:line: field: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The crewguard.yaml in use: --config, then $CREWGUARD_CONFIG, then the packaged default."""
    if explicit:
        return Path(explicit).resolve()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).resolve()
    return PACKAGED_CONFIG_DIR / "crewguard.yaml"


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load and validate crewguard.yaml; raise ConfigError naming file, line and field."""
    from pydantic import ValidationError

    file = config_path(path)
    try:
        data, lines = load_yaml_with_lines(file)
    except YamlError as exc:
        raise ConfigError([str(exc)]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{file}:1: (top level): expected a mapping of settings"])
    # Relative paths inside the file are relative to the file's folder.
    for key in ("data_dir", "config_dir"):
        if key in data and isinstance(data[key], str) and not Path(data[key]).is_absolute():
            data[key] = str((file.parent / data[key]).resolve())
    if "config_dir" not in data and (file.parent / "agents.yaml").exists():
        data["config_dir"] = str(file.parent)
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            line = lines.get(loc) or _nearest_line(lines, loc)
            field = ".".join(loc) or "(top level)"
            problems.append(f"{file}:{line}: {field}: {err['msg']}")
        raise ConfigError(problems) from None


def _nearest_line(lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int:
    while loc:
        loc = loc[:-1]
        if loc in lines:
            return lines[loc]
    return 1
