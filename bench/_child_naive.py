"""Benchmark child: a plain-Python baseline doing the product's initial-import job naively, in a fresh process.

Modelled on a naive importer (requests + stdlib json + DuckDB row inserts), but doing the same work as
`sync_mailbox_now`'s first run: list Inbox and Sent Items (same `$select`, `$expand`, `$filter` and page size as the
product,
`Prefer: IdType="ImmutableId"`), apply the same exclusions (draft, meeting message, sensitivity, automated sender,
internal-only) and the same CRM match (contacts and unconverted leads by exact address, accounts by domain, never
free-mail or own domains) with dicts in a Python loop, fetch the plain-text body of every matched message with one
GET each, and write emails, participants and matches into a fresh DuckDB file with `executemany` per page and table.
It keeps one `requests.Session` (keep-alive): a new TLS connection per request would be a straw man.
No delta baseline, no cursors, no retries: it runs only with the simulator's limits off.

Imports nothing from o365sync. The parent passes the bearer token (from our TokenProvider), `$select`, the filter
literal, the CRM (read here from the CRM-snapshot-only store template), the tenant's domains and the free-mail list
in BENCH_* variables. Its wall time is also split by stage (list pages,
classify + match, body GETs, DuckDB inserts) with perf_counter."""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from urllib.parse import quote  # noqa: E402

import duckdb  # noqa: E402
import requests  # noqa: E402
from _measure import Meter, emit_measured, imports_done  # noqa: E402

imports_done(T_START)

GRAPH = os.environ["O365SYNC_GRAPH_URL"].rstrip("/")
PAGE_SIZE = int(os.environ.get("BENCH_NAIVE_PAGE_SIZE", "500"))
OWN = {d.strip().lower() for d in os.environ["BENCH_OWN_DOMAINS"].split(",") if d.strip()}
FREE_MAIL = set(os.environ["BENCH_FREE_MAIL"].split())
SENSITIVE = {"personal", "private", "confidential"}
SENSITIVITY_ID = re.compile(r"\s*integer\s+0x0*36\s*", re.IGNORECASE)
AUTOMATED = re.compile(
    r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]?daemon|postmaster|bounces?"
    r"|notifications?|alerts?)([+-].*)?$"
)
DDL = """
CREATE TABLE emails (graph_id VARCHAR, folder VARCHAR, internet_message_id VARCHAR, conversation_id VARCHAR,
    subject VARCHAR, body_text VARCHAR, from_name VARCHAR, from_address VARCHAR, received_at TIMESTAMPTZ,
    sent_at TIMESTAMPTZ, has_attachments BOOLEAN, web_link VARCHAR);
CREATE TABLE email_participants (graph_id VARCHAR, role VARCHAR, name VARCHAR, address VARCHAR);
CREATE TABLE email_crm_matches (graph_id VARCHAR, crm_id VARCHAR, crm_kind VARCHAR, matched_address VARCHAR);
"""

meter = Meter()
# The CRM snapshot, as dicts: normalised address -> [(crm id, kind)], account domain -> [crm id].
people: dict[str, list[tuple[str, str]]] = {}
accounts: dict[str, list[str]] = {}
with duckdb.connect(os.environ["BENCH_CRM_DB"], read_only=True) as crm:
    for crm_id, kind, email in crm.execute("SELECT crm_id, kind, email FROM crm_people").fetchall():
        e = (email or "").strip().lower()
        if "@" in e:
            people.setdefault(e, []).append((crm_id, kind))
    for crm_id, domain in crm.execute("SELECT crm_id, domain FROM crm_accounts").fetchall():
        d = (domain or "").strip().lower()
        if d and d not in FREE_MAIL and d not in OWN:
            accounts.setdefault(d, []).append(crm_id)

session = requests.Session()
session.verify = os.environ["O365SYNC_CA_BUNDLE"]
session.trust_env = False  # else REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE from the environment replace `verify`
session.headers["Authorization"] = f"Bearer {os.environ['BENCH_GRAPH_TOKEN']}"
session.headers["Prefer"] = 'IdType="ImmutableId"'
BODY_HEADERS = {"Prefer": 'outlook.body-content-type="text", IdType="ImmutableId"'}

con = duckdb.connect(os.environ["BENCH_NAIVE_DB"])
con.execute(DDL)


def participants(m: dict) -> list[tuple[str, str | None, str]]:
    out = []
    for role, people_ in (
        ("from", [m.get("from")]),
        ("sender", [m.get("sender")]),
        ("to", m.get("toRecipients")),
        ("cc", m.get("ccRecipients")),
    ):
        for r in people_ or ():
            ea = (r or {}).get("emailAddress") or {}
            addr = ea.get("address")
            if isinstance(addr, str) and addr.strip():
                out.append((role, ea.get("name"), addr))
    return out


def sensitive(m: dict) -> bool:
    """personal/private/confidential: MAPI PidTagSensitivity 1/2/3 from the expanded extended property (what the
    product asks for when BENCH_EXPAND is set), or a `sensitivity` string if the product selects one."""
    if (m.get("sensitivity") or "normal").lower() in SENSITIVE:
        return True
    for prop in m.get("singleValueExtendedProperties") or ():
        if SENSITIVITY_ID.fullmatch((prop or {}).get("id") or "") and str(prop.get("value")).strip() in "123":
            return True
    return False


def classify(m: dict) -> tuple[list, dict[str, str]] | None:
    """(participants, {crm id: (kind, matched address)}) for a message to import, None for one to drop."""
    if m.get("isDraft") or (m.get("@odata.type") or "").startswith("#microsoft.graph.eventMessage"):
        return None
    if sensitive(m):
        return None
    sender = (((m.get("from") or {}).get("emailAddress") or {}).get("address") or "").strip().lower()
    if sender and AUTOMATED.match(sender.split("@")[0]):
        return None
    parts = participants(m)
    hits: dict[str, tuple[str, str]] = {}
    external = False
    for _role, _name, addr in parts:
        a = addr.strip().lower()
        if "@" not in a:
            continue
        domain = a.rsplit("@", 1)[1]
        if domain in OWN:
            continue
        external = True
        for crm_id, kind in people.get(a, ()):
            hits.setdefault(crm_id, (kind, a))
        for crm_id in accounts.get(domain, ()):
            hits.setdefault(crm_id, ("account", a))
    if not external or not hits:
        return None
    return parts, hits


scanned = matched = pages = body_requests = 0
clock = time.perf_counter
stages = dict.fromkeys(("list GET + json", "classify + match + rows", "body GET + json", "DuckDB executemany"), 0.0)
body_s = 0.0
params = {
    "$select": os.environ["BENCH_SELECT"],
    "$filter": f"receivedDateTime ge {os.environ['BENCH_SINCE']}",
    "$top": str(PAGE_SIZE),
}
if os.environ.get("BENCH_EXPAND"):
    params["$expand"] = os.environ["BENCH_EXPAND"]
for folder in ("inbox", "sentitems"):
    url: str | None = f"{GRAPH}/me/mailFolders/{folder}/messages"
    query: dict | None = params
    while url:
        t0 = clock()
        resp = session.get(url, params=query)
        resp.raise_for_status()
        page = json.loads(resp.content)
        pages += 1
        t1 = clock()
        stages["list GET + json"] += t1 - t0
        emails, parts_rows, match_rows = [], [], []
        for m in page["value"]:
            scanned += 1
            kept = classify(m)
            if kept is None:
                continue
            parts, hits = kept
            gid = m["id"]
            tb = clock()
            body = session.get(
                f"{GRAPH}/me/messages/{quote(gid, safe='')}", params={"$select": "body"}, headers=BODY_HEADERS
            )
            body.raise_for_status()
            body_requests += 1
            text = (json.loads(body.content).get("body") or {}).get("content") or ""
            body_s += clock() - tb
            frm = (m.get("from") or {}).get("emailAddress") or {}
            emails.append(
                (
                    gid,
                    folder,
                    m.get("internetMessageId"),
                    m.get("conversationId"),
                    m.get("subject"),
                    text,
                    frm.get("name"),
                    frm.get("address"),
                    m.get("receivedDateTime"),
                    m.get("sentDateTime"),
                    m.get("hasAttachments"),
                    m.get("webLink"),
                )
            )
            parts_rows += [(gid, role, name, addr.strip().lower()) for role, name, addr in parts]
            match_rows += [(gid, crm_id, kind, addr) for crm_id, (kind, addr) in hits.items()]
        t2 = clock()
        stages["classify + match + rows"] += t2 - t1 - body_s
        stages["body GET + json"] += body_s
        body_s = 0.0
        if emails:
            con.executemany("INSERT INTO emails VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", emails)
            con.executemany("INSERT INTO email_participants VALUES (?,?,?,?)", parts_rows)
            con.executemany("INSERT INTO email_crm_matches VALUES (?,?,?,?)", match_rows)
            matched += len(emails)
        stages["DuckDB executemany"] += clock() - t2
        url, query = page.get("@odata.nextLink"), None
con.close()
session.close()

emit_measured(
    meter,
    variant="naive",
    rows=scanned,
    scanned=scanned,
    matched=matched,
    pages=pages,
    body_requests=body_requests,
    page_size=PAGE_SIZE,
    stages={k: round(v, 3) for k, v in stages.items()},
)
