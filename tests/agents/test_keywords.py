"""The keyword classifier against a small labelled set (rules from config/crewguard.yaml)."""

from __future__ import annotations

import pytest

from crewguard.agents.classify import classify_with_keywords
from crewguard.agents.email import EmailForTriage
from crewguard.settings import Settings, load_settings

# (subject, body, expected category or None when the rules should not decide)
LABELLED = [
    ("Double charge on my invoice", "I was charged twice this month, please refund.", "invoice"),
    ("Refund request", "Can I get a refund for the annual subscription fee?", "invoice"),
    ("Receipt missing", "I need a receipt for my last payment for accounting.", "invoice"),
    ("Credit card update", "How do I change the credit card used for billing?", "invoice"),
    ("Site is down", "Your dashboard has been down for an hour, we see error 500.", "outage"),
    ("App crash", "The desktop app crashes on start, looks like a bug.", "outage"),
    ("Very slow pages", "Everything is slow today and exports fail with a timeout.", "outage"),
    ("Webhook not firing", "Our webhook endpoint gets nothing since yesterday's API change.", "integration"),
    ("SSO setup", "We want to configure SAML SSO for our workspace.", "integration"),
    ("API token", "How do I rotate the API token used by our SDK?", "integration"),
    ("Cannot log in", "I forgot my password and the reset link does not arrive.", "access"),
    ("Locked out", "My login is locked after too many attempts, 2FA device lost.", "access"),
    ("Delete my account", "Please delete my account and all data.", "access"),
    ("Pricing question", "What is the pricing for 50 seats on the enterprise plan?", "purchase"),
    ("Quote needed", "Could you send a quote and a discount for an upgrade?", "purchase"),
    ("Demo", "We would like a demo before we purchase.", "purchase"),
    ("Thank you!", "Just wanted to say thank you, great feedback from the team.", "other"),
    ("Partnership", "We are interested in a partnership, who should we talk to?", "other"),
    ("Hello", "Quick question about something.", None),
    ("Invoice and login", "My invoice is wrong and I cannot login.", None),
]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


def test_accuracy_on_labelled_set(settings: Settings) -> None:
    wrong = []
    for subject, body, expected in LABELLED:
        result = classify_with_keywords(EmailForTriage("k", "a@b.example", subject, body), settings)
        got = result.category if result else None
        if got != expected:
            wrong.append((subject, expected, got))
    assert len(wrong) <= 1, wrong  # >= 95% on the set


def test_result_is_configured_and_scored(settings: Settings) -> None:
    result = classify_with_keywords(
        EmailForTriage("k", "a", "Refund for invoice", "I was charged twice"), settings
    )
    assert result is not None
    assert (result.category, result.team, result.classifier) == ("invoice", "billing", "keyword")
    assert 0 < result.confidence <= 1


def test_subject_counts_double(settings: Settings) -> None:
    # "refund" in the subject (2) beats "password" in the body (1)
    result = classify_with_keywords(EmailForTriage("k", "a", "refund", "also my password"), settings)
    assert result is not None and result.category == "invoice"


def test_word_boundaries_and_case(settings: Settings) -> None:
    assert (
        classify_with_keywords(EmailForTriage("k", "a", "", "PASSWORD please"), settings).category == "access"
    )
    # "apiary" must not count as "api", "download" not as "down"
    assert classify_with_keywords(EmailForTriage("k", "a", "", "apiary download"), settings) is None


def test_thresholds_from_settings(settings: Settings) -> None:
    strict = settings.model_copy(update={"keyword": settings.keyword.model_copy(update={"min_score": 10})})
    email = EmailForTriage("k", "a", "Refund", "charged twice")
    assert classify_with_keywords(email, settings) is not None
    assert classify_with_keywords(email, strict) is None
