"""Packed arrays on the wire (fedcore.core.packing): bit-exact, in order, hostile blobs refused."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from fedcore.clientside.models import cnn
from fedcore.clientside.wire import packed_arrays_mod
from fedcore.core.aggregation import numpy_to_array
from fedcore.core.packing import (
    INLINE_MAX_BYTES,
    PACKED_KEY,
    PACKED_STYPE,
    PackingError,
    pack_content,
    unpack_content,
)
from fedcore.engines.polling import PollingGrid


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


def _record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {
            "z.weight": numpy_to_array(rng.standard_normal((3, 4)).astype(np.float32)),
            "a.half": numpy_to_array(rng.standard_normal(5).astype(np.float16)),
            "m.double": numpy_to_array(rng.standard_normal((2, 1, 2))),
            "count": numpy_to_array(np.array(7, dtype=np.int64)),  # 0-d
            "mask": numpy_to_array(np.array([True, False])),
            "empty": numpy_to_array(np.zeros((0, 3), dtype=np.float32)),
            "u8": numpy_to_array(np.arange(4, dtype=np.uint8)),
        }
    )


def _blob(arrays: dict[str, np.ndarray], order: Any) -> RecordDict:
    meta = {"fedcore.order": order if isinstance(order, str) else json.dumps(order)}
    blob = safetensors.numpy.save(arrays, metadata=meta)
    return _packed(blob)


def _packed(blob: bytes) -> RecordDict:
    arr = Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
    return RecordDict({"arrays": ArrayRecord({PACKED_KEY: arr})})


def test_round_trip_is_bit_exact_in_the_records_order() -> None:
    rec = _record()
    content = RecordDict({"arrays": rec, "config": ConfigRecord({"lr": 0.1})})
    packed = pack_content(content)
    assert list(packed["arrays"].keys()) == [PACKED_KEY]
    assert packed["config"] is content["config"]  # other records travel as they are
    back, was_packed = unpack_content(packed)
    assert was_packed
    assert list(back.keys()) == ["arrays", "config"]
    assert list(back["arrays"].keys()) == list(rec.keys())  # not safetensors' sorted order
    for name, arr in rec.items():
        got = back["arrays"][name]
        assert (got.data, got.dtype, got.shape) == (arr.data, arr.dtype, arr.shape), name


def test_what_is_not_worth_or_able_to_pack_is_left_alone() -> None:
    big = np.ones(INLINE_MAX_BYTES // 4 + 1, np.float32)
    one = RecordDict({"arrays": ArrayRecord({"w": Array(big)})})
    assert pack_content(one) is one  # a single large array: as many objects either way
    odd = Array(dtype="float32", shape=(1,), stype="torch.raw", data=b"\x00" * 4)
    foreign = RecordDict({"arrays": ArrayRecord({"w": odd, "b": odd})})
    assert pack_content(foreign) is foreign  # not .npy payloads: sent as Flower would
    metrics = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    assert pack_content(metrics) is metrics
    assert unpack_content(metrics) == (metrics, False)


def test_a_small_record_travels_inline_and_a_large_one_as_a_chunked_array() -> None:
    small = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))})})
    inline = pack_content(small)
    assert isinstance(inline["arrays"], ConfigRecord)  # one object instead of three
    assert list(inline["arrays"].keys()) == [PACKED_KEY]
    half = INLINE_MAX_BYTES // 8 + 1  # two float32 arrays: a blob just over the bound
    rec = ArrayRecord({k: Array(np.full(half, i, np.float32)) for i, k in enumerate("ab")})
    large = pack_content(RecordDict({"arrays": rec}))
    assert isinstance(large["arrays"], ArrayRecord)
    assert large["arrays"][PACKED_KEY].stype == PACKED_STYPE
    for packed, original in ((inline, small["arrays"]), (large, rec)):
        back, was_packed = unpack_content(packed)
        assert was_packed
        assert [a.data for a in back["arrays"].values()] == [a.data for a in original.values()]


def test_the_default_cnn_message_is_4_objects_instead_of_20() -> None:
    model = cnn(input_shape=(1, 8, 8), num_classes=10)
    rec = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    content = RecordDict({"arrays": rec, "config": ConfigRecord({"lr": 0.1})})
    plain = Message(content, dst_node_id=5, message_type="train")
    packed = Message(pack_content(content), dst_node_id=5, message_type="train")
    assert len(get_all_nested_objects(plain)) == 20
    assert len(get_all_nested_objects(packed)) == 4  # message, dict, packed arrays, config


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            lambda: _packed(b"\xff" * 8 + b"{}"),
            "malformed packed arrays",
        ),  # header longer than blob
        (lambda: _packed(b""), "malformed packed arrays"),
        (lambda: _packed(b"\x02\x00\x00\x00\x00\x00\x00\x00{}"), "malformed packed arrays"),
        (lambda: _blob({"w": np.ones(2, np.float32)}, "not json"), "malformed packed arrays"),
        (lambda: _blob({"w": np.ones(2, np.float32)}, ["w", "w"]), "once each"),
        (lambda: _blob({"w": np.ones(2, np.float32)}, ["v"]), "once each"),
        (lambda: _blob({"w": np.ones(2, np.float32)}, [1]), "once each"),
        (lambda: _blob({"w": np.ones(2, np.float32)}, {"w": 0}), "once each"),
    ],
)
def test_malformed_packed_records_are_refused(content: Any, match: str) -> None:
    with pytest.raises(PackingError, match=match):
        unpack_content(content())


def test_a_blob_whose_offsets_overrun_or_overlap_is_refused() -> None:
    good = safetensors.numpy.save(
        {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)},
        metadata={"fedcore.order": '["a", "b"]'},
    )
    size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + size])
    for offsets in ([0, 16], [0, 4], [4, 12]):  # past the end, too short, overlapping "a"
        header["b"]["data_offsets"] = offsets
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        bad = len(text).to_bytes(8, "little") + text + good[8 + size :]
        with pytest.raises(PackingError, match="malformed"):
            unpack_content(_packed(bad))


@pytest.mark.parametrize(
    "record",
    [
        lambda blob: ConfigRecord({PACKED_KEY: blob, "x": 1}),  # another key beside it
        lambda blob: ConfigRecord({PACKED_KEY: "not bytes"}),
        lambda blob: ConfigRecord({PACKED_KEY: [blob, blob]}),
        lambda blob: ConfigRecord({PACKED_KEY: b"garbage!"}),
    ],
)
def test_a_malformed_inline_packed_record_is_refused(record: Any) -> None:
    blob = safetensors.numpy.save(
        {"w": np.ones(2, np.float32)}, metadata={"fedcore.order": '["w"]'}
    )
    unpack_content(RecordDict({"arrays": ConfigRecord({PACKED_KEY: blob})}))  # the good one
    with pytest.raises(PackingError, match="exactly one|malformed"):
        unpack_content(RecordDict({"arrays": record(blob)}))


def test_a_packed_record_with_other_keys_or_stype_is_refused() -> None:
    blob = _blob({"w": np.ones(2, np.float32)}, ["w"])["arrays"][PACKED_KEY]
    extra = RecordDict({"arrays": ArrayRecord({PACKED_KEY: blob, "x": blob})})
    with pytest.raises(PackingError, match="exactly one"):
        unpack_content(extra)
    wrong = Array(dtype="uint8", shape=blob.shape, stype="numpy.ndarray", data=blob.data)
    with pytest.raises(PackingError, match="stype"):
        unpack_content(RecordDict({"arrays": ArrayRecord({PACKED_KEY: wrong})}))


class _Inner:
    """Records what was pushed; answers each message with ``reply(message)``."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.seen: list[RecordDict] = []
        self.pushed: list[Message] = []

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        self.seen = [m.content for m in self.pushed]
        for i, m in enumerate(self.pushed):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids: Any) -> list[Message]:
        out = []
        for i, m in enumerate(self.pushed):
            r = Message(self.reply(m), reply_to=m)
            r.metadata.__dict__["_reply_to_message_id"] = f"m{i}"
            out.append(r)
        return out


def test_polling_grid_packs_what_it_pushes_and_unpacks_what_it_pulls() -> None:
    rec = _record()
    content = RecordDict({"arrays": rec, "config": ConfigRecord({"lr": 0.1})})
    messages = [Message(content, dst_node_id=10 + i, message_type="train") for i in range(3)]
    inner = _Inner(lambda m: RecordDict({"arrays": m.content["arrays"]}))  # echo, packed
    grid = PollingGrid(inner, interval=0.001, pack=True)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(messages, timeout=5))
    assert all(list(c["arrays"].keys()) == [PACKED_KEY] for c in inner.seen)
    assert inner.seen[0] is inner.seen[1] is inner.seen[2]  # one content, packed once
    assert all(m.content is content for m in messages)  # the caller's messages unchanged
    assert len(replies) == 3
    for reply in replies:
        assert [a.data for a in reply.content["arrays"].values()] == [a.data for a in rec.values()]


def test_polling_grid_turns_a_malformed_packed_reply_into_its_clients_error() -> None:
    messages = [Message(RecordDict({"arrays": _record()}), dst_node_id=10, message_type="train")]
    inner = _Inner(lambda m: _packed(b"garbage!"))
    grid = PollingGrid(inner, interval=0.001, pack=True)  # type: ignore[arg-type]
    (reply,) = grid.send_and_receive(messages, timeout=5)
    assert reply.has_error() and not reply.has_content()
    assert "malformed reply: malformed packed arrays" in reply.error.reason
    assert reply.metadata.src_node_id == messages[0].metadata.dst_node_id  # still its client's


def test_without_pack_the_grid_sends_records_as_they_are() -> None:
    rec = _record()
    inner = _Inner(lambda m: m.content)
    grid = PollingGrid(inner, interval=0.001)  # type: ignore[arg-type]
    list(
        grid.send_and_receive(
            [Message(RecordDict({"arrays": rec}), dst_node_id=1, message_type="train")], timeout=5
        )
    )
    assert inner.seen[0]["arrays"] is rec


def test_the_clientapp_mod_unpacks_for_the_handler_and_packs_the_reply() -> None:
    rec = _record()
    seen: list[list[str]] = []

    def handler(msg: Message, context: Any) -> Message:
        seen.append(list(msg.content["arrays"].keys()))
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    packed = Message(pack_content(RecordDict({"arrays": rec})), dst_node_id=5, message_type="train")
    reply = packed_arrays_mod(packed, None, handler)  # type: ignore[arg-type]
    assert seen == [list(rec.keys())]
    assert list(reply.content["arrays"].keys()) == [PACKED_KEY]
    plain = Message(RecordDict({"arrays": rec}), dst_node_id=5, message_type="train")
    reply = packed_arrays_mod(plain, None, handler)  # type: ignore[arg-type]
    assert list(reply.content["arrays"].keys()) == list(rec.keys())  # answered as it came
