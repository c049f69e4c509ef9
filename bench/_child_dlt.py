"""Benchmark child: the strongest dlt peer (dlt's REST client with Arrow pages) on the same simulated mailbox.

dlt RESTClient + JSONLinkPaginator(next_url_path="['@odata.nextLink']") pages inbox and sent items with the
product's `$select` header fields, `$filter=receivedDateTime ge <scan start>` and `$top=1000`; the resource yields
one pyarrow Table per page (columns built column-wise like the peer) and dlt loads it into DuckDB as parquet.
It lands headers only: no CRM matching, no bodies. Imports nothing from o365sync: the parent passes the bearer token
(obtained through our TokenProvider), the `$select` list and the filter literal in BENCH_* variables."""

from __future__ import annotations

import time

T_START = time.perf_counter()

import os  # noqa: E402

from _measure import Meter, emit_measured, imports_done  # noqa: E402

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

import dlt  # noqa: E402
import pyarrow as pa  # noqa: E402
from dlt.sources.helpers.requests.retry import Client  # noqa: E402
from dlt.sources.helpers.rest_client import RESTClient  # noqa: E402
from dlt.sources.helpers.rest_client.auth import BearerTokenAuth  # noqa: E402
from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator  # noqa: E402

imports_done(T_START)

FOLDERS = ("inbox", "sentitems")
TS = pa.timestamp("us", tz="UTC")
STR = pa.string()
STRS = pa.list_(pa.string())
SCHEMA = pa.schema(
    [
        ("id", STR),
        ("folder", STR),
        ("internet_message_id", STR),
        ("conversation_id", STR),
        ("subject", STR),
        ("from_name", STR),
        ("from_address", STR),
        ("sender_address", STR),
        ("to_addresses", STRS),
        ("cc_addresses", STRS),
        ("bcc_addresses", STRS),
        ("received_at", STR),
        ("sent_at", STR),
        ("has_attachments", pa.bool_()),
        ("is_draft", pa.bool_()),
        ("parent_folder_id", STR),
        ("web_link", STR),
    ]
)
TIMESTAMP_COLUMNS = {"received_at", "sent_at"}  # ISO strings on the wire, cast to timestamp[us, UTC] per page


def _addresses(recipients: list | None) -> list[str]:
    return [r["emailAddress"]["address"] for r in recipients or ()]


def project(m: dict, folder: str) -> tuple:
    """Graph message dict (header fields only) -> row tuple in SCHEMA order."""
    frm = (m.get("from") or {}).get("emailAddress") or {}
    snd = (m.get("sender") or {}).get("emailAddress") or {}
    return (
        m["id"],
        folder,
        m.get("internetMessageId"),
        m.get("conversationId"),
        m.get("subject"),
        frm.get("name"),
        frm.get("address"),
        snd.get("address"),
        _addresses(m.get("toRecipients")),
        _addresses(m.get("ccRecipients")),
        _addresses(m.get("bccRecipients")),
        m.get("receivedDateTime"),
        m.get("sentDateTime"),
        m.get("hasAttachments"),
        m.get("isDraft"),
        m.get("parentFolderId"),
        m.get("webLink"),
    )


def page_table(page: list[dict], folder: str) -> pa.Table:
    cols = list(zip(*(project(m, folder) for m in page), strict=True))
    arrays = []
    for values, f in zip(cols, SCHEMA, strict=True):
        arr = pa.array(values, type=f.type)
        arrays.append(arr.cast(TS) if f.name in TIMESTAMP_COLUMNS else arr)
    return pa.Table.from_arrays(arrays, names=SCHEMA.names)


graph_url = os.environ["O365SYNC_GRAPH_URL"].rstrip("/") + "/"
params = {
    "$select": os.environ["BENCH_SELECT"],
    "$filter": f"receivedDateTime ge {os.environ['BENCH_SINCE']}",
    "$top": 1000,
}
pages = 0

meter = Meter()
session = Client(raise_for_status=False).session  # dlt's default session (retries), trusting the simulator CA
session.verify = os.environ["O365SYNC_CA_BUNDLE"]
session.trust_env = False  # else REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE from the environment replace `verify`
client = RESTClient(
    base_url=graph_url, auth=BearerTokenAuth(os.environ["BENCH_GRAPH_TOKEN"]), data_selector="value", session=session
)


@dlt.resource(name="messages", primary_key="id", write_disposition="append")
def messages():
    global pages
    for folder in FOLDERS:
        paginator = JSONLinkPaginator(next_url_path="['@odata.nextLink']")  # quoted key: see peers README
        for page in client.paginate(f"me/mailFolders/{folder}/messages", params=params, paginator=paginator):
            pages += 1
            if page:
                yield page_table(page, folder)


pipeline = dlt.pipeline(
    pipeline_name="graph_headers",
    destination=dlt.destinations.duckdb(os.environ["BENCH_DLT_DB"]),
    dataset_name="graph",
    pipelines_dir=os.environ["BENCH_DLT_PIPELINES_DIR"],
)
pipeline.run(messages(), loader_file_format="parquet")
rows = pipeline.last_trace.last_normalize_info.row_counts.get("messages", 0)

emit_measured(
    meter,
    variant="dlt",
    rows=rows,
    pages=pages,
    steps={s.step: round((s.finished_at - s.started_at).total_seconds(), 3) for s in pipeline.last_trace.steps},
)
