"""Benchmark child of bench/crm_snapshot.py, one fresh process per measurement (its CPU and peak RSS are its own;
the simulators run in the parent). BENCH_MODE:

- fetch: the adapter's full `fetch_snapshot` against the running simulator (or the files), then
  `open_store` + `replace_crm_snapshot` into a fresh tenant store.
- floor: a raw httpx page loop over the same endpoints, parameters and page sizes as the adapter, only
  `response.json()` per page (files: `pl.read_csv`/`read_parquet` of the three files as strings).
- match: `load_crm_frames` + `build_index` (reps), the plain-Python dict index from the same frames, then matching
  a participants batch with `match_participants` and with a plain-Python loop (whole batch, and per 500-message
  page like the product's sync), asserting both give the same (message, CRM id) pairs and primaries.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import os  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from _measure import Meter, emit, emit_measured, imports_done, peak_rss_mb  # noqa: E402

MODE = os.environ["BENCH_MODE"]
KIND = os.environ["BENCH_KIND"]
TENANT = os.environ["BENCH_TENANT_ID"]
DATA_DIR = Path(os.environ["BENCH_DATA_DIR"])
CA = os.environ.get("BENCH_CA", "")
BASE_URL = os.environ.get("BENCH_BASE_URL", "")
SECRET = os.environ.get("BENCH_SECRET", "")  # refresh token / private-app token / API token (never printed)
FILES_DIR = os.environ.get("BENCH_FILES_DIR", "")

import httpx  # noqa: E402
import polars as pl  # noqa: E402

from o365sync.settings import Settings  # noqa: E402

if MODE == "fetch":
    from o365sync.crm import CrmSnapshot  # noqa: E402
    from o365sync.crm_refresh import scan_start_for  # noqa: E402
    from o365sync.http import make_http_client  # noqa: E402
    from o365sync.store import open_store, replace_crm_snapshot  # noqa: E402

    if KIND == "salesforce":
        from crm_adapters.salesforce import SalesforceConnection  # noqa: E402
        from crm_adapters.salesforce import fetch_snapshot as fetch_sf  # noqa: E402
    elif KIND == "hubspot":
        from crm_adapters.hubspot import HubSpotConnection  # noqa: E402
        from crm_adapters.hubspot import fetch_snapshot as fetch_hs  # noqa: E402
    elif KIND == "pipedrive":
        from crm_adapters.pipedrive import PipedriveConnection  # noqa: E402
        from crm_adapters.pipedrive import fetch_snapshot as fetch_pd  # noqa: E402
    else:
        from crm_adapters.files import FilesConnection  # noqa: E402
        from crm_adapters.files import fetch_snapshot as fetch_files  # noqa: E402
elif MODE == "match":
    import duckdb  # noqa: E402

    from o365sync.domains import FREE_MAIL_DOMAINS, registrable_domain  # noqa: E402
    from o365sync.matching import KIND_RANK, ROLE_RANK, build_index, match_participants  # noqa: E402
    from o365sync.store import load_crm_frames, open_store  # noqa: E402

imports_done(T_START)
settings = Settings(data_dir=DATA_DIR, ca_bundle=Path(CA) if CA else None, http_timeout_s=300)


# ------------------------------------------------------------------------------------------------ fetch
def fetch() -> None:
    meter = Meter()
    if KIND == "salesforce":
        with make_http_client(settings) as http:
            snap: CrmSnapshot = fetch_sf(
                SalesforceConnection(
                    login_url=BASE_URL, client_id="sf-client", client_secret="sf-secret", refresh_token=SECRET
                ),
                http,
            )
    elif KIND == "hubspot":
        with make_http_client(settings) as http:
            snap = fetch_hs(HubSpotConnection(base_url=BASE_URL, access_token=SECRET), http)
    elif KIND == "pipedrive":
        with make_http_client(settings) as http:
            snap = fetch_pd(PipedriveConnection(base_url=BASE_URL, api_token=SECRET), http)
    else:
        snap = fetch_files(FilesConnection(directory=Path(FILES_DIR)))
    wall, cpu = meter.done()
    peak_fetch = peak_rss_mb()

    scan_start = scan_start_for(snap.opportunities.filter(~pl.col("is_closed"))["created_at"].min(), datetime.now(UTC))
    meter = Meter()
    with open_store(settings, TENANT, write=True) as con:
        replace_crm_snapshot(con, snap.people, snap.accounts, snap.opportunities, KIND.split("-")[0], scan_start)
    write_s, write_cpu = meter.done()
    emit(
        mode="fetch",
        kind=KIND,
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_fetch_mb=peak_fetch,
        peak_rss_write_mb=peak_rss_mb(),
        write_s=write_s,
        write_cpu_s=write_cpu,
        people_rows=snap.people.height,
        people_ids=snap.people["crm_id"].n_unique(),
        accounts_rows=snap.accounts.height,
        account_ids=snap.accounts["crm_id"].n_unique(),
        accounts_with_domain=snap.accounts["domain"].drop_nulls().len(),
        opportunities=snap.opportunities.height,
    )


# ------------------------------------------------------------------------------------------------ floor
# The snapshot requests of the adapters at commit 9f36afb (copied, so the floor does not depend on adapter internals;
# the parent checks that the floor made as many requests as the adapter).
SF_QUERIES = (
    "SELECT Id, FirstName, LastName, Email, AccountId FROM Contact WHERE Email != null",
    "SELECT Id, FirstName, LastName, Email FROM Lead WHERE IsConverted = false AND Email != null",
    "SELECT Id, Name, Website FROM Account",
    "SELECT Id, Name, AccountId, IsClosed, CreatedDate FROM Opportunity WHERE IsClosed = false",
)
HS_LISTS = (
    ("contacts", ("email", "hs_additional_emails", "firstname", "lastname", "lifecyclestage"), "companies"),
    ("companies", ("name", "domain", "hs_additional_domains"), None),
    ("deals", ("dealname", "pipeline", "dealstage", "hs_is_closed", "createdate"), "companies"),
)


def floor() -> None:
    """What the transport alone costs: the adapter's requests, one JSON parse per page, nothing else."""
    records = pages = 0
    meter = Meter()
    if KIND.startswith("files"):
        for stem in ("people", "accounts", "opportunities"):
            csv, parquet = Path(FILES_DIR, f"{stem}.csv"), Path(FILES_DIR, f"{stem}.parquet")
            frame = pl.read_csv(csv, infer_schema=False) if csv.exists() else pl.read_parquet(parquet)
            records += frame.height
            pages += 1
        emit_measured(meter, mode="floor", kind=KIND, records=records, pages=pages)
        return
    with httpx.Client(verify=ssl.create_default_context(cafile=CA), trust_env=False, timeout=300) as http:
        if KIND == "salesforce":
            tok = http.post(
                f"{BASE_URL}/services/oauth2/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": SECRET,
                    "client_id": "sf-client",
                    "client_secret": "sf-secret",
                },
            ).json()
            headers = {"Authorization": f"Bearer {tok['access_token']}", "Accept": "application/json"}
            for soql in SF_QUERIES:
                page = http.get(f"{BASE_URL}/services/data/v59.0/query", params={"q": soql}, headers=headers).json()
                while True:
                    pages += 1
                    records += len(page["records"])
                    if page["done"]:
                        break
                    page = http.get(BASE_URL + page["nextRecordsUrl"], headers=headers).json()
        elif KIND == "hubspot":
            headers = {"Authorization": f"Bearer {SECRET}", "Accept": "application/json"}
            http.get(f"{BASE_URL}/crm/v3/pipelines/deals", headers=headers).json()
            for otype, props, assoc in HS_LISTS:
                params = {"limit": "100", "properties": ",".join(props), "archived": "false"}
                if assoc:
                    params["associations"] = assoc
                while True:
                    page = http.get(f"{BASE_URL}/crm/v3/objects/{otype}", params=params, headers=headers).json()
                    pages += 1
                    records += len(page["results"])
                    after = ((page.get("paging") or {}).get("next") or {}).get("after")
                    if not after:
                        break
                    params["after"] = after
        else:  # pipedrive
            headers = {"x-api-token": SECRET, "Accept": "application/json"}
            for kind, extra in (("persons", {}), ("organizations", {}), ("deals", {"status": "open"})):
                params = {"limit": "500", "sort_by": "id", "sort_direction": "asc", **extra}
                while True:
                    body = http.get(f"{BASE_URL}/api/v2/{kind}", params=params, headers=headers).json()
                    pages += 1
                    records += len(body["data"])
                    cursor = body["additional_data"]["next_cursor"]
                    if not cursor:
                        break
                    params = {**params, "cursor": cursor}
    emit_measured(meter, mode="floor", kind=KIND, records=records, pages=pages)


# ------------------------------------------------------------------------------------------------ match
def python_index(people: pl.DataFrame, accounts: pl.DataFrame, own_domains: list[str]):  # noqa: ANN201
    """address -> [(crm_id, kind)], registrable domain -> [crm_id], own domains: plain dicts and sets."""
    own = {d.strip().lower() for d in own_domains}
    excluded = FREE_MAIL_DOMAINS | own | {r for d in own if (r := registrable_domain(d))}
    by_address: dict[str, list[tuple[str, str]]] = {}
    for crm_id, kind, email in zip(
        people["crm_id"].to_list(), people["kind"].to_list(), people["email"].to_list(), strict=True
    ):
        if email is None:
            continue
        e = email.strip().lower()
        if not e or "@" not in e:
            continue
        hits = by_address.setdefault(e, [])
        if (crm_id, kind) not in hits:
            hits.append((crm_id, kind))
    by_domain: dict[str, list[str]] = {}
    for crm_id, domain in zip(accounts["crm_id"].to_list(), accounts["domain"].to_list(), strict=True):
        d = (domain or "").strip().lower()
        if not d:
            continue
        r = registrable_domain(d)
        if not r or r in excluded:
            continue
        ids = by_domain.setdefault(r, [])
        if crm_id not in ids:
            ids.append(crm_id)
    return by_address, by_domain, own


def python_match(
    messages: list[tuple[str, list[tuple[str, str | None]]]], by_address: dict, by_domain: dict, own: set[str]
) -> dict[str, tuple[dict[str, tuple[int, int]], str]]:
    """graph_id -> ({crm_id: (kind rank, best role rank)}, primary crm_id): the product's rules, in a for-loop."""
    out = {}
    role_rank, kind_rank, default_role = ROLE_RANK, KIND_RANK, len(ROLE_RANK)
    account_rank = KIND_RANK["account"]
    free = FREE_MAIL_DOMAINS
    for gid, parts in messages:
        links: dict[str, tuple[int, int]] = {}
        for role, address in parts:
            if address is None:
                continue
            a = address.strip().lower()
            if not a or "@" not in a:
                continue
            dom = a.rpartition("@")[2]
            if dom in own:
                continue
            rr = role_rank.get(role, default_role)
            for crm_id, kind in by_address.get(a, ()):
                kr = kind_rank[kind]
                old = links.get(crm_id)
                if old is None or rr < old[1]:
                    links[crm_id] = (kr if old is None else old[0], rr)
            reg = registrable_domain(dom)
            if reg and reg not in free:
                for crm_id in by_domain.get(reg, ()):
                    old = links.get(crm_id)
                    if old is None or rr < old[1]:
                        links[crm_id] = (account_rank if old is None else old[0], rr)
        if links:
            primary = min(links, key=lambda c: (links[c][0], links[c][1], c))
            out[gid] = (links, primary)
    return out


def duckdb_join(con, participants: pl.DataFrame, index, own: set[str]) -> pl.DataFrame:  # noqa: ANN001
    """The plain join in DuckDB SQL, a peer doing less than the product: trimmed + lower-cased addresses joined
    to the index's addresses, and their domain (exactly, no Public Suffix List walk) to its account domains;
    distinct (message, CRM record) pairs, no primary."""
    con.register("parts", participants)
    con.register("people_index", index.people.select("email", "rec"))
    con.register("account_index", index.accounts.select("domain", "rec"))
    own_list = ", ".join(f"'{d}'" for d in sorted(own))
    return con.sql(
        f"""
        WITH p AS (SELECT graph_id, lower(trim(address)) AS address FROM parts),
             e AS (SELECT graph_id, address, split_part(address, '@', -1) AS domain FROM p
                   WHERE contains(address, '@') AND split_part(address, '@', -1) NOT IN ({own_list}))
        SELECT DISTINCT graph_id, rec FROM (
            SELECT e.graph_id, i.rec FROM e JOIN people_index i ON i.email = e.address
            UNION ALL
            SELECT e.graph_id, a.rec FROM e JOIN account_index a ON a.domain = e.domain)
        """
    ).pl()


class Steps:
    """Wall and CPU seconds of named steps, every run of each."""

    def __init__(self) -> None:
        self.walls: dict[str, list[float]] = {}
        self.cpus: dict[str, list[float]] = {}

    def run(self, name: str, reps: int, fn, *args):  # noqa: ANN001, ANN002, ANN201
        """fn(*args) `reps` times, each timed; the last result."""
        result = None
        for _ in range(reps):
            meter = Meter()
            result = fn(*args)
            w, c = meter.done()
            self.walls.setdefault(name, []).append(w)
            self.cpus.setdefault(name, []).append(c)
        return result

    def figures(self) -> dict[str, object]:
        """Per step: median wall (<step>_s) and CPU (<step>_cpu_s) seconds, and every wall (<step>_walls)."""
        med = statistics.median
        return {
            **{f"{name}_s": med(values) for name, values in self.walls.items()},
            **{f"{name}_cpu_s": med(values) for name, values in self.cpus.items()},
            **{f"{name}_walls": values for name, values in self.walls.items()},
        }


def match() -> None:
    reps = int(os.environ.get("BENCH_REPS", "3"))
    own_domains = os.environ["BENCH_OWN_DOMAINS"].split(",")
    page_size = int(os.environ.get("BENCH_PAGE_SIZE", "500"))
    steps = Steps()

    def load() -> tuple[pl.DataFrame, pl.DataFrame, datetime | None]:
        with open_store(settings, TENANT, write=False) as con:
            return load_crm_frames(con)

    for _ in range(reps):
        people, accounts, _scan_start = steps.run("load", 1, load)
        index = steps.run("index", 1, build_index, people, accounts, own_domains)
    peak_load = peak_rss_mb()
    by_address, by_domain, own = steps.run("py_index", reps, python_index, people, accounts, own_domains)

    participants = pl.read_parquet(os.environ["BENCH_MESSAGES"])
    grouped: dict[str, list[tuple[str, str | None]]] = {}
    for gid, role, address in participants.iter_rows():
        grouped.setdefault(gid, []).append((role, address))
    messages = list(grouped.items())
    n_messages = len(messages)
    gids = participants["graph_id"].unique(maintain_order=True)
    # Per page: the first `page_messages` messages only (each call is a full join against the index).
    page_n = min(n_messages, int(os.environ.get("BENCH_PAGE_MESSAGES", str(n_messages))))
    page_frames = [
        participants.filter(pl.col("graph_id").is_in(gids[i : min(i + page_size, page_n)].implode()))
        for i in range(0, page_n, page_size)
    ]
    page_msgs = [messages[i : min(i + page_size, page_n)] for i in range(0, page_n, page_size)]

    # Correctness first: both must give the same (message, CRM id) pairs and the same primary per message.
    frame = match_participants(participants, index)
    py = python_match(messages, by_address, by_domain, own)
    pairs_pl = set(frame.select("graph_id", "crm_id").iter_rows())
    pairs_py = {(g, c) for g, (links, _p) in py.items() for c in links}
    if pairs_pl != pairs_py:
        print(
            f"MISMATCH pairs: polars-only {len(pairs_pl - pairs_py)}, python-only {len(pairs_py - pairs_pl)}; "
            f"e.g. {sorted(pairs_pl ^ pairs_py)[:3]}",
            file=sys.stderr,
        )
        sys.exit(3)
    prim_pl = dict(frame.filter(pl.col("is_primary")).select("graph_id", "crm_id").iter_rows())
    prim_py = {g: p for g, (_links, p) in py.items()}
    primary_mismatch = sum(1 for g, p in prim_py.items() if prim_pl.get(g) != p)
    pages_pl = pl.concat([match_participants(f, index) for f in page_frames])
    page_ids = set(gids[:page_n].to_list())
    if set(pages_pl.select("graph_id", "crm_id").iter_rows()) != {p for p in pairs_pl if p[0] in page_ids}:
        print("MISMATCH between whole-batch and per-page Polars matching", file=sys.stderr)
        sys.exit(3)

    steps.run("polars", reps, match_participants, participants, index)
    steps.run("python", reps, python_match, messages, by_address, by_domain, own)
    con = duckdb.connect()
    sql = steps.run("duckdb", reps, duckdb_join, con, participants, index, own)
    steps.run("polars_pages", reps, lambda: [match_participants(f, index) for f in page_frames])
    steps.run("python_pages", reps, lambda: [python_match(m, by_address, by_domain, own) for m in page_msgs])
    emit(
        mode="match",
        kind=KIND,
        reps=reps,
        peak_rss_load_mb=peak_load,
        peak_rss_mb=peak_rss_mb(),
        people_rows=people.height,
        accounts_rows=accounts.height,
        index_people=index.people.height,
        index_accounts=index.accounts.height,
        messages=n_messages,
        participants=participants.height,
        matched_messages=len(py),
        pairs=len(pairs_py),
        primary_mismatch=primary_mismatch,
        duckdb_pairs=sql.height,
        page_size=page_size,
        pages=len(page_frames),
        page_messages=page_n,
        **steps.figures(),
    )


{"fetch": fetch, "floor": floor, "match": match}[MODE]()
