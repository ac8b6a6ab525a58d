"""A Grid wrapper that pulls replies every few milliseconds instead of every 3 s.

Flower's deployment grid (``HttpGrid.send_and_receive``) sleeps 3 s between
pulls, so every stage of every round waits up to 3 s after its last reply.
:class:`PollingGrid` delegates everything to the grid it wraps but runs its own
push-then-pull loop with a short interval, and streams replies in push order
as soon as each one (and every earlier one) has arrived, like
:class:`~fedcore.engines.embedded.EmbeddedGrid`: aggregation order, and so the
model, does not depend on which client answered first. It sleeps only after a
pull that brought nothing: behind ``fedcore server``'s guard an empty pull is
already held until a client pushes (:mod:`fedcore.deploy.guard`), so replies
are taken as they come, not on the next tick.

With ``pack=True`` (deployment, ``deploy.pack-arrays``) every outgoing record
of several arrays travels as one object (:mod:`fedcore.core.packing`: 20 objects
become 6 for a train message of the default CNN, each one an HTTPS request to
the SuperLink), and packed replies are unpacked before anyone reads them; a reply
whose packed arrays are malformed becomes an error reply from its client.

Under deployment each reply's receipt is confirmed to the SuperLink from a
background thread (:func:`fedcore.flower_adapter.confirm_replies_behind`): nothing
waits for that answer, and Flower's grid sent it before pulling the next reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedcore.core.packing import PackingError, pack_content, unpack_content
from fedcore.flower_adapter import (
    GridBase,
    bundle_runtime_transfers,
    confirm_replies_behind,
    replace_with_error,
)

__all__ = ["PollingGrid"]


class PollingGrid(GridBase):
    """Wrap ``inner`` so ``send_and_receive`` pulls every ``interval`` seconds.

    Parameters
    ----------
    inner : Grid
        The engine's grid (Flower's ``HttpGrid`` under deployment).
    interval : float (default: 0.05)
        Seconds between two pulls while replies are outstanding.
    pack : bool (default: False)
        Send each record of several arrays as one packed object (the receiving
        ClientApp must unpack it: fedcore's does, see :mod:`fedcore.core.packing`).

    """

    #: ``send_and_receive`` yields each reply as soon as it (and every earlier one) arrived:
    #: wrapping it again would change nothing.
    streams_replies = True

    def __init__(self, inner: Grid, *, interval: float = 0.05, pack: bool = False) -> None:
        self._inner = inner
        self.interval = interval
        self.pack = pack
        confirm_replies_behind(inner)  # Flower's HttpGrid: receipts off the replies' path
        bundle_runtime_transfers(inner)  # ... and each message or reply with its objects

    # -- delegation -----------------------------------------------------------
    @property
    def run(self) -> Any:
        """The inner grid's run."""
        return self._inner.run

    def set_run(self, run: Any) -> None:
        """Set the inner grid's run."""
        self._inner.set_run(run)

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids (inner grid)."""
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Connected nodes with their registered info (inner grid)."""
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the inner grid (each message's arrays packed with ``pack``).

        The messages keep their own content: it is swapped for the packed one only
        while the inner grid pushes (which stamps each message's id).
        """
        if not self.pack:
            return self._inner.push_messages(messages)
        messages = list(messages)
        packed: dict[int, Any] = {}  # the round's messages share one content: packed once
        originals = []
        for msg in messages:
            if msg.has_content():
                content = msg.content
                if id(content) not in packed:
                    packed[id(content)] = pack_content(content)
                originals.append((msg, content))
                msg.content = packed[id(content)]
        try:
            return self._inner.push_messages(messages)
        finally:
            for msg, content in originals:
                msg.content = content

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the inner grid (non-blocking); packed replies unpacked."""
        replies = list(self._inner.pull_messages(message_ids))
        for reply in replies:
            if reply.has_content():
                try:
                    content, was_packed = unpack_content(reply.content)
                except PackingError as exc:
                    replace_with_error(reply, f"malformed reply: {exc}")
                    continue
                if was_packed:
                    reply.content = content
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # -- the fast loop --------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push once, then pull every ``interval`` s; yield replies in push order.

        Stops at ``timeout`` seconds: replies that arrived are yielded (still in
        push order), missing ones are not (the caller reports those clients as
        timed out).
        """
        ids = [str(i) for i in self.push_messages(list(messages)) if i]
        return self._replies(ids, timeout)

    def _replies(self, ids: list[str], timeout: float | None) -> Iterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = set(ids)
        arrived: dict[str, Message] = {}
        nxt = 0
        while True:
            got = False
            if pending:
                for reply in self.pull_messages(sorted(pending)):
                    mid = reply.metadata.reply_to_message_id
                    if mid in pending:
                        pending.discard(mid)
                        arrived[mid] = reply
                        got = True
            while nxt < len(ids) and ids[nxt] in arrived:
                yield arrived.pop(ids[nxt])
                nxt += 1
            if nxt == len(ids):
                return
            if deadline is not None and time.monotonic() >= deadline:
                # Missing replies are late; every reply that did arrive still counts.
                for mid in ids[nxt:]:
                    if mid in arrived:
                        yield arrived.pop(mid)
                return
            if not got:  # replies that are flowing are pulled again at once
                time.sleep(self.interval)
