"""The crew daemon gets the IMAP and RabbitMQ intakes exactly when they are enabled."""

from __future__ import annotations

from sqlalchemy import Engine

from crewguard.crew.intake.imap import ImapIntake
from crewguard.crew.intake.rabbitmq import RabbitIntake
from crewguard.crew.ledger import db
from crewguard.crew.workers.runner import build_intakes
from crewguard.settings import Settings


def _kinds(settings: Settings, engine: Engine) -> list[type]:
    return [type(intake) for intake in build_intakes(settings, engine)]


def test_intakes_follow_the_enabled_flags(sqlite_url: str) -> None:
    engine = db.open_engine(sqlite_url)
    assert _kinds(Settings(), engine) == []
    both = Settings(intake={"imap": {"enabled": True}, "rabbitmq": {"enabled": True}})
    assert _kinds(both, engine) == [ImapIntake, RabbitIntake]
    intakes = build_intakes(both, engine)
    assert [i.name for i in intakes] == ["imap", "rabbitmq"]  # nothing connects before the first poll()
