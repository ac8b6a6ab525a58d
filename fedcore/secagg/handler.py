"""ClientApp side of secure aggregation: the ``train.secagg`` handler.

Bell et al., CCS 2020 (SecAgg+); Bonawitz et al., CCS 2017.

The server drives five exchanges, all ``message_type = "train.secagg"``, the
stage named in the ``"secagg"`` ConfigRecord (see
:mod:`fedcore.secagg.protocol.machine`). Between exchanges the client keeps its round
secrets in its own ``Context.state`` (record ``"fedcore.secagg"``), which
Flower keeps on the node on every engine; nothing secret is ever put in a
reply. In the masked-input exchange the handler runs the ordinary training
handler, turns ``trained - global`` and ``num-examples`` into the ring vector
of :mod:`fedcore.secagg.protocol.quantize` and masks it; the reply carries no plaintext
weight, update or per-client metric.

What the client decides, never the server: its limits (``secagg.min-neighbours``,
``secagg.min-threshold``, ``secagg.max-weight`` from its own config,
:func:`fedcore.clientside.policy.local_config`), which peers it accepts (its
roster), and how often it masks: one attempt per session (a repeated keys message
is refused), and a replay guard in its persistent state counts its attempts at each
round, so a retried or resumed round trains with fresh randomness (the attempt
number goes to the training handler as ``config["attempt"]``; attempt 0 is the
plain run's randomness, so a first attempt matches it) and a second secure
evaluation of one round is refused (its metrics would not change, so two sums over
different sets would reveal them).

Identity and peers: :mod:`fedcore.secagg.identities` (the kit's key and the
federation's CA-signed admitted list in deployment, node ids pinned to keys both ways;
a CSPRNG key and trust on first use in simulation). The server relays the current
signed list in the shares stage; a newer one than the client's replaces it, so
revocations reach clients.

Register it on any ClientApp::

    app = ClientApp()
    app.train("secagg")(secagg_handler(train=my_train_handler))
    app.evaluate("secagg")(secagg_handler(evaluate=my_evaluate_handler))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcore.clientside.policy import local_config
from fedcore.clientside.state import ClientState
from fedcore.core.aggregation import array_view, numpy_to_array
from fedcore.core.errors import SecureAggregationError
from fedcore.core.records import ARRAYS, ATTEMPT, CONFIG, METRICS, NUM_EXAMPLES
from fedcore.secagg.identities import STATE, identity_for, roster_for
from fedcore.secagg.protocol.machine import (
    STAGE_CONFIRM,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    Advert,
    ClientLimits,
    ClientRound,
    RoundParams,
)
from fedcore.secagg.protocol.quantize import encode
from fedcore.secagg.protocol.wire import MASKED, SECAGG, content_digest, pack_ids, unpack_ids

__all__ = [
    "MASKED",
    "SECAGG",
    "STATE",
    "handle_secagg",
    "pack_ids",
    "secagg_handler",
    "unpack_ids",
]

#: Record in ``Context.state`` holding this client's secrets between stages (the same
#: record :mod:`fedcore.secagg.identities` keeps its pins and admitted list in).
TrainHandler = Callable[[Message, Context], Message]


def _record(context: Context) -> ConfigRecord:
    rec = context.state.config_records.get(STATE)
    if rec is None:
        rec = ConfigRecord()
        context.state[STATE] = rec
    return rec


def _load_round(context: Context, fields: Mapping[str, Any], slot: str) -> ClientRound:
    raw = _record(context).get(slot)
    if not isinstance(raw, str):
        raise SecureAggregationError(
            "no secure-aggregation round in progress on this node (it restarted, or the "
            "keys stage never reached it)"
        )
    cr = ClientRound.from_json(raw)
    b = cr.params.binding
    if (
        int(fields.get("server-round", -1)) != b.server_round
        or bytes(fields.get("session", b"")) != b.session
    ):
        raise SecureAggregationError(
            f"message for round {fields.get('server-round')} does not match this node's "
            f"round in progress ({b.server_round}, another session)"
        )
    return cr


def _save_round(context: Context, cr: ClientRound, slot: str) -> None:
    _record(context)[slot] = cr.to_json()


def _reply(msg: Message, fields: dict[str, Any], **records: Any) -> Message:
    content = RecordDict({SECAGG: ConfigRecord(fields), **records})
    return Message(content, reply_to=msg)


def _update_pairs(
    global_arrays: ArrayRecord, trained: ArrayRecord
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(trained, global)`` views per array, in name order (no copies).

    Name order is the vector layout on both sides, whatever order a record lists
    its arrays in (a model restored from a checkpoint may list them differently),
    so each coordinate always meets the same rounding stream: same seed, same model.
    """
    if set(trained.keys()) != set(global_arrays.keys()):
        raise SecureAggregationError(
            f"trained arrays {list(trained.keys())} differ from the model's "
            f"{list(global_arrays.keys())}"
        )
    pairs = []
    for name in sorted(global_arrays.keys()):
        g, t = array_view(global_arrays[name]), array_view(trained[name])
        if g.shape != t.shape:
            raise SecureAggregationError(
                f"array '{name}' is {t.shape} after training, {g.shape} before"
            )
        pairs.append((t, g))
    return pairs


def _summed_pairs(result: Message, names: list[Any]) -> list[tuple[np.ndarray, None]]:
    """The records the strategy sums beside the update, in the agreed layout.

    Records in the order the server listed them (sorted by name), each record's arrays
    in name order; each is a difference already (e.g. SCAFFOLD's control-variate delta).
    """
    pairs: list[tuple[np.ndarray, None]] = []
    for name in names:
        rec = result.content.array_records.get(str(name))
        if rec is None:
            raise SecureAggregationError(
                f"the strategy sums record '{name}', which the training reply lacks"
            )
        pairs.extend((array_view(rec[k]), None) for k in sorted(rec.keys()))
    return pairs


def _weight_and_metrics(
    reply: Message, keys: tuple[str, ...], what: str
) -> tuple[int, list[float]]:
    if reply.has_error():
        raise SecureAggregationError(f"local {what} failed: {reply.error.reason}")
    metrics = reply.content.metric_records.get(METRICS)
    n = metrics.get(NUM_EXAMPLES) if metrics is not None else None
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise SecureAggregationError(f"{what} reply has no positive integer '{NUM_EXAMPLES}'")
    values = []
    for key in keys:
        if key not in metrics:  # type: ignore[operator]
            raise SecureAggregationError(f"{what} reply lacks metric '{key}'")
        values.append(float(metrics[key]))  # type: ignore[index, arg-type]
    return n, values


def _limits(context: Context) -> ClientLimits:
    sa = local_config(context).secagg
    return ClientLimits(sa.min_neighbours, sa.min_threshold, sa.max_weight)


#: Client-state item of the replay guard: how often this client masked at each round.
GUARD = "secagg-guard-{}"


def _attempts(state: ClientState, category: str) -> dict[int, int]:
    """``{round: attempts}`` this client has masked for (its own persistent record)."""
    name = GUARD.format(category)
    versions = state.versions(name)
    if not versions:
        return {}
    arrays = state.load(name, max(versions) + 1) or {}
    rounds, counts = arrays.get("rounds"), arrays.get("counts")
    if rounds is None or counts is None:
        return {}
    return {int(r): int(c) for r, c in zip(rounds.tolist(), counts.tolist(), strict=True)}


def _record_attempt(
    state: ClientState, category: str, attempts: dict[int, int], server_round: int
) -> None:
    done = dict(attempts)
    done[server_round] = done.get(server_round, 0) + 1
    rounds = sorted(done)
    state.save(
        GUARD.format(category),
        max(rounds[-1], max(state.versions(GUARD.format(category)), default=0)),
        {
            "rounds": np.asarray(rounds, dtype=np.int64),
            "counts": np.asarray([done[r] for r in rounds], dtype=np.int64),
        },
    )


def _with_attempt(content: RecordDict, attempt: int) -> RecordDict:
    """The records as the training handler sees them: ``config["attempt"]`` is this client's."""
    conf = content.config_records.get(CONFIG)
    items = dict(conf.items()) if conf is not None else {}
    items[ATTEMPT] = attempt
    return RecordDict({**dict(content.items()), CONFIG: ConfigRecord(items)})


def handle_secagg(
    msg: Message,
    context: Context,
    *,
    train: TrainHandler | None = None,
    evaluate: TrainHandler | None = None,
) -> Message:
    """One stage of a secure exchange for this node.

    ``train.secagg`` messages run ``train`` (the plain training handler) in the
    masked stage and mask ``trained - global``; ``evaluate.secagg`` messages run
    ``evaluate`` and mask only its weighted metrics.
    """
    fields = msg.content.config_records.get(SECAGG)
    category = msg.metadata.message_type.split(".")[0]
    if fields is None:
        raise SecureAggregationError(f"a {category}.secagg message needs a '{SECAGG}' ConfigRecord")
    handler = train if category == "train" else evaluate if category == "evaluate" else None
    if handler is None:
        raise SecureAggregationError(f"no handler for secure {category!r} messages on this client")
    slot = f"round-{category}"
    stage = str(fields.get("stage", ""))
    node = int(context.node_id)

    if stage == STAGE_KEYS:
        params = RoundParams.from_dict(fields)
        if params.binding.run_id != int(context.run_id):
            raise SecureAggregationError(
                f"keys stage for run {params.binding.run_id}, but this node is in run "
                f"{context.run_id}"
            )
        rec = _record(context)
        sessions = list(json.loads(str(rec.get("sessions", "[]"))))
        if params.binding.session.hex() in sessions:
            raise SecureAggregationError(
                f"round {params.binding.server_round}: a second keys message for the same "
                "attempt (session): refusing to restart it (replay)"
            )
        cr, advert = ClientRound.start(node, params, identity_for(context), limits=_limits(context))
        # the sessions this node started (newest last; a session is 16 random bytes)
        rec["sessions"] = json.dumps([*sessions, params.binding.session.hex()][-1024:])
        rec[f"{slot}-advert"] = advert.to_bytes()
        _save_round(context, cr, slot)
        return _reply(msg, {"advert": advert.to_bytes()})

    cr = _load_round(context, fields, slot)
    if stage == STAGE_SHARES:
        admitted = fields.get("admitted-list")
        roster, save = roster_for(
            context, admitted_update=bytes(admitted) if isinstance(admitted, bytes) else None
        )
        ids = unpack_ids(fields.get("listing-ids", b""))
        digests = [bytes(d) for d in fields.get("listing-digests", [])]
        if len(ids) != len(digests):
            raise SecureAggregationError("the advert listing's ids and digests do not line up")
        adverts = [Advert.from_bytes(b) for b in fields.get("adverts", [])]
        own = Advert.from_bytes(bytes(_record(context)[f"{slot}-advert"]))  # type: ignore[arg-type]
        boxes = cr.share(list(zip(ids, digests, strict=True)), adverts, own, roster)
        save()  # the pins (node id <-> key) and a newer admitted list, once verified
        _save_round(context, cr, slot)
        return _reply(msg, {"dst": pack_ids(boxes), "boxes": list(boxes.values())})

    if stage == STAGE_MASKED:
        sources = unpack_ids(fields.get("src", b""))
        boxes = list(fields.get("boxes", []))
        if len(sources) != len(boxes):
            raise SecureAggregationError("relayed share boxes and their senders do not line up")
        rejected = cr.receive_shares(dict(zip(sources, boxes, strict=True)))
        state = ClientState.of(context)
        server_round = cr.params.binding.server_round
        attempts = _attempts(state, category)
        attempt = attempts.get(server_round, 0)
        if category == "evaluate" and attempt > 0:
            raise SecureAggregationError(
                f"round {server_round}: this client already answered a secure evaluation of "
                "this round; a second one over another set would reveal its metrics (replay)"
            )
        _record_attempt(state, category, attempts, server_round)  # before anything leaves
        original = msg.content
        digest = content_digest(dict(original.items()))
        if category == "train":
            msg.content = _with_attempt(original, attempt)
        try:
            result = handler(msg, context)
        finally:
            msg.content = original
        n, values = _weight_and_metrics(result, cr.params.metric_keys, category)
        cr.check_weight(n)
        update: Any = np.zeros(0)
        if category == "train":
            update = _update_pairs(
                msg.content.array_records[ARRAYS], result.content.array_records[ARRAYS]
            ) + _summed_pairs(result, list(fields.get("summed", [])))
        encoded = encode(update, n, values, cr.params.quantizer, cr.params.rounding_key(node))
        masked = cr.mask(encoded, digest)
        _save_round(context, cr, slot)
        return _reply(
            msg,
            {"rejected-shares": pack_ids(rejected)},
            **{MASKED: ArrayRecord({"y": numpy_to_array(masked)})},
        )

    if stage == STAGE_CONFIRM:
        signature = cr.confirm(unpack_ids(fields.get("survivors", b"")), identity_for(context))
        _save_round(context, cr, slot)
        return _reply(msg, {"signature": signature})

    if stage == STAGE_UNMASK:
        signers = unpack_ids(fields.get("signers", b""))
        signatures = [bytes(v) for v in fields.get("signatures", [])]
        if len(signers) != len(signatures):
            raise SecureAggregationError("confirmations and their signers do not line up")
        roster, _ = roster_for(context)
        reply = cr.unmask(dict(zip(signers, signatures, strict=True)), roster)
        _save_round(context, cr, slot)
        return _reply(
            msg,
            {
                "b-ids": pack_ids(reply.b_shares),
                "b": [v.to_bytes(32, "little") for v in reply.b_shares.values()],
                "sk-ids": pack_ids(reply.sk_shares),
                "sk": [v.to_bytes(32, "little") for v in reply.sk_shares.values()],
            },
        )
    raise SecureAggregationError(f"unknown secure-aggregation stage {stage!r}")


def secagg_handler(
    train: TrainHandler | None = None, evaluate: TrainHandler | None = None
) -> TrainHandler:
    """Wrap plain handlers into a ``train.secagg`` / ``evaluate.secagg`` handler."""

    def handler(msg: Message, context: Context) -> Message:
        return handle_secagg(msg, context, train=train, evaluate=evaluate)

    return handler
