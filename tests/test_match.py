"""The vectorised matcher against a naive, obviously-correct oracle, over generated inputs."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from o365sync.domains import FREE_MAIL_DOMAINS
from o365sync.matching import build_index, match_participants

OWN = ["contoso.com"]
DOMAINS = ["acme.com", "globex.io", "contoso.com", "gmail.com", "initech.co.uk", "Acme.com"]
LOCALS = ["jane", "bob", "Jane", "x", "sales"]


def oracle(participants, people, accounts, own):
    own = {d.lower() for d in own}
    by_email, by_domain = {}, {}
    for crm_id, kind, email in people:
        by_email.setdefault(email.strip().lower(), set()).add((crm_id, kind))
    for crm_id, domain in accounts:
        d = (domain or "").strip().lower()
        if d and d not in FREE_MAIL_DOMAINS and d not in own:
            by_domain.setdefault(d, set()).add((crm_id, "account"))
    out = set()
    for graph_id, address in participants:
        addr = address.strip().lower()
        dom = addr.rpartition("@")[2]
        if "@" not in addr or dom in own:
            continue
        for crm_id, kind in by_email.get(addr, set()) | by_domain.get(dom, set()):
            out.add((graph_id, crm_id, kind))
    return out


address = st.builds(
    lambda pad, local, dom, up: (" " * pad) + (f"{local}@{dom}".upper() if up else f"{local}@{dom}"),
    st.integers(0, 1),
    st.sampled_from(LOCALS),
    st.sampled_from(DOMAINS),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    participants=st.lists(st.tuples(st.sampled_from(["m1", "m2", "m3", "m4"]), address), max_size=30),
    people=st.lists(
        st.sampled_from([("c1", "contact"), ("c2", "contact"), ("l1", "lead")]).flatmap(
            lambda rec: st.tuples(st.just(rec[0]), st.just(rec[1]), address)
        ),
        max_size=6,
    ),
    accounts=st.lists(
        st.tuples(st.sampled_from(["a1", "a2"]), st.one_of(st.none(), st.sampled_from(DOMAINS))), max_size=4
    ),
)
def test_matcher_agrees_with_oracle(participants, people, accounts):
    p = pl.DataFrame(participants, schema={"graph_id": pl.String, "address": pl.String}, orient="row")
    crm_people = pl.DataFrame(people, schema={"crm_id": pl.String, "kind": pl.String, "email": pl.String}, orient="row")
    crm_accounts = pl.DataFrame(accounts, schema={"crm_id": pl.String, "domain": pl.String}, orient="row")
    got = match_participants(p, build_index(crm_people, crm_accounts, OWN))
    assert set(got.select("graph_id", "crm_id", "crm_kind").iter_rows()) == oracle(participants, people, accounts, OWN)
    assert got.select("graph_id", "crm_id").is_unique().all()
    rank = {"contact": 0, "lead": 1, "account": 2}
    for _, links in got.group_by("graph_id"):
        primaries = links.filter(pl.col("is_primary"))
        assert primaries.height == 1  # exactly one primary link per matched message ...
        assert rank[primaries["crm_kind"][0]] == min(rank[k] for k in links["crm_kind"])  # ... of the best kind


def test_free_mail_and_own_domains_never_match_accounts():
    index = build_index(
        pl.DataFrame(schema={"crm_id": pl.String, "kind": pl.String, "email": pl.String}),
        pl.DataFrame({"crm_id": ["a1", "a2", "a3"], "domain": ["gmail.com", "contoso.com", "acme.com"]}),
        OWN,
    )
    parts = pl.DataFrame(
        {"graph_id": ["m1", "m2", "m3"], "address": ["someone@gmail.com", "colleague@contoso.com", "new@ACME.com "]}
    )
    got = match_participants(parts, index)
    assert got.rows() == [("m3", "a3", "account", "new@acme.com", True)]


def test_contact_with_free_mail_address_matches_exactly():
    index = build_index(
        pl.DataFrame({"crm_id": ["c1"], "kind": ["contact"], "email": [" Jo.Doe@Gmail.com"]}),
        pl.DataFrame(schema={"crm_id": pl.String, "domain": pl.String}),
        OWN,
    )
    got = match_participants(
        pl.DataFrame({"graph_id": ["m1", "m2"], "address": ["jo.doe@gmail.com", "x@gmail.com"]}), index
    )
    assert got.select("graph_id", "crm_id").rows() == [("m1", "c1")]


def test_primary_link_prefers_contact_then_lead_then_account_then_the_sender():
    people = pl.DataFrame(
        {
            "crm_id": ["c2", "c1", "l1"],
            "kind": ["contact", "contact", "lead"],
            "email": ["to@acme.com", "from@acme.com", "lead@globex.io"],
        }
    )
    index = build_index(people, pl.DataFrame({"crm_id": ["a1"], "domain": ["acme.com"]}), OWN)
    parts = pl.DataFrame(
        {
            "graph_id": ["m1", "m1", "m2", "m2", "m3"],
            "role": ["to", "from", "cc", "from", "from"],
            "address": ["to@acme.com", "from@acme.com", "lead@globex.io", "new@acme.com", "other@acme.com"],
        }
    )
    got = match_participants(parts, index)
    primary = dict(got.filter(pl.col("is_primary")).select("graph_id", "crm_id").iter_rows())
    assert primary == {"m1": "c1", "m2": "l1", "m3": "a1"}  # sender's contact; lead beats account; account


def test_account_domains_are_registrable_and_never_free_mail_or_own() -> None:
    """Mail from a sub-domain reaches the account (PSL); a PSL private suffix (github.io) keeps sites apart;
    free-mail (from the maintained list, not only the big names) and own domains never match accounts."""
    accounts = pl.DataFrame(
        {
            "crm_id": ["A1", "A2", "A3", "A4", "A5"],
            "domain": ["acme.co.uk", "acme.github.io", "mail2chicago.com", "contoso.com", "yahoo.co.uk"],
        }
    )
    index = build_index(
        pl.DataFrame(schema={"crm_id": pl.String, "kind": pl.String, "email": pl.String}), accounts, ["contoso.com"]
    )
    parts = pl.DataFrame(
        {
            "graph_id": ["m1", "m2", "m3", "m4", "m5", "m6"],
            "address": [
                "jane@eu.acme.co.uk",
                "x@other.github.io",
                "x@mail2chicago.com",
                "boss@contoso.com",
                "me@yahoo.co.uk",
                "y@acme.github.io",
            ],
        }
    )
    got = match_participants(parts, index)
    assert sorted(zip(got["graph_id"], got["crm_id"], strict=True)) == [("m1", "A1"), ("m6", "A2")]
