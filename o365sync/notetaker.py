"""Notetaker after a calendar round: the list of meetings to record, and Explicit Consent Mode's writes.

- `to_record`: upcoming external, CRM-matched meetings with an online-meeting link, when the tenant enabled
  Notetaker and the user did not turn it off (`notetaker_queue`).
- Explicit Consent Mode (tenant setting): an upcoming external, CRM-matched meeting the user organizes that has no
  online-meeting link gets a Teams meeting (`POST me/onlineMeetings/createOrGet`, idempotent: keyed by the event
  id) and its body gets the join link and a consent notice (`PATCH me/events/{id}`, on the series master for a
  recurring meeting). These are the only writes the product makes to a calendar, and only the allowlist in
  `CALENDAR_CONSENT_WRITE_ALLOWLIST` permits them. Meetings organized by someone else are never changed (an
  attendee's edit would only change their own copy). A run that dies between the two writes is finished by the
  next: createOrGet returns the same meeting and the notice's marker prevents a second notice.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from o365sync.graph import GraphClient
from o365sync.settings import Settings
from o365sync.store import consent_mode_candidates, open_store, record_consent_link, refresh_notetaker_queue
from o365sync.tenants import TenantConfig

CONSENT_MARKER = "o365sync-notetaker-consent"


@dataclass
class NotetakerCounts:
    to_record: int = 0
    links_added: int = 0


def consent_notice(join_url: str) -> str:
    return (
        f'<div id="{CONSENT_MARKER}"><p>This meeting may be recorded and transcribed by a notetaker. By joining '
        f'you consent to the recording; tell the organizer if you do not.</p><p><a href="{html.escape(join_url)}">'
        "Join the Microsoft Teams meeting</a></p></div>"
    )


def _with_notice(body: dict | None, join_url: str) -> str | None:
    """The event's body with the notice appended (HTML), or None when the notice is already there."""
    content = str((body or {}).get("content") or "")
    if CONSENT_MARKER in content:
        return None
    if str((body or {}).get("contentType", "html")).lower() == "text":
        content = html.escape(content).replace("\n", "<br>")
    return content + consent_notice(join_url)


def add_consent_links(
    client: GraphClient, settings: Settings, tenant_id: str, user_oid: str, organizer: str, now: datetime
) -> int:
    with open_store(settings, tenant_id, write=False, user_oid=user_oid) as con:
        candidates = consent_mode_candidates(con, tenant_id, user_oid, organizer, now)
    for event_id, _instance, start, end, subject in candidates:
        payload = {
            "externalId": event_id,
            "startDateTime": start.isoformat(),
            "endDateTime": end.isoformat(),
            "subject": subject or "",
        }
        meeting = client.request("POST", "me/onlineMeetings/createOrGet", content=json.dumps(payload).encode()).json()
        join_url = meeting["joinWebUrl"]
        path = f"me/events/{quote(event_id, safe='')}"
        body = _with_notice(client.get(path, params={"$select": "body"}).json().get("body"), join_url)
        if body is not None:
            client.request(
                "PATCH", path, content=json.dumps({"body": {"contentType": "html", "content": body}}).encode()
            )
        with open_store(settings, tenant_id, write=True, user_oid=user_oid) as con:
            record_consent_link(con, tenant_id, user_oid, event_id, join_url, now)
    return len(candidates)


def run_notetaker(
    client: GraphClient, settings: Settings, tenant: TenantConfig, user_oid: str, organizer: str, now: datetime
) -> NotetakerCounts:
    counts = NotetakerCounts()
    enabled = tenant.feature_on("notetaker", user_oid)
    if enabled and tenant.notetaker_explicit_consent and organizer:
        counts.links_added = add_consent_links(client, settings, tenant.id, user_oid, organizer, now)
    with open_store(settings, tenant.id, write=True, user_oid=user_oid) as con:
        counts.to_record = refresh_notetaker_queue(con, tenant.id, user_oid, enabled, now)
    return counts
