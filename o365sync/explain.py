"""Why one message was (or would be) imported or not: `explain_message` fetches that item's headers from Graph now
(the pipeline's `HEADER_FIELDS` and sensitivity `$expand`, read-only, the user's delegated token), runs the real
exclusions (`o365sync.exclusions`) and matching (`o365sync.matching`, against the tenant's current CRM snapshot) in
memory and says what the pipeline decides, with its reasons, and what the store holds of it now.

Nothing about the item is stored or logged: the result lives in memory for the caller to show; the store is only
read (whether the item is stored, whether it was erased). Decisions use the oracle's vocabulary (`REASONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import polars as pl

from o365sync.auth import scopes_for
from o365sync.crm_index import crm_index_for
from o365sync.errors import NoCrmSnapshot
from o365sync.exclusions import REASONS as EXCLUSION_REASONS
from o365sync.exclusions import exclusion_reasons
from o365sync.graph import MAIL_READ_ALLOWLIST, SENSITIVITY_EXPAND, Allow, GraphClient, GraphNotFound
from o365sync.mail import HEADER_FIELDS, parse_page
from o365sync.matching import KIND_RANK, ROLE_RANK, match_participants, normalise_address
from o365sync.participants import name_index_for, resolve_non_smtp
from o365sync.store import open_store, store_path
from o365sync.sync.mailbox import MAIL_FOLDERS
from o365sync.tenant_context import Tenant
from o365sync.user_graph import user_graph_client

# Decisions, in the order the pipeline takes them: first one wins.
REASONS = ("not_synced_folder", *EXCLUSION_REASONS, "no_crm_match", "matched")
# One message by Graph id, or the copies of one internetMessageId; the folders' ids tell inbox/sentitems apart.
EXPLAIN_ALLOWLIST: tuple[Allow, ...] = (*MAIL_READ_ALLOWLIST, Allow("GET", "me/messages"))


@dataclass(frozen=True)
class MatchedRecord:
    crm_id: str
    crm_kind: str
    matched_address: str
    role: str  # the matched participant's role: from, sender, to or cc (the best one if several)
    is_primary: bool


@dataclass(frozen=True)
class Explanation:
    graph_id: str
    folder: str  # inbox, sentitems, or "other" (not synced)
    decision: str  # one of REASONS
    matches: tuple[MatchedRecord, ...]  # primary first
    primary_why: str | None  # which precedence rule chose the primary record
    stored: bool  # the store holds this message for the user now
    erased: bool  # a tombstone (erasure) keeps it from ever being imported again


def _get_json_page(client: GraphClient, message: str) -> bytes:
    """The raw Graph page (`{"value": [...]}`) holding the message: by internetMessageId (`<…>`) or by Graph id."""
    params = {"$select": ",".join(HEADER_FIELDS), "$expand": SENSITIVITY_EXPAND}
    if message.startswith("<") and message.endswith(">"):
        literal = message.replace("'", "''")
        params |= {"$filter": f"internetMessageId eq '{literal}'", "$top": "10"}
        return client.get("me/messages", params).content
    raw = client.get(f"me/messages/{quote(message, safe='')}", params).content
    return b'{"value":[' + raw + b"]}"


def _primary_why(matches: list[MatchedRecord]) -> str | None:
    if not matches:
        return None
    best = matches[0]
    if len(matches) == 1:
        return "the only matched record"
    same_kind = [m for m in matches if m.crm_kind == best.crm_kind]
    if len(same_kind) == 1:
        return f"kind {best.crm_kind} ranks first (contact > person_account > lead > account)"
    same_role = [m for m in same_kind if ROLE_RANK.get(m.role) == ROLE_RANK.get(best.role)]
    if len(same_role) == 1:
        return f"same kind; matched the {best.role} participant (from > sender > to > cc)"
    return "same kind and participant role; the smallest CRM id wins"


def explain_message(tenant: Tenant, user_oid: str, message: str) -> Explanation:
    """Explain one message of `user_oid`'s mailbox (`message`: an internetMessageId in angle brackets, or a Graph
    id). Raises `NoCrmSnapshot` before any Graph call when there is nothing to match against, `GraphNotFound`
    when the mailbox has no such message (also when no copy of that internetMessageId is there)."""
    settings, config = tenant.settings, tenant.config
    if not store_path(settings, tenant.id).exists():
        raise NoCrmSnapshot(tenant.id)
    index, scan_start = crm_index_for(settings, config)
    if scan_start is None:
        raise NoCrmSnapshot(tenant.id)
    with user_graph_client(settings, tenant.id, user_oid, scopes_for(["email"]), allow=EXPLAIN_ALLOWLIST) as client:
        page = parse_page(_get_json_page(client, message), "other")
        if page.messages.num_rows == 0:
            raise GraphNotFound(404, "ErrorItemNotFound")  # what Graph says for an unknown id
        folders = {client.get(f"me/mailFolders/{f}", {"$select": "id"}).json()["id"]: f for f in MAIL_FOLDERS}
    messages = pl.DataFrame(page.messages)
    participants = pl.DataFrame(page.participants)
    # Several copies of one internetMessageId: the one in a synced folder explains the import.
    messages = messages.with_columns(
        pl.col("parent_folder_id").replace_strict(folders, default="other", return_dtype=pl.String).alias("folder")
    ).sort(pl.col("folder") == "other")
    row = messages.row(0, named=True)
    gid = row["graph_id"]
    messages, participants = messages.head(1), participants.filter(pl.col("graph_id") == gid)
    participants, _ = resolve_non_smtp(participants, name_index_for(settings, config))  # as the import does

    found: list[MatchedRecord] = []
    if row["folder"] == "other":
        decision = "not_synced_folder"
    elif (excluded := exclusion_reasons(messages, participants, config.domains, config.blocklist_for(user_oid))).height:
        decision = excluded["reason"][0]
    else:
        matched = match_participants(participants.select("graph_id", "address", "role"), index)
        roles = (
            participants.select(normalise_address(pl.col("address")).alias("address"), "role")
            .with_columns(pl.col("role").replace_strict(ROLE_RANK, default=len(ROLE_RANK)).alias("rank"))
            .sort("rank")
            .unique("address", keep="first")
        )
        role_of = dict(zip(roles["address"], roles["role"], strict=True))
        found = [
            MatchedRecord(
                m["crm_id"], m["crm_kind"], m["matched_address"], role_of[m["matched_address"]], m["is_primary"]
            )
            for m in matched.iter_rows(named=True)
        ]
        found.sort(key=lambda m: (not m.is_primary, KIND_RANK[m.crm_kind], ROLE_RANK.get(m.role, 9), m.crm_id))
        decision = "matched" if found else "no_crm_match"

    with open_store(settings, tenant.id, write=False) as con:
        stored = bool(
            con.execute(
                "SELECT count(*) FROM emails WHERE tenant_id = ? AND user_oid = ? AND "
                "(graph_id = ? OR internet_message_id = ?)",
                [tenant.id, user_oid, gid, row["internet_message_id"]],
            ).fetchall()[0][0]
        )
        erased = bool(
            con.execute(
                "SELECT count(*) FROM erased WHERE tenant_id = ? AND coalesce(user_oid, ?) = ? AND "
                "((kind = 'conversation' AND key = ?) OR (kind = 'message' AND key = ?))",
                [tenant.id, user_oid, user_oid, row["conversation_id"], row["internet_message_id"]],
            ).fetchall()[0][0]
        )
    return Explanation(gid, row["folder"], decision, tuple(found), _primary_why(found), stored, erased)
