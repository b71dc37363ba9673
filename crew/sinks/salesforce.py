"""Salesforce sink: one Case per email, upserted on an External ID field holding the email key.

`PATCH /services/data/vXX.X/sobjects/Case/<ExternalIdField>/<email key hex>` creates the
case the first time and updates the same case on every retry, so a retry after a lost
response never duplicates it (research/reliability.md §4). The email key is a hex digest,
so no suffix of it can collide with a URL format extension.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter

from crewguard.crew.sinks.base import RetryableSinkError, SinkError, TicketRequest

if TYPE_CHECKING:
    from simple_salesforce import Salesforce

    from crewguard.settings import Settings

#: Salesforce error codes that mean "try again shortly" even though the status is 4xx.
RETRYABLE_ERROR_CODES = frozenset({"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
#: Case.Origin for tickets opened from support email.
CASE_ORIGIN = "Email"
#: Descriptions longer than this are cut (Case.Description holds 32k characters).
MAX_DESCRIPTION_CHARS = 32_000


class _TimeoutAdapter(HTTPAdapter):
    """Gives every request a timeout (simple-salesforce passes none, and requests waits forever)
    and keeps a session's explicit CA bundle (requests lets REQUESTS_CA_BUNDLE override it)."""

    def __init__(self, timeout_s: float, ca_bundle: str | None = None) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.ca_bundle = ca_bundle

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        if self.ca_bundle is not None:
            kwargs["verify"] = self.ca_bundle
        return super().send(request, **kwargs)


class SalesforceSink:
    name = "salesforce"

    def __init__(
        self,
        *,
        instance_url: str,
        session_id: str,
        api_version: str = "62.0",
        external_id_field: str = "Support_Email_Key__c",
        team_field: str = "Team__c",
        category_field: str = "Type",
        timeout_s: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        """`session`: the requests session to use (e.g. with `verify=` a private CA); it gets
        a per-call timeout of `timeout_s` mounted on https://."""
        from simple_salesforce import Salesforce

        if not instance_url:
            raise SinkError("salesforce: sinks.salesforce.instance_url is not set", retryable=False)
        if not session_id:
            raise SinkError("salesforce: no session id given", retryable=False)
        self._secret = session_id
        self.external_id_field = external_id_field
        self.team_field = team_field
        self.category_field = category_field
        http = session or requests.Session()
        ca_bundle = http.verify if isinstance(http.verify, str) else None
        http.mount("https://", _TimeoutAdapter(timeout_s, ca_bundle))
        self._sf: Salesforce = Salesforce(
            instance_url=instance_url, session_id=session_id, version=api_version, session=http
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, session: requests.Session | None = None) -> SalesforceSink:
        """Build from settings.sinks.salesforce; the session id comes from its env variable."""
        sf = settings.sinks.salesforce
        session_id = os.environ.get(sf.session_id_env, "")
        if not session_id:
            raise SinkError(
                f"salesforce: environment variable {sf.session_id_env} is not set", retryable=False
            )
        return cls(
            instance_url=sf.instance_url,
            session_id=session_id,
            api_version=sf.api_version,
            external_id_field=sf.external_id_field,
            team_field=sf.team_field,
            category_field=sf.category_field,
            timeout_s=sf.timeout_s,
            session=session,
        )

    def case_fields(self, req: TicketRequest) -> dict[str, Any]:
        """The Case body (never the Id or the External ID field: they are in the URL)."""
        description = f"From: {req.sender}\nCategory: {req.category}\n\n{req.summary}"
        return {
            "Subject": req.subject[:255],
            "Description": description[:MAX_DESCRIPTION_CHARS],
            "Origin": CASE_ORIGIN,
            self.team_field: req.team,
            self.category_field: req.category,
        }

    def create_ticket(self, req: TicketRequest) -> str:
        """Upsert the Case for `req.email_key`; returns the Case Id."""
        from simple_salesforce.exceptions import SalesforceError

        try:
            resp = self._sf.Case.upsert(
                f"{self.external_id_field}/{req.email_key}", self.case_fields(req), raw_response=True
            )
            case_id = _id_of(resp)
            if case_id is None:  # 204 No Content (older API versions) or no id: look it up
                record = self._sf.Case.get_by_custom_id(self.external_id_field, req.email_key)
                case_id = record.get("Id") if isinstance(record, dict) else None
            if not case_id:
                raise SinkError("salesforce: upsert succeeded but no Case Id was returned", retryable=False)
            return str(case_id)
        except SalesforceError as exc:
            raise self._api_error(exc) from None
        except requests.Timeout:
            raise RetryableSinkError("salesforce: request timed out") from None
        except requests.ConnectionError as exc:
            raise RetryableSinkError(
                self._scrub(f"salesforce: connection failed: {type(exc).__name__}")
            ) from None
        except requests.RequestException as exc:
            raise SinkError(self._scrub(f"salesforce: request failed: {exc}"), retryable=False) from None

    def _api_error(self, exc: Any) -> SinkError:
        status = int(exc.status)
        code, detail = _first_error(exc.content)
        message = self._scrub(f"salesforce: HTTP {status} {code or ''}: {detail}".replace("  ", " "))
        if status >= 500 or status == 429 or code in RETRYABLE_ERROR_CODES:
            return RetryableSinkError(message)
        return SinkError(message, retryable=False)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _id_of(resp: requests.Response) -> str | None:
    if resp.status_code == 204 or not resp.content:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("id") if isinstance(body, dict) else None


def _first_error(content: Any) -> tuple[str | None, str]:
    """Salesforce errors are a JSON list of {errorCode, message}; anything else is shown cut short."""
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return content[0].get("errorCode"), str(content[0].get("message", ""))[:300]
    if isinstance(content, dict):
        return content.get("errorCode"), str(content.get("message", ""))[:300]
    return None, str(content)[:300]
