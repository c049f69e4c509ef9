"""The analysts' views over a tenant's tables, created inside every published snapshot (`publishing`).

They live beside the schema because they read its tables: a migration that changes a column changes them too
(and bumps `ANALYTICS_VERSION`). docs/ANALYSTS.md documents every column; `o365sync.analytics` exports them.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

ANALYTICS_VERSION = 1  # bump when a view's columns change (recorded in snapshot_info and export manifests)

# Each email's / meeting's primary CRM match (`m`, with `m.n` its number of matches) and the columns it gives.
_PRIMARY_COLUMNS = """       m.crm_id AS primary_crm_id, m.crm_kind AS primary_crm_kind, m.crm_name AS primary_crm_name,
       m.matched_address AS primary_matched_address, m.crm_account_id, m.crm_account_name,
       coalesce(m.n, 0) AS crm_match_count,
"""


def _primary_match(kind: str, alias: str, key: str) -> str:
    return f"""LEFT JOIN (
    SELECT *, count(*) OVER w AS n FROM crm_matches WHERE kind = '{kind}'
    WINDOW w AS (PARTITION BY tenant_id, user_oid, activity_id)
    QUALIFY row_number() OVER (w ORDER BY is_primary DESC, crm_id) = 1
) m ON m.tenant_id = {alias}.tenant_id AND m.user_oid = {alias}.user_oid AND m.activity_id = {alias}.{key}
"""


# Unqualified table names in a view bind to the view's own database, so the views work however the snapshot is
# opened: `duckdb.connect(path, read_only=True)`, or ATTACHed under any name next to other tenants' snapshots.
VIEWS: dict[str, str] = {
    "crm_records": """
SELECT p.crm_id, p.crm_kind, p.name, p.account_id, a.name AS account_name, p.emails
FROM (
    SELECT crm_id, any_value(kind) AS crm_kind, any_value(name) AS name,
           -- a Salesforce person account is its own account
           CASE WHEN any_value(kind) = 'person_account' THEN coalesce(min(account_id), crm_id)
                ELSE min(account_id) END AS account_id,
           list_sort(list(DISTINCT lower(trim(email))) FILTER (WHERE email IS NOT NULL)) AS emails
    FROM crm_people GROUP BY crm_id
    UNION ALL
    SELECT crm_id, 'account', any_value(name), crm_id, NULL FROM crm_accounts GROUP BY crm_id
) p
LEFT JOIN (SELECT crm_id, any_value(name) AS name FROM crm_accounts GROUP BY crm_id) a ON a.crm_id = p.account_id
""",
    "crm_matches": """
SELECT m.kind, m.tenant_id, m.user_oid, m.activity_id, m.occurred_at, m.crm_id, m.crm_kind, r.name AS crm_name,
       m.matched_address, coalesce(m.is_primary, false) AS is_primary,
       CASE WHEN m.crm_kind = 'account' THEN m.crm_id ELSE r.account_id END AS crm_account_id,
       CASE WHEN m.crm_kind = 'account' THEN r.name ELSE r.account_name END AS crm_account_name
FROM (
    SELECT 'email' AS kind, c.tenant_id, c.user_oid, c.graph_id AS activity_id,
           CASE WHEN e.folder = 'sentitems' THEN coalesce(e.sent_at, e.received_at)
                ELSE coalesce(e.received_at, e.sent_at) END AS occurred_at,
           c.crm_id, c.crm_kind, c.matched_address, c.is_primary
    FROM email_crm_matches c
    JOIN emails e ON e.tenant_id = c.tenant_id AND e.user_oid = c.user_oid AND e.graph_id = c.graph_id
    UNION ALL
    SELECT 'meeting', c.tenant_id, c.user_oid, c.event_id, g.start_at, c.crm_id, c.crm_kind, c.matched_address,
           c.is_primary
    FROM meeting_crm_matches c
    JOIN meetings g ON g.tenant_id = c.tenant_id AND g.user_oid = c.user_oid AND g.event_id = c.event_id
) m
LEFT JOIN crm_records r ON r.crm_id = m.crm_id AND r.crm_kind = m.crm_kind
""",
    "email_activity": f"""
SELECT e.tenant_id, e.user_oid, e.graph_id AS activity_id, e.internet_message_id, e.conversation_id, e.folder,
       CASE WHEN e.folder = 'sentitems' THEN 'outbound' ELSE 'inbound' END AS direction,
       e.subject, e.from_name, e.from_address,
       coalesce(p.to_addresses, []) AS to_addresses, coalesce(p.cc_addresses, []) AS cc_addresses,
       coalesce(p.participant_count, 0) AS participant_count,
       e.received_at, e.sent_at,
       CASE WHEN e.folder = 'sentitems' THEN coalesce(e.sent_at, e.received_at)
            ELSE coalesce(e.received_at, e.sent_at) END AS occurred_at,
       e.has_attachments,
{_PRIMARY_COLUMNS}       e.web_link, e.imported_at
FROM emails e
LEFT JOIN (
    SELECT tenant_id, user_oid, graph_id,
           list_sort(list(DISTINCT address) FILTER (WHERE role = 'to')) AS to_addresses,
           list_sort(list(DISTINCT address) FILTER (WHERE role = 'cc')) AS cc_addresses,
           count(DISTINCT address) AS participant_count
    FROM email_participants GROUP BY ALL
) p ON p.tenant_id = e.tenant_id AND p.user_oid = e.user_oid AND p.graph_id = e.graph_id
{_primary_match("email", "e", "graph_id")}""",
    "meeting_activity": f"""
SELECT g.tenant_id, g.user_oid, g.event_id AS activity_id, g.event_type,
       coalesce(g.series_master_id, g.event_id) AS series_id, g.ical_uid, g.subject,
       g.start_at, g.end_at, date_diff('minute', g.start_at, g.end_at) AS duration_minutes, g.start_tz,
       g.is_all_day, g.is_online, g.is_internal, g.organizer_name, g.organizer_address,
       coalesce(a.attendee_addresses, []) AS attendee_addresses, coalesce(a.attendee_count, 0) AS attendee_count,
       coalesce(a.accepted_count, 0) AS accepted_count,
       g.start_at AS occurred_at,
{_PRIMARY_COLUMNS}       g.web_link, g.imported_at, g.updated_at
FROM meetings g
LEFT JOIN (
    SELECT tenant_id, user_oid, event_id,
           list_sort(list(DISTINCT lower(address)) FILTER (WHERE role <> 'organizer')) AS attendee_addresses,
           count(DISTINCT lower(address)) FILTER (WHERE role <> 'organizer') AS attendee_count,
           count(DISTINCT lower(address)) FILTER (WHERE role <> 'organizer' AND lower(response) = 'accepted')
               AS accepted_count
    FROM meeting_attendees GROUP BY ALL
) a ON a.tenant_id = g.tenant_id AND a.user_oid = g.user_oid AND a.event_id = g.event_id
{_primary_match("meeting", "g", "event_id")}""",
    "activities": """
SELECT 'email' AS kind, tenant_id, user_oid, activity_id, conversation_id AS thread_id, subject, occurred_at,
       CAST(NULL AS TIMESTAMPTZ) AS ends_at, direction, from_address, participant_count,
       primary_crm_id, primary_crm_kind, primary_crm_name, crm_account_id, crm_account_name, crm_match_count,
       web_link, imported_at
FROM email_activity
UNION ALL
SELECT 'meeting', tenant_id, user_oid, activity_id, series_id, subject, occurred_at, end_at, NULL,
       organizer_address, attendee_count + 1, primary_crm_id, primary_crm_kind, primary_crm_name, crm_account_id,
       crm_account_name, crm_match_count, web_link, imported_at
FROM meeting_activity
""",
    "sync_status": """
SELECT tenant_id, user_oid, coalesce(feature, 'email') AS feature, stage, last_run_at, last_success_at,
       CAST(epoch(now()) - epoch(last_success_at) AS BIGINT) AS lag_seconds,
       consecutive_failures, last_error, next_retry_at,
       stage = 'reconnect_needed' AS needs_reconnect, stage = 'consent_needed' AS needs_consent,
       scanned, matched, imported, discarded, excluded AS excluded_json
FROM sync_state
""",
}
VIEW_NAMES: tuple[str, ...] = tuple(VIEWS)  # in creation order (later views use earlier ones)


def quoted_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_views(
    con: duckdb.DuckDBPyConnection,
    catalog: str | None = None,
    *,
    temporary: bool = False,
    tenant_id: str | None = None,
    generation: int | None = None,
) -> None:
    """Create (or replace) the analyst views in `catalog` (default: the connection's current database), plus the
    one-row table `snapshot_info` (published_at, tenant_id, analytics_version, generation) unless `temporary`.

    `publishing` calls it on its copy of the tenant file, where each users' table (`emails`, ...) is already a view
    over the generation's copies of the bucket files, before renaming the copy into place. The view bodies use
    unqualified names, which DuckDB binds to the view's own database: the views read the snapshot's tables and
    views, never the live store's.
    `temporary=True` makes session views over whatever database is in use (exports of snapshots published
    before the views existed)."""
    prefix = "" if temporary or catalog is None else f"{quoted_identifier(catalog)}.main."
    kind = "TEMP VIEW" if temporary else "VIEW"
    for name, body in VIEWS.items():
        con.execute(f"CREATE OR REPLACE {kind} {prefix}{name} AS {body}")
    if not temporary:
        con.execute(
            f"CREATE OR REPLACE TABLE {prefix}snapshot_info AS SELECT now() AS published_at, "
            "CAST(? AS VARCHAR) AS tenant_id, CAST(? AS INTEGER) AS analytics_version, "
            "CAST(? AS BIGINT) AS generation",
            [tenant_id, ANALYTICS_VERSION, generation],
        )


def add_views_to_file(path: Path, tenant_id: str | None = None) -> None:
    """`create_views` on a snapshot file nobody else has open (e.g. the `.tmp` file before it is renamed)."""
    con = duckdb.connect(str(path))
    try:
        create_views(con, tenant_id=tenant_id)
    finally:
        con.close()
