"""The vectorised matcher against a naive, obviously-correct oracle, over generated inputs."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from o365sync.domains import FREE_MAIL_DOMAINS, registrable_domain
from o365sync.matching import KIND_RANK, ROLE_RANK, build_index, match_participants, shadowing_domains

OWN = ["contoso.com"]


def oracle(participants, people, accounts, own):
    """(graph_id, crm_id, kind, matched address, is_primary) for every link, in plain Python: the documented rules
    (exact address -> people; registrable domain -> accounts, never free-mail or own; the best-ranked participant's
    address, the first listed among equals; primary = lowest (kind, role, CRM id))."""
    own = {d.strip().lower() for d in own}
    excluded = FREE_MAIL_DOMAINS | own | {r for d in own if (r := registrable_domain(d))}
    by_email, by_domain = {}, {}
    for crm_id, kind, email in people:
        e = (email or "").strip().lower()
        if "@" in e:
            by_email.setdefault(e, set()).add((crm_id, kind))
    for crm_id, domain in accounts:
        d = (domain or "").strip().lower()
        r = registrable_domain(d) if d else None
        if r and r not in excluded:
            by_domain.setdefault(r, set()).add((crm_id, "account"))
    best_participant = {}
    for i, (graph_id, role, address) in enumerate(participants):
        a = (address or "").strip().lower()
        dom = a.rpartition("@")[2]
        if "@" not in a or dom in own:
            continue
        records = by_email.get(a, set()) | by_domain.get(registrable_domain(dom), set())
        for crm_id, kind in records:
            seen = best_participant.get((graph_id, crm_id, kind))
            mine = (ROLE_RANK.get(role, len(ROLE_RANK)), i, a)
            best_participant[(graph_id, crm_id, kind)] = mine if seen is None else min(seen, mine)
    rank = {link: (KIND_RANK[link[2]], p[0], link[1]) for link, p in best_participant.items()}
    primary = {}
    for link, r in rank.items():
        primary[link[0]] = min(primary.get(link[0], r), r)
    return {(*link, p[2], rank[link] == primary[link[0]]) for link, p in best_participant.items()}


# Hosts that exercise the rules: sub-domains (PSL), public suffixes, private suffixes (github.io), registrable
# domains with PSL rules below them (amazonaws.com), free mail, own domains, case, white space, empty labels,
# a trailing dot, non-ASCII, several '@'.
HOSTS = [
    "acme.com",
    "eu.acme.com",
    "Acme.com",
    "acme.com.",
    "a..acme.com",
    ".acme.com",
    "acme.co.uk",
    "eu.acme.co.uk",
    "co.uk",
    "gmail.com",
    "mail.yahoo.co.uk",
    "contoso.com",
    "eu.contoso.com",
    "x.s3.amazonaws.com",
    "amazonaws.com",
    "s3.amazonaws.com",
    "acme.github.io",
    "other.github.io",
    "bücher.de",
    "shop.bücher.de",
    " acme.com",
    "b@acme.com",
    "localhost",
]
LOCALS = ["jane", "bob", "Jane", "x", "sales", "no-reply"]
ROLES = ["from", "sender", "to", "cc", "bcc", None]
address = st.builds(
    lambda pad, local, host, up: (" " * pad) + (f"{local}@{host}".upper() if up else f"{local}@{host}"),
    st.integers(0, 1),
    st.sampled_from(LOCALS),
    st.sampled_from(HOSTS),
    st.booleans(),
) | st.sampled_from(["", "   ", "/O=EXCHANGELABS/CN=RECIPIENTS/CN=X"])
FILLER = [(f"f{i}", "contact", f"filler{i}@filler{i % 97}.example") for i in range(2000)]


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    participants=st.lists(
        st.tuples(st.sampled_from(["m1", "m2", "m3", "m4"]), st.sampled_from(ROLES), address), max_size=30
    ),
    people=st.lists(
        st.sampled_from([("c1", "contact"), ("c2", "contact"), ("l1", "lead"), ("p1", "person_account")]).flatmap(
            lambda rec: st.tuples(st.just(rec[0]), st.just(rec[1]), address)
        ),
        max_size=6,
    ),
    accounts=st.lists(
        st.tuples(st.sampled_from(["a1", "a2", "c1"]), st.one_of(st.none(), st.sampled_from(HOSTS))), max_size=4
    ),
    big_index=st.booleans(),  # a big index is binary-searched, a small one hash-joined: both paths
    cache_hosts=st.booleans(),  # domains through the index's host cache (pages) or not (batches)
)
def test_matcher_agrees_with_oracle(participants, people, accounts, big_index, cache_hosts):
    people = people + FILLER if big_index else people
    p = pl.DataFrame(
        participants, schema={"graph_id": pl.String, "role": pl.String, "address": pl.String}, orient="row"
    )
    crm_people = pl.DataFrame(people, schema={"crm_id": pl.String, "kind": pl.String, "email": pl.String}, orient="row")
    crm_accounts = pl.DataFrame(accounts, schema={"crm_id": pl.String, "domain": pl.String}, orient="row")
    index = build_index(crm_people, crm_accounts, OWN)
    got = match_participants(p, index, cache_hosts=cache_hosts)
    assert set(got.iter_rows()) == oracle(participants, people, accounts, OWN)
    assert got.height == len(set(got.iter_rows()))
    # a page at a time gives the same links as the whole batch (the product matches one Graph page at a time)
    pages = [match_participants(p.filter(pl.col("graph_id") == g), index) for g in ["m1", "m2", "m3", "m4"]]
    assert set(pl.concat(pages).iter_rows()) == set(got.iter_rows())


def test_hosts_under_a_registrable_domain_with_psl_rules_below_it_ask_the_list() -> None:
    """amazonaws.com is registrable, but s3.amazonaws.com is a public suffix: mail from x.s3.amazonaws.com is not
    amazonaws.com's, mail from eu.amazonaws.com is."""
    assert "amazonaws.com" in shadowing_domains()
    index = build_index(
        pl.DataFrame(schema={"crm_id": pl.String, "kind": pl.String, "email": pl.String}),
        pl.DataFrame({"crm_id": ["A1"], "domain": ["amazonaws.com"]}),
        OWN,
    )
    parts = pl.DataFrame({"graph_id": ["m1", "m2"], "address": ["jo@x.s3.amazonaws.com", "jo@eu.amazonaws.com"]})
    assert match_participants(parts, index).select("graph_id", "crm_id").rows() == [("m2", "A1")]


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
