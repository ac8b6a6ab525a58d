"""The server's secure exchange: SecAgg+ over the Grid, returning one aggregate.

Bell et al., CCS 2020 (SecAgg+); Bonawitz et al., CCS 2017.

:class:`SecureExchange` is an :class:`~fedcore.serverside.exchange.Exchange`, like
:class:`~fedcore.serverside.exchange.PlainExchange`: the strategy still decides who
takes part and what each client gets (``configure_train`` / ``configure_evaluate``);
the exchange then runs the five stages of :mod:`fedcore.secagg.protocol.machine`
with ``train.secagg`` / ``evaluate.secagg`` messages through
``grid.send_and_receive`` only (the Message API), so it runs unchanged on the
embedded engine, Flower's simulation engine (tested with Ray) and Flower's
deployment engine. Every stage has a deadline: ``stage_timeout`` for the three key
stages, the round timeout for the one that trains or evaluates. Masked vectors are
summed as they arrive (O(model) memory).

Training returns the same :class:`~fedcore.serverside.exchange.Aggregate` the plain
exchange does (mean update, extras the strategy sums, total weight, metrics,
rejections), so every linear strategy works unchanged; on a protocol failure the
aggregate has no update (the round loop keeps the previous model) and the reason is
logged. The strategy never sees an individual update, so a strategy with
``linear = False`` is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcore.core.aggregation import ArraySpec, array_view, spec_of
from fedcore.core.errors import (
    AggregationError,
    ConfigError,
    SecureAggregationError,
    is_user_code_error,
)
from fedcore.core.records import Rejection
from fedcore.core.seeds import derive_seed
from fedcore.secagg.protocol.crypto import RandBytes, RoundBinding
from fedcore.secagg.protocol.graph import resolve
from fedcore.secagg.protocol.machine import (
    STAGE_CONFIRM,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    Advert,
    RoundParams,
    ServerRound,
    UnmaskReply,
)
from fedcore.secagg.protocol.quantize import (
    WEIGHT_OVERFLOW,
    Decoded,
    Quantizer,
    choose_quantizer,
    decode,
    extra_coordinates,
)
from fedcore.secagg.protocol.rosters import PinnedRoster, RegisteredKeyRoster, Roster
from fedcore.secagg.protocol.wire import MASKED, SECAGG, content_digest, pack_ids, unpack_ids
from fedcore.serverside.exchange import Aggregate, EvaluateResult, Progress

__all__ = [
    "EVALUATE_MESSAGE_TYPE",
    "MESSAGE_TYPE",
    "SecAggSettings",
    "SecureExchange",
]

log = logging.getLogger("fedcore")

#: Flower message types of the secure exchanges (ClientApp action "secagg").
MESSAGE_TYPE = "train.secagg"
EVALUATE_MESSAGE_TYPE = "evaluate.secagg"


@dataclass(frozen=True)
class SecAggSettings:
    """Secure-aggregation parameters (what ``[secagg]`` holds, minus ``enabled``).

    Parameters
    ----------
    neighbours, threshold : int (default: 0 = auto)
        ``k`` and ``t`` (see :func:`fedcore.secagg.protocol.graph.resolve`).
    clip : float (default: 4.0)
        Each coordinate of an update (trained minus global) is clipped to ``[-clip, clip]``.
    bits : int (default: 16)
        Quantization bits (step ``clip / 2^(bits-1)``).
    ring_bits : int (default: 0)
        Masking ring ``Z_{2^ring_bits}``: 32, 64, or 0 to pick per round (64 in the
        first round, then 32 whenever the last total weight leaves room; see
        :func:`fedcore.secagg.protocol.quantize.choose_quantizer`).
    stage_timeout : float (default: 60.0)
        Deadline in seconds of each key exchange (keys, shares, unmask).
    metric_keys : tuple of str (default: ``("train_loss",)``)
        Training metrics averaged securely with the same weights.

    """

    neighbours: int = 0
    threshold: int = 0
    clip: float = 4.0
    bits: int = 16
    ring_bits: int = 0
    stage_timeout: float = 60.0
    metric_keys: tuple[str, ...] = ("train_loss",)

    def quantizer(self, clients: int, previous_weight: int | None) -> Quantizer:
        """Build the round's :class:`Quantizer` (see ``choose_quantizer``)."""
        return choose_quantizer(
            clip=self.clip,
            bits=self.bits,
            ring_bits=self.ring_bits,
            clients=clients,
            previous_weight=previous_weight,
        )


class _Failed(Exception):
    """Internal: the round cannot complete; carries the reason."""


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line[:limit]


def _client_reason(text: str, limit: int = 8000) -> str:
    """A client's error as the server keeps it.

    The user's own traceback is kept whole (the round loop shows it once); any other
    error by its first line.
    """
    if is_user_code_error(text):
        return text.strip()[:limit]
    return _first_line(text)


class _SecureSum:
    """Runs one SecAgg+ exchange over the grid and returns the decoded weighted sums.

    Parameters
    ----------
    settings : SecAggSettings
        Protocol parameters.
    seed : int (default: 0)
        Run seed: the neighbour graph and stochastic rounding derive from it and
        the round (public; the secrets come from ``randbytes``).
    roster : Roster, optional
        How the server checks advert signatures (default: pin each node's first
        key for the life of this object, i.e. trust on first use).
    randbytes : callable (default: ``os.urandom``)
        Source of the per-round session nonce.
    node_keys : callable, optional
        ``grid -> {node_id: identity public key}``: the keys the SuperLink
        authenticated each node with (deployment). When it returns any, adverts
        are verified against them (:class:`RegisteredKeyRoster`) instead of ``roster``.
    admitted : callable, optional
        ``() -> bytes``: the federation's current CA-signed admitted list, relayed to
        every client in the shares stage (a newer list than a client's replaces it, so
        revocations reach clients; an unsigned or older one is ignored by them).
    message_type, purpose : str
        Flower message type and rounding-stream purpose (``"train.secagg"`` /
        ``"train"``, or ``"evaluate.secagg"`` / ``"evaluate"``).

    """

    def __init__(
        self,
        settings: SecAggSettings,
        *,
        seed: int = 0,
        roster: Roster | None = None,
        randbytes: RandBytes = os.urandom,
        node_keys: Callable[[Grid], Mapping[int, Any]] | None = None,
        admitted: Callable[[], bytes | None] | None = None,
        message_type: str = MESSAGE_TYPE,
        purpose: str = "train",
    ) -> None:
        #: Flower message type of the exchange.
        self.message_type = message_type
        #: What the rounding streams are derived for (train and evaluate never share one).
        self.purpose = purpose
        self.settings = settings
        self.seed = seed
        self.roster: Roster = roster if roster is not None else PinnedRoster({})
        self.randbytes = randbytes
        self.node_keys = node_keys
        #: The federation's current signed admitted list, relayed to clients (deployment).
        self.admitted = admitted
        #: Attempts started per round: a retried round is a new attempt (fresh session).
        self._attempts: dict[int, int] = {}
        #: Total weight of the last exchange that unmasked (public: the server learns it).
        self.last_weight: int | None = None

    # -- plumbing -------------------------------------------------------------------
    def _exchange(
        self,
        grid: Grid,
        msgs: Sequence[Message],
        stage: str,
        timeout: float,
        server_round: int,
        observer: Progress,
        rejected: list[Rejection],
        on_reply: Callable[[int, Message], None] | None = None,
        needed: int = 0,
    ) -> dict[int, Message]:
        """Send; collect valid replies by node until the deadline; reject the rest.

        With ``on_reply`` each valid reply is handed over as it arrives and not
        kept (the masked vectors are summed in a streaming fashion). Once error
        replies leave fewer than ``needed`` clients that could still answer, it stops
        waiting (logged, with the counts), takes what the pending clients answer within
        a second, and returns: the protocol step that follows refuses fewer than
        ``needed`` clients, so the attempt ends without waiting out the stage's deadline
        for a stalled client (the clients still pending are not blamed).
        """
        # the masked stage is the round's training or evaluation itself ("round 3/20 evaluate")
        label = self.purpose if stage == STAGE_MASKED else stage
        observer.stage_started(server_round, label, len(msgs))
        t0 = time.perf_counter()
        expected = {m.metadata.dst_node_id for m in msgs}
        seen: set[int] = set()
        out: dict[int, Message] = {}
        valid = 0
        replies = grid.send_and_receive(msgs, timeout=timeout)
        # the SuperLink answers for a node that went away (src = the SuperLink itself)
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() and node not in expected:
                node = dst_of.get(reply.metadata.reply_to_message_id, node)
            observer.reply_received(server_round, label)
            if node not in expected or node in seen:
                continue
            seen.add(node)
            if reply.has_error():
                reason = f"client error: {_client_reason(reply.error.reason)}"
                rejected.append(Rejection(node, stage, reason))
                pending = len(expected - seen)
                if pending and valid + pending < needed:
                    getattr(replies, "close", lambda: None)()
                    log.warning(
                        "round %d: %s stage: %d of %d client(s) failed, so at most %d could "
                        "still answer and at least %d are needed: ending this attempt now "
                        "instead of waiting out the stage's deadline (%g s)",
                        server_round,
                        stage,
                        len(seen) - valid,
                        len(msgs),
                        valid + pending,
                        needed,
                        timeout,
                    )
                    late = self._late_replies(grid, msgs, expected - seen)
                    for late_node, late_reply in late.items():
                        seen.add(late_node)
                        if late_reply.has_error():
                            why = f"client error: {_client_reason(late_reply.error.reason)}"
                            rejected.append(Rejection(late_node, stage, why))
                        elif on_reply is None:
                            out[late_node] = late_reply
                        else:
                            on_reply(late_node, late_reply)
                    return out  # the protocol step that follows fails with < 3 clients
                continue
            valid += 1
            if on_reply is None:
                out[node] = reply
            else:
                on_reply(node, reply)
        for node in sorted(expected - seen):
            rejected.append(Rejection(node, stage, f"no reply within {timeout:g} s"))
        log.debug(
            "round %d: %s: %d/%d replies in %.3f s",
            server_round,
            stage,
            len(seen),
            len(msgs),
            time.perf_counter() - t0,
        )
        return out

    @staticmethod
    def _late_replies(
        grid: Grid, msgs: Sequence[Message], pending: set[int], grace: float = 1.0
    ) -> dict[int, Message]:
        """The replies of ``pending`` nodes that arrive within ``grace`` s, by node.

        An attempt that can no longer complete does not wait for stalled clients, but
        what the others answer at about the same moment (their reasons, a reply the
        protocol step then refuses) is still recorded.
        """
        ids = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        want = {i for i, node in ids.items() if i and node in pending}
        deadline = time.monotonic() + grace
        out: dict[int, Message] = {}
        while want and time.monotonic() < deadline:
            for reply in grid.pull_messages(sorted(want)):
                mid = reply.metadata.reply_to_message_id
                if mid in want:
                    want.discard(mid)
                    out[ids[mid]] = reply
            if want:
                time.sleep(0.02)
        return dict(sorted(out.items()))

    def _message(
        self, node: int, server_round: int, fields: dict[str, object], **records: object
    ) -> Message:
        content = RecordDict({SECAGG: ConfigRecord(fields), **records})  # type: ignore[arg-type]
        return Message(
            content=content,
            dst_node_id=node,
            message_type=self.message_type,
            group_id=str(server_round),
        )

    @staticmethod
    def _parse(
        replies: dict[int, Message],
        stage: str,
        parse: Callable[[ConfigRecord, Message], object],
        rejected: list[Rejection],
    ) -> dict[int, object]:
        out: dict[int, object] = {}
        for node, msg in replies.items():
            rec = msg.content.config_records.get(SECAGG)
            try:
                if rec is None:
                    raise SecureAggregationError(f"reply has no '{SECAGG}' ConfigRecord")
                out[node] = parse(rec, msg)
            except (
                SecureAggregationError,
                KeyError,
                TypeError,
                ValueError,
                AggregationError,
            ) as exc:
                rejected.append(Rejection(node, stage, f"malformed reply: {exc}"))
        return out

    # -- one secure sum ---------------------------------------------------------------
    def secure_sum(
        self,
        grid: Grid,
        records: dict[int, dict[str, object]],
        d: int,
        metric_keys: tuple[str, ...],
        server_round: int,
        timeout: float,
        observer: Progress,
        rejected: list[Rejection],
        *,
        summed: tuple[str, ...] = (),
    ) -> tuple[Decoded, int]:
        """Run the five exchanges over ``records`` (what each node gets in the masked stage).

        Returns the decoded sums and the number of counted clients; raises
        ``SecureAggregationError``/``_Failed`` when the round cannot complete.
        """
        s = self.settings
        nodes = sorted(records)
        if len(nodes) < 3:
            raise _Failed(
                f"{len(nodes)} client(s) sampled; secure aggregation needs at least 3 "
                "(raise the strategy's fraction / minimum of clients, or connect more clients)"
            )
        k, t = resolve(len(nodes), s.neighbours, s.threshold)
        attempt = self._attempts.get(server_round, 0)
        self._attempts[server_round] = attempt + 1
        params = RoundParams(
            binding=RoundBinding(int(grid.run.run_id), server_round, self.randbytes(16)),
            threshold=t,
            quantizer=s.quantizer(len(nodes), self.last_weight),
            metric_keys=metric_keys,
            rounding_seed=derive_seed(self.seed, "secagg-rounding", self.purpose),
            neighbours=k,
            attempt=attempt,
        )
        roster = self.roster
        registered = self.node_keys(grid) if self.node_keys is not None else {}
        if registered:
            roster = RegisteredKeyRoster(registered)
        server = ServerRound(
            params,
            nodes,
            d + extra_coordinates(len(metric_keys)),
            roster,
            threads=min(4, os.cpu_count() or 1),
        )
        common = params.to_dict()
        admitted = self.admitted() if self.admitted is not None else None

        # 1 keys
        replies = self._exchange(
            grid,
            [self._message(u, server_round, {**common, "stage": STAGE_KEYS}) for u in nodes],
            STAGE_KEYS,
            s.stage_timeout,
            server_round,
            observer,
            rejected,
            needed=max(3, t + 1),  # what collect_adverts needs
        )
        adverts = self._parse(
            replies, STAGE_KEYS, lambda r, _: Advert.from_bytes(r["advert"]), rejected
        )
        try:
            listing, bundles = server.collect_adverts(adverts)  # type: ignore[arg-type]
        finally:
            rejected += server.rejected
            server.rejected.clear()

        # 2 shares (the graph is fixed by the listing of the adverts just collected)
        ident = {"server-round": server_round, "session": params.binding.session}
        listing_ids = pack_ids(v for v, _ in listing)
        listing_digests = [dg for _, dg in listing]
        replies = self._exchange(
            grid,
            [
                self._message(
                    u,
                    server_round,
                    {
                        **ident,
                        "stage": STAGE_SHARES,
                        "listing-ids": listing_ids,
                        "listing-digests": listing_digests,
                        "adverts": [a.to_bytes() for a in bundle],
                        **({"admitted-list": admitted} if admitted else {}),
                    },
                )
                for u, bundle in bundles.items()
            ],
            STAGE_SHARES,
            s.stage_timeout,
            server_round,
            observer,
            rejected,
            needed=3,  # the survivors are a subset of these; survivor_set needs 3
        )

        def parse_boxes(rec: ConfigRecord, _: Message) -> dict[int, bytes]:
            dst, boxes = unpack_ids(rec["dst"]), list(rec["boxes"])  # type: ignore[arg-type]
            if len(dst) != len(boxes):
                raise SecureAggregationError("share boxes and their receivers do not line up")
            return dict(zip(dst, boxes, strict=True))  # type: ignore[arg-type]

        boxes = self._parse(replies, STAGE_SHARES, parse_boxes, rejected)
        try:
            relay = server.collect_shares(boxes)  # type: ignore[arg-type]
        finally:
            rejected += server.rejected
            server.rejected.clear()

        # 3 masked input (the clients train here)
        stage3 = []
        contents: dict[int, bytes] = {}
        digest_cache: dict[int, bytes] = {}
        for u, inbox in relay.items():
            fields = {
                **ident,
                "stage": STAGE_MASKED,
                "src": pack_ids(inbox),
                "boxes": list(inbox.values()),
            }
            if summed:
                fields["summed"] = list(summed)
            stage3.append(self._message(u, server_round, fields, **records[u]))
            contents[u] = content_digest(records[u], cache=digest_cache)
        shares_refused = 0

        def fold(u: int, msg: Message) -> None:
            nonlocal shares_refused
            try:
                rec = msg.content.array_records.get(MASKED)
                if rec is None or list(rec.keys()) != ["y"]:
                    raise SecureAggregationError(
                        f"reply has no ArrayRecord '{MASKED}' with one array 'y'"
                    )
                server.add_masked(u, array_view(rec["y"]))
                extra = msg.content.config_records.get(SECAGG)
                if extra is not None and "rejected-shares" in extra:
                    refused = unpack_ids(extra["rejected-shares"])  # type: ignore[arg-type]
                    shares_refused += len(refused)
                    for v in refused:
                        log.warning(
                            "round %d: client %d refused the relayed share box of client %d "
                            "(failed authentication)",
                            server_round,
                            u,
                            v,
                        )
            except (SecureAggregationError, AggregationError) as exc:
                rejected.append(Rejection(u, STAGE_MASKED, f"malformed reply: {exc}"))

        self._exchange(
            grid,
            stage3,
            STAGE_MASKED,
            timeout,
            server_round,
            observer,
            rejected,
            on_reply=fold,
            needed=3,  # survivor_set needs 3 masked vectors
        )
        if any(r.stage == STAGE_MASKED and WEIGHT_OVERFLOW in r.reason for r in rejected):
            self.last_weight = None  # a client outgrew the 32-bit ring: 64 bits next round
        for v in sorted(server.dropped):
            if not any(r.node_id == v and r.stage == STAGE_MASKED for r in rejected):
                rejected.append(Rejection(v, STAGE_MASKED, "masked vector not counted"))
        survivors = server.survivor_set()

        # 4 confirm: one survivor set, signed by every survivor
        s_ids = pack_ids(survivors)
        replies = self._exchange(
            grid,
            [
                self._message(
                    u, server_round, {**ident, "stage": STAGE_CONFIRM, "survivors": s_ids}
                )
                for u in survivors
            ],
            STAGE_CONFIRM,
            s.stage_timeout,
            server_round,
            observer,
            rejected,
        )
        signatures = self._parse(
            replies, STAGE_CONFIRM, lambda r, _: bytes(r["signature"]), rejected
        )
        try:
            requests = server.collect_confirmations(signatures, contents)  # type: ignore[arg-type]
        finally:
            rejected += server.rejected
            server.rejected.clear()

        # 5 unmask
        replies = self._exchange(
            grid,
            [
                self._message(
                    u,
                    server_round,
                    {
                        **ident,
                        "stage": STAGE_UNMASK,
                        "signers": pack_ids(sigs),
                        "signatures": list(sigs.values()),
                    },
                )
                for u, sigs in requests.items()
            ],
            STAGE_UNMASK,
            s.stage_timeout,
            server_round,
            observer,
            rejected,
        )

        def parse_unmask(rec: ConfigRecord, _: Message) -> UnmaskReply:
            def pairs(ids_key: str, key: str) -> dict[int, int]:
                ids, vals = unpack_ids(rec[ids_key]), list(rec[key])  # type: ignore[arg-type]
                if len(ids) != len(vals) or any(len(v) != 32 for v in vals):  # type: ignore[arg-type]
                    raise SecureAggregationError("malformed share list")
                return {i: int.from_bytes(v, "little") for i, v in zip(ids, vals, strict=True)}  # type: ignore[arg-type]

            return UnmaskReply(pairs("b-ids", "b"), pairs("sk-ids", "sk"))

        unmask = self._parse(replies, STAGE_UNMASK, parse_unmask, rejected)
        counted = len(server.u3)
        try:
            total = server.finish(unmask)  # type: ignore[arg-type]
        finally:
            rejected += server.rejected
            server.rejected.clear()
        weight = int(total[d])
        cap = server.max_total_weight()
        if not counted <= weight <= cap:
            self.last_weight = None
            raise SecureAggregationError(
                f"the decoded total weight {weight} is outside [{counted}, {cap}] (the counted "
                "clients' number and the sum of their signed weight caps): a client declared "
                "a weight it may not; the round is discarded"
            )
        self.last_weight = weight  # exact: clients' weight caps keep it below 2^R
        decoded = decode(total, params.quantizer, len(metric_keys), counted)
        if decoded.clipped:
            log.warning(
                "round %d: %d update coordinate(s) were clipped to +-%g; raise secagg.clip if "
                "this persists",
                server_round,
                decoded.clipped,
                s.clip,
            )
        if shares_refused:
            log.warning(
                "round %d: %d relayed share box(es) were refused", server_round, shares_refused
            )
        return decoded, counted


class SecureExchange:
    """The secure exchange: SecAgg+ for training (and, optionally, federated evaluation).

    Keeps the aggregation contract of :mod:`fedcore.serverside.exchange`: ``train``
    returns an :class:`~fedcore.serverside.exchange.Aggregate` with the example-weighted
    mean update (and the mean of every record the strategy sums, e.g. SCAFFOLD's
    control-variate deltas), computed from masked vectors only; the strategy applies it
    exactly as it applies the plain exchange's. Each sampled client gets its message's
    records (model, config, whatever the strategy added) in the masked stage, trains,
    and sends ``trained - global`` (plus the summed records) masked. A round that cannot
    complete returns an aggregate with no update; the reason is logged.

    Parameters are those of :class:`_SecureSum` (shared by the training and the
    evaluation exchanges, which never share a rounding stream).
    """

    label = "secure aggregation (SecAgg+)"

    def __init__(
        self,
        settings: SecAggSettings,
        *,
        seed: int = 0,
        roster: Roster | None = None,
        randbytes: RandBytes = os.urandom,
        node_keys: Callable[[Grid], Mapping[int, Any]] | None = None,
        admitted: Callable[[], bytes | None] | None = None,
    ) -> None:
        self.settings = settings
        common: dict[str, Any] = dict(
            seed=seed, roster=roster, randbytes=randbytes, admitted=admitted
        )
        self._train = _SecureSum(settings, node_keys=node_keys, **common)
        self._evaluate = _SecureSum(
            settings,
            node_keys=node_keys,
            message_type=EVALUATE_MESSAGE_TYPE,
            purpose="evaluate",
            **common,
        )

    @property
    def last_weight(self) -> int | None:
        """Total weight of the last training exchange that unmasked (public)."""
        return self._train.last_weight

    def train(
        self,
        grid: Grid,
        messages: Sequence[Message],
        *,
        server_round: int,
        arrays: ArrayRecord,
        summed: Mapping[str, Mapping[str, ArraySpec]] | None = None,
        individual: bool = False,
        timeout: float,
        progress: Progress,
    ) -> Aggregate:
        """Run the five exchanges; the weighted mean update of the counted clients."""
        if individual:
            raise ConfigError(
                "secagg.enabled",
                True,
                "this strategy needs each client's individual update, which secure "
                "aggregation hides from the server; use a linear strategy (e.g. fedavg) "
                "or set [secagg] enabled = false",
            )
        summed = dict(summed or {})
        layout = [("", spec_of(arrays)), *sorted(summed.items())]
        d = sum(_size(spec) for _, spec in layout)
        keys = self.settings.metric_keys
        rejected: list[Rejection] = []
        try:
            decoded, counted = self._train.secure_sum(
                grid,
                _records(messages),
                d,
                keys,
                server_round,
                timeout,
                progress,
                rejected,
                summed=tuple(sorted(summed)),
            )
        except (SecureAggregationError, _Failed) as exc:
            _raise_if_no_secagg_handlers(rejected, MESSAGE_TYPE)
            log.warning(
                "round %d: secure aggregation failed, keeping the previous model: %s",
                server_round,
                exc,
            )
            return Aggregate.failed(rejected)
        parts = _split(decoded.mean, layout)
        return Aggregate(
            update=parts[""],
            total_weight=decoded.total_weight,
            num_clients=counted,
            metrics=dict(zip(keys, decoded.metrics, strict=True)),
            rejected=tuple(rejected),
            extras={name: parts[name] for name in summed},
        )

    def evaluate(
        self,
        grid: Grid,
        messages: Sequence[Message],
        *,
        server_round: int,
        timeout: float,
        progress: Progress,
    ) -> EvaluateResult:
        """Each client sends only a masked ``[n_i | n_i * eval_loss | n_i * eval_acc]``.

        The server learns the example-weighted means and the total count, not one
        client's accuracy or validation-set size.
        """
        rejected: list[Rejection] = []
        try:
            decoded, counted = self._evaluate.secure_sum(
                grid,
                _records(messages),
                0,
                EVALUATE_METRICS,
                server_round,
                timeout,
                progress,
                rejected,
            )
        except (SecureAggregationError, _Failed) as exc:
            _raise_if_no_secagg_handlers(rejected, EVALUATE_MESSAGE_TYPE)
            log.warning("round %d: secure federated evaluation failed: %s", server_round, exc)
            return EvaluateResult({}, 0, 0, tuple(rejected))
        metrics = dict(zip(EVALUATE_METRICS, decoded.metrics, strict=True))
        return EvaluateResult(metrics, counted, decoded.total_weight, tuple(rejected))


#: Metrics the secure federated evaluation averages.
EVALUATE_METRICS = ("eval_loss", "eval_acc")


def _raise_if_no_secagg_handlers(rejected: Sequence[Rejection], message_type: str) -> None:
    """A failed round whose clients all lack a ``secagg`` handler: a config error, not a retry.

    A ClientApp without fedcore's secure-aggregation handlers (Flower's stock quickstart
    one) answers every ``train.secagg`` message with Flower's "No train function
    registered with name 'secagg'"; no later round can differ, so the run stops here
    with the fix instead of failing every round.
    """
    category, _, action = message_type.partition(".")
    missing = f"No {category} function registered with name '{action}'"
    answered = [r for r in rejected if r.stage == STAGE_KEYS and "no reply within" not in r.reason]
    if not answered or not all(missing in r.reason for r in answered):
        return
    raise ConfigError(
        "secagg.enabled",
        True,
        f'{len(answered)} client(s) answered the secure-aggregation round with "{missing}": '
        "their ClientApp has no SecAgg+ handlers (a stock Flower ClientApp has none); set "
        "[secagg] enabled = false to run ClientApps that have no SecAgg+ handlers, or "
        'register fedcore\'s (clients/app.py: @app.train("secagg"), see docs/engines.md)',
    )


def _size(spec: Mapping[str, ArraySpec]) -> int:
    return sum(int(np.prod(s.shape, dtype=np.int64)) for s in spec.values())


def _records(msgs: Sequence[Message]) -> dict[int, dict[str, object]]:
    """What each sampled node receives in the masked stage: its message's records."""
    return {m.metadata.dst_node_id: dict(m.content.items()) for m in msgs}


def _split(
    mean: np.ndarray, layout: Sequence[tuple[str, Mapping[str, ArraySpec]]]
) -> dict[str, dict[str, np.ndarray]]:
    """Cut the decoded mean vector back into named arrays (float64).

    The layout is the model's arrays in name order, then each summed record's arrays
    in name order (records sorted by name), exactly as the clients encode it, whatever
    order a record lists its arrays in.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    offset = 0
    for record, spec in layout:
        arrays: dict[str, np.ndarray] = {}
        for name in sorted(spec):
            size = int(np.prod(spec[name].shape, dtype=np.int64))
            arrays[name] = mean[offset : offset + size].reshape(spec[name].shape)
            offset += size
        out[record] = arrays
    return out
