"""The lazy mailbox of bench/import_1m.py: what the Graph simulator reads from it by arithmetic (folder order
newest first, received times, id lookup) equals what the stock simulator would build from the same messages."""

from __future__ import annotations

from datetime import timedelta

from simulators.graph import _us
from simulators.lazy_mailbox import LazyMailbox, _ById, _NewestFirst
from simulators.world import generate_world


def test_folder_order_times_and_ids_match_the_materialised_mailbox() -> None:
    world = generate_world(seed=3, tenants=1, users_per_tenant=1, messages_per_user=1, contacts_per_tenant=20)
    tenant, user = world.tenants[0], world.tenants[0].users[0]
    box = LazyMailbox(world, tenant.tid, user.oid, 537, world.now - timedelta(days=9), world.now, match_share=0.2)
    every = list(box)
    assert [m.id for m in every] == [box[i].id for i in range(len(box))]  # a pure function of the position
    assert all(a.received < b.received for a, b in zip(every, every[1:], strict=False))
    for folder in ("inbox", "sentitems", None):
        stock = sorted((m for m in every if folder is None or m.folder == folder), key=lambda m: m.received)[::-1]
        newest = _NewestFirst(box, folder, "message")
        assert [m.id for m in newest[:]] == [m.id for m in stock]
        assert _NewestFirst(box, folder, "neg_us")[:] == [-_us(m.received) for m in stock]
        assert [m.id for m in newest[5:9]] == [m.id for m in stock[5:9]]
    ids = _ById(box)
    assert ids.get(every[123].id).subject == every[123].subject
    assert ids.get("AAMkunknown") is None and ids.get(every[0].id[:-1] + "9999") is None
    assert {m.kind for m in every} >= {"contact", "internal", "stranger"}
