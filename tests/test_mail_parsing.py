"""Page decoding on raw Graph JSON: partial delta items, @removed, odd recipients and other bad input
(the rules are listed in o365sync/mail.py's module docstring)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from o365sync.graph import GraphClient, GraphError
from o365sync.mail import (
    HEADER_FIELDS,
    MESSAGES_SCHEMA,
    PARTICIPANTS_SCHEMA,
    SENSITIVITY_VALUES,
    DeltaPage,
    fetch_bodies,
    parse_page,
)
from tests.fake_graph import batch_answer

FOLDER_ID = "AQMkADNkNAAAgEMAAAA="


def rcpt(address: Any = "x@fabrikam.com", name: Any = "X") -> dict:
    return {"emailAddress": {"name": name, "address": address}}


def full(mid: str = "AAMk1", **over: Any) -> dict:
    item = {
        "@odata.etag": 'W/"CQAAABYAAADHcgC8"',
        "id": mid,
        "internetMessageId": f"<{mid}@fabrikam.com>",
        "conversationId": "AAQk1",
        "subject": "Re: Q3 renewal",
        "from": rcpt("danas@fabrikam.com", "Dana Swope"),
        "sender": rcpt("danas@fabrikam.com", "Dana Swope"),
        "toRecipients": [rcpt("alexw@contoso.com", "Alex Wilber")],
        "ccRecipients": [],
        "receivedDateTime": "2024-05-02T09:14:03Z",
        "sentDateTime": "2024-05-02T09:13:58Z",
        "hasAttachments": True,
        "isDraft": False,
        "parentFolderId": FOLDER_ID,
        "webLink": "https://outlook.office365.com/owa/?ItemID=AAMk1",
    }
    item.update(over)
    return item


def ext(value: Any, pid: str = "Integer 0x36") -> dict:
    """`singleValueExtendedProperties` as Graph answers the PidTagSensitivity `$expand`."""
    return {"singleValueExtendedProperties": [{"id": pid, "value": value}]}


def page(*items: dict, next_link: str | None = None, delta_link: str | None = None) -> bytes:
    out: dict[str, Any] = {
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(message)",
        "value": list(items),
    }
    if next_link:
        out["@odata.nextLink"] = next_link
    if delta_link:
        out["@odata.deltaLink"] = delta_link
    return json.dumps(out).encode()


def parse(*items: dict, **kw: Any) -> DeltaPage:
    result = parse_page(page(*items, **kw), "inbox")
    assert result.messages.schema == MESSAGES_SCHEMA and result.participants.schema == PARTICIPANTS_SCHEMA
    return result


def rows(p: DeltaPage) -> list[dict]:
    return p.messages.to_pylist()


def parts(p: DeltaPage) -> list[tuple]:
    return [(r["graph_id"], r["role"], r["name"], r["address"]) for r in p.participants.to_pylist()]


# ---------------------------------------------------------------------------------------------- shapes
def test_full_item() -> None:
    p = parse(full(ccRecipients=[rcpt("c@x.org", "C")]))
    (row,) = rows(p)
    assert row == {
        "graph_id": "AAMk1",
        "folder": "inbox",
        "internet_message_id": "<AAMk1@fabrikam.com>",
        "conversation_id": "AAQk1",
        "subject": "Re: Q3 renewal",
        "from_name": "Dana Swope",
        "from_address": "danas@fabrikam.com",
        "received_at": datetime(2024, 5, 2, 9, 14, 3, tzinfo=UTC),
        "sent_at": datetime(2024, 5, 2, 9, 13, 58, tzinfo=UTC),
        "has_attachments": True,
        "is_draft": False,
        "web_link": "https://outlook.office365.com/owa/?ItemID=AAMk1",
        "parent_folder_id": FOLDER_ID,
        "odata_type": None,
        "sensitivity": None,
        "is_partial": False,
    }
    assert parts(p) == [
        ("AAMk1", "from", "Dana Swope", "danas@fabrikam.com"),
        ("AAMk1", "sender", "Dana Swope", "danas@fabrikam.com"),
        ("AAMk1", "to", "Alex Wilber", "alexw@contoso.com"),
        ("AAMk1", "cc", "C", "c@x.org"),
    ]
    assert p.removed == [] and p.delta_link is None


def test_header_fields() -> None:
    assert "sensitivity" not in HEADER_FIELDS and "bccRecipients" not in HEADER_FIELDS  # not a message property
    assert not {"body", "bodyPreview", "uniqueBody"} & set(HEADER_FIELDS)


def test_bcc_is_never_parsed() -> None:
    p = parse(full(bccRecipients=[rcpt("hidden@secret.com", "Hidden")]))
    assert "hidden" not in json.dumps(p.participants.to_pylist() + p.messages.to_pylist(), default=str)
    assert "bcc" not in p.participants.column("role").to_pylist()


def test_partial_update_has_nulls_and_no_participants() -> None:
    read_flag = {
        "@odata.type": "#microsoft.graph.message",
        "@odata.etag": 'W/"x"',
        "id": "AAMk2",
        "isRead": True,
        "parentFolderId": FOLDER_ID,
    }
    subject = {
        "@odata.type": "#microsoft.graph.message",
        "id": "AAMk3",
        "subject": "New subject",
        "parentFolderId": FOLDER_ID,
        "toRecipients": [rcpt("late@x.com")],
    }
    p = parse(full(), read_flag, subject)
    by_id = {r["graph_id"]: r for r in rows(p)}
    r2 = by_id["AAMk2"]
    assert r2["is_partial"] is True and r2["parent_folder_id"] == FOLDER_ID
    assert r2["odata_type"] == "#microsoft.graph.message"
    for col in (
        "internet_message_id",
        "conversation_id",
        "subject",
        "from_name",
        "from_address",
        "received_at",
        "sent_at",
        "has_attachments",
        "is_draft",
        "web_link",
        "sensitivity",
    ):
        assert r2[col] is None, col
    assert by_id["AAMk3"]["is_partial"] is True and by_id["AAMk3"]["subject"] == "New subject"
    assert by_id["AAMk3"]["received_at"] is None
    assert {g for g, *_ in parts(p)} == {"AAMk1"}  # partial rows: participants absent, not empty
    assert by_id["AAMk1"]["is_partial"] is False


def test_partial_only_page_and_empty_page() -> None:
    p = parse({"id": "A", "isRead": False})
    assert rows(p)[0]["is_partial"] is True and p.participants.num_rows == 0
    empty = parse()
    assert empty.messages.num_rows == 0 and empty.participants.num_rows == 0 and empty.removed == []


def test_removed_items_are_ids_only() -> None:
    p = parse(
        full("A"),
        {"@odata.type": "#microsoft.graph.message", "id": "B", "@removed": {"reason": "deleted"}},
        {"id": "C", "@removed": {"reason": "changed"}},
        {"id": "D", "@removed": {}},
    )
    assert p.removed == ["B", "C", "D"]
    assert p.messages.column("graph_id").to_pylist() == ["A"]
    assert {g for g, *_ in parts(p)} == {"A"}


def test_odata_type_and_sensitivity() -> None:
    p = parse(full("A", **{"@odata.type": "#microsoft.graph.eventMessageRequest"}, **ext("2")), full("B"))
    assert [(r["odata_type"], r["sensitivity"], r["is_partial"]) for r in rows(p)] == [
        ("#microsoft.graph.eventMessageRequest", "private", False),
        (None, None, False),
    ]


def test_sensitivity_from_the_extended_property() -> None:
    """PidTagSensitivity 0-3 → normal/personal/private/confidential; absent (a message that never had it) → NULL."""
    assert SENSITIVITY_VALUES == {0: "normal", 1: "personal", 2: "private", 3: "confidential"}
    cases = [
        (ext("0"), "normal"),
        (ext("1"), "personal"),
        (ext("2"), "private"),
        (ext("3"), "confidential"),
        ({}, None),
        ({"singleValueExtendedProperties": []}, None),
        ({"singleValueExtendedProperties": None}, None),
        # the id as Graph echoes it (normalised) or as we asked for it, in any case
        (ext("3", "Integer 0x0036"), "confidential"),
        (ext("1", "integer 0X36"), "personal"),
        (ext(2), "private"),
        (ext(" 2 "), "private"),  # a number, stray whitespace: read the same
        # other ids are ignored; values outside 0-3 or not a number → NULL
        (ext("2", "Integer 0x3600"), None),
        (ext("2", "String 0x36"), None),
        (ext("2", "Integer 0x0E08"), None),
        (ext("4"), None),
        (ext("-1"), None),
        (ext(""), None),
        (ext("private"), None),
        (ext(None), None),
        (ext("٢"), None),
        (
            {
                "singleValueExtendedProperties": [
                    None,
                    {"id": "Integer 0xe08", "value": "4096"},
                    {"id": "Integer 0x36", "value": "2"},
                ]
            },
            "private",
        ),
        ({"singleValueExtendedProperties": [{"value": "2"}, {"id": None, "value": "2"}]}, None),
    ]
    p = parse(*(full(f"M{i}", **extra) for i, (extra, _) in enumerate(cases)))
    assert [r["sensitivity"] for r in rows(p)] == [want for _, want in cases]
    assert not any(r["is_partial"] for r in rows(p))


def test_sensitivity_never_makes_a_row_partial() -> None:
    changed = {"@odata.type": "#microsoft.graph.message", "id": "P", "parentFolderId": FOLDER_ID, **ext("0")}
    p = parse(full("A"), full("B", **ext("3")), changed, {"id": "Q", "isRead": True, "parentFolderId": FOLDER_ID})
    got = [(r["graph_id"], r["sensitivity"], r["is_partial"]) for r in rows(p)]
    assert got == [("A", None, False), ("B", "confidential", False), ("P", "normal", True), ("Q", None, True)]


@pytest.mark.parametrize(
    "bad",
    [
        {"singleValueExtendedProperties": "2"},
        {"singleValueExtendedProperties": [3]},
        {"singleValueExtendedProperties": [{"id": 54, "value": "2"}]},
    ],
)
def test_malformed_extended_properties_fail_the_page(bad: dict) -> None:
    with pytest.raises(GraphError) as info:
        parse_page(page(full("A", **bad)), "inbox")
    assert (info.value.status, info.value.code) == (0, "MalformedPage")


def test_links() -> None:
    nxt = "https://graph.microsoft.com/v1.0/me/mailfolders('AQMk')/messages/delta?$skiptoken=abc"
    dl = "https://graph.microsoft.com/v1.0/me/mailfolders('AQMk')/messages/delta?$deltatoken=xyz"
    assert parse(next_link=nxt).delta_link is None
    assert parse(delta_link=dl).delta_link == dl
    assert parse(next_link=nxt, delta_link=dl).delta_link is None  # a round ends only where no nextLink follows


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_or_empty_from() -> None:
    no_from = full("A")
    del no_from["from"], no_from["sender"]
    p = parse(
        no_from,
        full("B", **{"from": None, "sender": None}),
        full("C", **{"from": {}, "sender": {}}),
        full("D", **{"from": {"emailAddress": None}}),
        full("E", **{"from": {"emailAddress": {}}}),
    )
    for r in rows(p):
        assert (r["from_name"], r["from_address"], r["is_partial"]) == (None, None, False), r["graph_id"]
    assert [(g, role) for g, role, *_ in parts(p)] == [
        ("A", "to"),
        ("B", "to"),
        ("C", "to"),
        ("D", "sender"),
        ("D", "to"),
        ("E", "sender"),
        ("E", "to"),
    ]


def test_name_only_recipients_give_a_row_without_address_and_blank_ones_none() -> None:
    """A display name without an address is a participant row with a NULL address (resolved by name or dropped by
    o365sync/participants.py before anything is matched or stored); no name and no address: no row."""
    p = parse(
        full(
            "A",
            **{"from": {"emailAddress": {"name": "Only A Name"}}},
            toRecipients=[
                rcpt(None, "No Address"),
                {"emailAddress": {"name": "Missing"}},
                rcpt("", "Empty"),
                rcpt("   ", "Blank"),
                None,
                {},
                {"emailAddress": None},
                rcpt("ok@x.com", None),
            ],
            ccRecipients=None,
        )
    )
    (row,) = rows(p)
    assert (row["from_name"], row["from_address"]) == ("Only A Name", None)
    assert parts(p) == [
        ("A", "from", "Only A Name", None),
        ("A", "sender", "Dana Swope", "danas@fabrikam.com"),
        ("A", "to", "No Address", None),
        ("A", "to", "Missing", None),
        ("A", "to", "Empty", None),
        ("A", "to", "Blank", None),
        ("A", "to", None, "ok@x.com"),
    ]


def test_x500_unicode_and_idn_addresses_are_verbatim() -> None:
    x500 = "/O=EXCHANGELABS/OU=EXCHANGE ADMINISTRATIVE GROUP (FYDIBOHF23SPDLT)/CN=RECIPIENTS/CN=1A2B3C-JDOE"
    odd = [x500, "Jörg.Müller@Bücher.example", "user@xn--bcher-kva.example", "用户@例子.广告", "  MiXeD@Case.COM "]
    p = parse(full("A", **{"from": rcpt(x500, "John Doe")}, toRecipients=[rcpt(a, None) for a in odd]))
    assert rows(p)[0]["from_address"] == x500
    assert [a for _, role, _, a in parts(p) if role == "to"] == odd


def test_duplicates_are_kept_in_wire_order() -> None:
    p = parse(full("A", subject="one"), full("B"), full("A", subject="two"), {"id": "A", "isRead": True})
    assert [(r["graph_id"], r["subject"], r["is_partial"]) for r in rows(p)] == [
        ("A", "one", False),
        ("B", "Re: Q3 renewal", False),
        ("A", "two", False),
        ("A", None, True),
    ]
    assert [g for g, role, *_ in parts(p) if role == "from"] == ["A", "B", "A"]


def test_unknown_fields_are_ignored() -> None:
    item = full(
        "A",
        body={"contentType": "html", "content": "<b>x</b>"},
        bodyPreview="x",
        isRead=True,
        categories=["Customer"],
        flag={"flagStatus": "flagged"},
        replyTo=[rcpt("r@x.com")],
        internetMessageHeaders=[{"name": "X", "value": "y"}],
        futureThing={"deep": [1, {"a": None}]},
        **{"@odata.etag": 'W/"x"', "@microsoft.graph.tips": "Use $select"},
    )
    p = parse(item)
    assert rows(p)[0]["is_partial"] is False and p.participants.num_rows == 3


def test_timestamps() -> None:
    p = parse(
        full("A", receivedDateTime="2024-05-02T09:14:03.1234567Z", sentDateTime="2024-05-02T09:14:03.5Z"),
        full("B", receivedDateTime="2024-05-02T11:14:03+02:00", sentDateTime=None),
        full("C", receivedDateTime="not a date", sentDateTime="2024-13-45T99:00:00Z"),
    )
    got = {r["graph_id"]: (r["received_at"], r["sent_at"]) for r in rows(p)}
    assert got["A"] == (
        datetime(2024, 5, 2, 9, 14, 3, 123457, tzinfo=UTC),
        datetime(2024, 5, 2, 9, 14, 3, 500000, tzinfo=UTC),
    )
    assert got["B"] == (datetime(2024, 5, 2, 9, 14, 3, tzinfo=UTC), None)
    assert got["C"] == (None, None)
    # a partial item without receivedDateTime → NULL, with the fast all-strings path too
    q = parse({"id": "P", "subject": "s"}, full("F"))
    assert [r["received_at"] for r in rows(q)] == [None, datetime(2024, 5, 2, 9, 14, 3, tzinfo=UTC)]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"value": 3}',
        b'{"value": [{"subject": "no id"}]}',
        b'{"value": [{"id": null}]}',
        json.dumps({"value": [full(toRecipients=[rcpt(42)])]}).encode(),
        json.dumps({"value": [full(subject=["a", "list"])]}).encode(),
    ],
)
def test_malformed_pages_raise_a_graph_error(raw: bytes) -> None:
    with pytest.raises(GraphError) as info:
        parse_page(raw, "inbox")
    assert (info.value.status, info.value.code) == (0, "MalformedPage")


# ---------------------------------------------------------------------------------------------- property
_text = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["", "  ", "a@b.c", "/O=EXCHANGELABS/OU=X/CN=Y", "Ünï@cødé.example", "NAME ONLY"]),
)
_email = st.one_of(
    st.none(), st.fixed_dictionaries({}, optional={"name": _text, "address": _text, "extra": st.integers()})
)
_recipient = st.one_of(st.none(), st.fixed_dictionaries({}, optional={"emailAddress": _email, "odd": st.booleans()}))
_recipients = st.one_of(st.none(), st.lists(_recipient, max_size=4))
_FIELDS = {
    "internetMessageId": _text,
    "conversationId": _text,
    "subject": _text,
    "from": _recipient,
    "sender": _recipient,
    "toRecipients": _recipients,
    "ccRecipients": _recipients,
    "bccRecipients": _recipients,
    "receivedDateTime": st.one_of(
        st.none(), st.sampled_from(["2024-05-02T09:14:03Z", "2024-05-02T09:14:03.1234567Z", "garbage"])
    ),
    "sentDateTime": st.one_of(st.none(), st.just("2024-05-02T09:14:03Z")),
    "hasAttachments": st.one_of(st.none(), st.booleans()),
    "isDraft": st.one_of(st.none(), st.booleans()),
    "parentFolderId": _text,
    "webLink": _text,
    "singleValueExtendedProperties": st.one_of(
        st.none(),
        st.lists(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {"id": st.sampled_from(["Integer 0x36", "Integer 0x0036", "Integer 0xe08", "String 0x1a"])},
                    optional={"value": st.one_of(st.none(), st.sampled_from(["0", "1", "2", "3", "9", "x"]))},
                ),
            ),
            max_size=3,
        ),
    ),
    "@odata.type": _text,
    "@removed": st.one_of(st.just({"reason": "deleted"}), st.just({})),
}
_item = st.builds(
    lambda mid, rest: {"id": mid, **rest},
    st.sampled_from(["A", "B", "C", "AAMk=="]),
    st.fixed_dictionaries({}, optional=_FIELDS),
)


_PROBE = [f for f in HEADER_FIELDS if f not in ("id", "from", "sender")]


def _is_partial(item: dict) -> bool:
    return any(f not in item for f in _PROBE)


def _expected_sensitivity(item: dict) -> str | None:
    for prop in item.get("singleValueExtendedProperties") or ():
        if prop is not None and prop["id"].lower() in ("integer 0x36", "integer 0x0036"):
            return SENSITIVITY_VALUES.get(int(v)) if (v := prop.get("value")) and v.isdigit() else None
    return None


def _expected_participants(item: dict) -> tuple[int, int]:
    """(rows with an address, name-only rows: a non-blank display name and no address, kept with a NULL address for
    o365sync/participants.py)."""
    if "@removed" in item or _is_partial(item):
        return 0, 0
    with_address = name_only = 0
    for f in ("from", "sender", "toRecipients", "ccRecipients"):
        value = item.get(f)
        for r in value if isinstance(value, list) else [value]:
            ea = (r or {}).get("emailAddress") or {}
            address, name = ea.get("address"), ea.get("name")
            if isinstance(address, str) and address.strip():
                with_address += 1
            elif isinstance(name, str) and name.strip():
                name_only += 1
    return with_address, name_only


@settings(max_examples=150, deadline=None)
@given(items=st.lists(_item, max_size=8))
@example(items=[{"id": "A", "ccRecipients": [{"emailAddress": {"name": "0"}}]}])  # a name only: a row, NULL address
def test_any_recipient_shape_gives_well_typed_tables(items: list[dict]) -> None:
    p = parse(*items)
    live = [i for i in items if "@removed" not in i]
    assert p.messages.num_rows == len(live) and p.removed == [i["id"] for i in items if "@removed" in i]
    counts = [_expected_participants(i) for i in items]
    with_address, name_only = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert p.participants.num_rows == with_address + name_only
    assert p.participants.column("address").null_count == name_only
    assert set(p.participants.column("role").to_pylist()) <= {"from", "sender", "to", "cc"}
    partial = p.messages.column("is_partial").to_pylist()
    assert partial == [_is_partial(i) for i in live]
    assert p.messages.column("sensitivity").to_pylist() == [_expected_sensitivity(i) for i in live]
    pa.Table.from_batches(p.messages.to_batches(), MESSAGES_SCHEMA).validate(full=True)


# ---------------------------------------------------------------------------------------------- bodies
def test_one_megabyte_bodies_are_fetched_linearly() -> None:
    big = "Löwe 🦁 " * 150_000  # ~1 MB of text, multi-byte characters included
    ids = [f"AAMk{i}" for i in range(40)]

    def handler(request: httpx.Request) -> httpx.Response:
        text = {"contentType": "text"}
        return batch_answer(
            request, lambda r: {"body": {**text, "content": big + r["url"]}}, {"Content-Type": "application/json"}
        )

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = GraphClient(http, "https://graph.test/v1.0", lambda force: "tok")
        started = time.perf_counter()
        got = dict(fetch_bodies(client, ids))
        elapsed = time.perf_counter() - started
    assert sorted(got) == sorted(ids) and all(len(b) > 1_000_000 and b.startswith("Löwe") for b in got.values())
    assert elapsed < 20  # ~45 MB of JSON each way; quadratic handling would take minutes


# ---------------------------------------------------------------------------------------------- text Python cannot hold
def test_a_lone_surrogate_is_replaced_and_counted_not_fatal() -> None:
    """`"Deal \\ud83d"` is valid JSON but not Unicode: the page used to fail (so the mailbox failed every run)."""
    items = [
        full("A", subject="Deal \ud83d", **{"from": rcpt("danas@fabrikam.com", "Dana \udc00")}),
        full("B", subject="Pair \ud83d\ude00 and a literal \\ud83d"),
        full("C"),
    ]
    p = parse(*items)
    got = [(r["graph_id"], r["subject"], r["from_name"]) for r in rows(p)]
    assert got == [
        ("A", "Deal \ufffd", "Dana \ufffd"),
        ("B", "Pair \U0001f600 and a literal \\ud83d", "Dana Swope"),
        ("C", "Re: Q3 renewal", "Dana Swope"),
    ]
    assert p.odd == 1
    raw = json.dumps({"value": [full("D", subject="x")]}).encode().replace(b'"x"', b'"x\xed\xa0\xbdy\xff"')
    broken = parse_page(raw, "inbox")  # not UTF-8 at all (a surrogate or stray byte on the wire)
    assert (rows(broken)[0]["subject"], broken.odd) == ("x\ufffdy\ufffd", 1)
    with pytest.raises(GraphError) as info:  # still a page, or nothing
        parse_page(b'{"value": [{"id": "E", "subject": "\\ud83d"', "inbox")
    assert info.value.code == "MalformedPage"


def _as_graph_sends(text: str) -> str:
    """What a JSON reader makes of `text` escaped by Graph's writer: pairs joined, lone halves U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


_any_text = st.lists(
    st.one_of(
        st.characters(categories=["Cs"]),
        st.characters(exclude_characters="\ufffd"),
        st.sampled_from(["\\", '"', "\\ud83d", "\ud83d\ude00"]),
    ),
    max_size=12,
).map("".join)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.tuples(_any_text, _any_text), max_size=6))
def test_any_json_string_decodes_with_lone_surrogates_replaced(texts: list[tuple[str, str]]) -> None:
    items = [
        full(f"M{i}", subject=subject, **{"from": rcpt(f"x{i}@fabrikam.com", name)})
        for i, (subject, name) in enumerate(texts)
    ]
    p = parse_page(page(*items, next_link="https://graph.microsoft.com/v1.0/me/x?$skip=1"), "inbox")
    got = [(r["subject"], r["from_name"]) for r in rows(p)]
    assert got == [(_as_graph_sends(s), _as_graph_sends(n)) for s, n in texts]
    assert p.odd == sum(_as_graph_sends(s + "|" + n).count("\ufffd") > 0 for s, n in texts)
    assert p.participants.num_rows == 3 * len(texts)  # nothing else of the items changed
