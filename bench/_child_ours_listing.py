"""Benchmark child (reference row): the product's own listing path doing dlt's job, for a like-for-like number.

Same token path (TokenProvider), same GraphClient and `iter_header_pages` (msgspec Structs -> Arrow tables) as the
product's import, over the same two folders, `$select`, `$filter` and page size `$top` as the dlt child (1000 by
default); every page's messages + participants Arrow tables are inserted into a fresh DuckDB file. No matching, no
bodies, no cursors: this isolates what the listing code costs against dlt, which does the same amount of work."""

from __future__ import annotations

import time

T_START = time.perf_counter()

import os  # noqa: E402
from datetime import datetime  # noqa: E402

import duckdb  # noqa: E402
from _measure import Meter, emit_measured, imports_done  # noqa: E402

from o365sync.auth import TokenProvider, scopes_for  # noqa: E402
from o365sync.graph import GraphClient  # noqa: E402
from o365sync.http import make_http_client  # noqa: E402
from o365sync.mail import MESSAGES_SCHEMA, PARTICIPANTS_SCHEMA, iter_header_pages  # noqa: E402
from o365sync.settings import load_settings  # noqa: E402

imports_done(T_START)

settings = load_settings()
tenant_id, user_oid = os.environ["BENCH_TENANT_ID"], os.environ["BENCH_USER_OID"]
since = datetime.fromisoformat(os.environ["BENCH_SINCE"].replace("Z", "+00:00"))
page_size = int(os.environ.get("BENCH_LISTING_PAGE_SIZE", "1000"))
_DDL_TYPES = {"string": "VARCHAR", "bool": "BOOLEAN", "timestamp[us, tz=UTC]": "TIMESTAMPTZ"}


def ddl(name: str, schema) -> str:  # noqa: ANN001
    return f"CREATE TABLE {name} (" + ", ".join(f"{f.name} {_DDL_TYPES[str(f.type)]}" for f in schema) + ")"


rows = pages = 0
meter = Meter()
con = duckdb.connect(os.environ["BENCH_LISTING_DB"], config={"memory_limit": "1GB", "threads": 2})
con.execute("SET TimeZone='UTC'")
con.execute(ddl("messages", MESSAGES_SCHEMA))
con.execute(ddl("participants", PARTICIPANTS_SCHEMA))
with (
    TokenProvider(settings, tenant_id, user_oid, scopes_for(["email"])) as provider,
    make_http_client(settings) as http,
):
    client = GraphClient(http, settings.graph_url, provider, max_in_flight=settings.max_requests_per_mailbox)
    for folder in ("inbox", "sentitems"):
        for page in iter_header_pages(client, folder, since, page_size):
            con.register("page_messages", page.messages)
            con.register("page_participants", page.participants)
            con.execute("INSERT INTO messages SELECT * FROM page_messages")
            con.execute("INSERT INTO participants SELECT * FROM page_participants")
            con.unregister("page_messages")
            con.unregister("page_participants")
            rows += page.messages.num_rows
            pages += 1
            del page
con.close()

emit_measured(meter, variant="ours-listing", rows=rows, pages=pages, page_size=page_size)
