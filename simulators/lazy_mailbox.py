"""A mailbox of any size that costs no memory until a page of it is served, for benchmarks at a million messages
(bench/import_1m.py): message i is a pure function of (seed, i), received times rise with i, and the folder
follows i (73 % Inbox, 27 % Sent Items), so the newest-first order of a folder and an id lookup are arithmetic.

`LazyGraphSimulator` is the Graph simulator with two differences for such mailboxes: its id index and folder order
come from the positions instead of being built over every message, and it caches nothing per message (the stock
simulator keeps every served message's JSON, which at a million messages would be gigabytes in the host process).
What it serves is the stock simulator's own rendering of each message, so the wire format is unchanged.
Unverified, as for the stock simulator: see simulators/graph.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, overload

from simulators.graph import GraphSimulator, _FolderIndex, _Mailbox, _us
from simulators.world import _COMPANY, _FIRST, FREE_MAIL_DOMAINS, Mailbox, SimMessage, World

ID_PREFIX = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0ALAZY"
INBOX_PER_100 = 73  # of every 100 consecutive messages, the first 73 are in Inbox, the rest in Sent Items


def _item(i: int | slice, size: int, at: Callable[[int], Any]) -> Any:
    """Sequence indexing (an index, negative ones included, or a slice: a list) over positions 0..size-1."""
    if isinstance(i, slice):
        return [at(k) for k in range(*i.indices(size))]
    if i < 0:
        i += size
    if not 0 <= i < size:
        raise IndexError(i)
    return at(i)


class LazyMailbox(Sequence[SimMessage]):
    """`n` messages of one user, oldest first, received evenly between `first` and `last`. A message has one
    external participant: a CRM contact (share `match_share`, so the ground truth is the contacts' mail), a
    colleague, a stranger at an unknown company, a newsletter or a free-mail sender; a fifth copy a colleague."""

    def __init__(
        self,
        world: World,
        tid: str,
        oid: str,
        n: int,
        first: datetime,
        last: datetime,
        match_share: float = 0.03,
        seed: int = 0,
    ):
        tenant = world.tenant(tid)
        user = world.user(oid)
        self.n, self.oid, self.seed, self.match_share = n, oid, seed, match_share
        self.first, self.step = first, (last - first) / max(n - 1, 1)
        self.me = Mailbox(user.display_name, user.upn)
        self.contacts = [Mailbox(f"{c.first_name} {c.last_name}", c.email) for c in world.crm[tid].contacts]
        self.colleagues = [Mailbox(f"Colleague {k}", f"colleague{k}@{tenant.domains[0]}") for k in range(40)]
        self.body = "Hi,\n\nFollowing up on our conversation.\n\n" + "Lorem ipsum dolor sit amet. " * 20

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> SimMessage: ...
    @overload
    def __getitem__(self, i: slice) -> list[SimMessage]: ...
    def __getitem__(self, i: int | slice) -> SimMessage | list[SimMessage]:
        return _item(i, self.n, self.make)

    def __iter__(self) -> Iterator[SimMessage]:
        return (self.make(i) for i in range(self.n))

    @staticmethod
    def folder_of(i: int) -> str:
        return "inbox" if i % 100 < INBOX_PER_100 else "sentitems"

    def received(self, i: int) -> datetime:
        return self.first + self.step * i

    def position(self, message_id: str) -> int | None:
        tail = message_id.removeprefix(ID_PREFIX)
        if tail == message_id or not tail.isdigit() or int(tail) >= self.n:
            return None
        return int(tail)

    def make(self, i: int) -> SimMessage:
        rng = random.Random(self.seed * 1_000_003 + i)
        r = rng.random()
        if r < self.match_share:
            other, kind = self.contacts[rng.randrange(len(self.contacts))], "contact"
        elif r < self.match_share + 0.30:
            other, kind = self.colleagues[rng.randrange(len(self.colleagues))], "internal"
        elif r < self.match_share + 0.60:
            company = f"{_COMPANY[rng.randrange(len(_COMPANY))].lower()}-unknown{rng.randrange(50_000)}.com"
            other, kind = Mailbox("A Stranger", f"{_FIRST[rng.randrange(len(_FIRST))].lower()}@{company}"), "stranger"
        elif r < self.match_share + 0.80:
            company = f"{_COMPANY[rng.randrange(len(_COMPANY))].lower()}{rng.randrange(2000)}.com"
            other, kind = Mailbox("Weekly Digest", f"digest@news.{company}"), "newsletter"
        else:
            host = FREE_MAIL_DOMAINS[rng.randrange(len(FREE_MAIL_DOMAINS))]
            other, kind = Mailbox("Free Mailer", f"{_FIRST[rng.randrange(len(_FIRST))].lower()}@{host}"), "freemail"
        folder = self.folder_of(i)
        sender, to = (self.me, [other]) if folder == "sentitems" else (other, [self.me])
        received = self.received(i)
        return SimMessage(
            id=f"{ID_PREFIX}{i:016d}",
            owner_oid=self.oid,
            folder=folder,
            internet_message_id=f"<lazy-{self.seed}-{i}@mail.example>",
            conversation_id=f"lazy-conversation-{self.seed}-{i // 3}",
            subject=f"Topic {i % 997}",
            body=self.body,
            sender=sender,
            to=to,
            cc=[self.colleagues[i % len(self.colleagues)]] if i % 5 == 0 else [],
            received=received,
            sent=received - timedelta(seconds=5),
            kind=kind,
        )

    def folder_size(self, folder: str | None) -> int:
        whole, rest = divmod(self.n, 100)
        if folder is None:
            return self.n
        if folder == "inbox":
            return whole * INBOX_PER_100 + min(rest, INBOX_PER_100)
        if folder == "sentitems":
            return whole * (100 - INBOX_PER_100) + max(0, rest - INBOX_PER_100)
        return 0

    def folder_position(self, folder: str | None, k: int) -> int:
        """Position in the mailbox of the k-th oldest message of `folder` (None: the whole mailbox)."""
        if folder is None:
            return k
        per = INBOX_PER_100 if folder == "inbox" else 100 - INBOX_PER_100
        block, offset = divmod(k, per)
        return block * 100 + offset + (0 if folder == "inbox" else INBOX_PER_100)


class _NewestFirst(Sequence[Any]):
    """A folder of a LazyMailbox newest first, as messages (`value` "message") or as -received µs ("neg_us")."""

    def __init__(self, box: LazyMailbox, folder: str | None, value: str):
        self.box, self.folder, self.value, self.size = box, folder, value, box.folder_size(folder)

    def __len__(self) -> int:
        return self.size

    def _at(self, j: int) -> Any:
        i = self.box.folder_position(self.folder, self.size - 1 - j)
        return self.box.make(i) if self.value == "message" else -_us(self.box.received(i))

    def __getitem__(self, j: Any) -> Any:
        return _item(j, self.size, self._at)


class _ById:
    """The id -> message mapping of a LazyMailbox, by arithmetic."""

    def __init__(self, box: LazyMailbox):
        self.box = box

    def get(self, message_id: str, default: SimMessage | None = None) -> SimMessage | None:
        i = self.box.position(message_id)
        return default if i is None else self.box.make(i)

    def values(self) -> Iterator[SimMessage]:
        return iter(self.box)


class _Forgetful(dict):
    """A cache that keeps nothing (the stock simulator's per-message caches, for lazy mailboxes)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return default


class LazyGraphSimulator(GraphSimulator):
    """GraphSimulator for worlds whose mailboxes may be `LazyMailbox`es (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._base = _Forgetful()
        self._frags = _Forgetful()

    def _mailbox(self, oid: str) -> _Mailbox:
        msgs = self.world.mailboxes.get(oid)
        if not isinstance(msgs, LazyMailbox):
            return super()._mailbox(oid)
        return _Mailbox(self._stamp(oid, msgs), _ById(msgs))  # type: ignore[arg-type]

    def _folder_index(self, oid: str, folder: str | None) -> _FolderIndex:
        msgs = self.world.mailboxes.get(oid)
        if not isinstance(msgs, LazyMailbox):
            return super()._folder_index(oid, folder)
        stamp = self._stamp(oid, msgs)  # type: ignore[arg-type]
        return _FolderIndex(stamp, _NewestFirst(msgs, folder, "message"), _NewestFirst(msgs, folder, "neg_us"))  # type: ignore[arg-type]
