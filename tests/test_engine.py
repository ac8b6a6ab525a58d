"""The embedded engine: routing, ordering, per-client state, failures, deadlines."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedcore.engines.embedded import EmbeddedGrid, node_id_for


def _msgs(grid, config=None, nodes=None):
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config or {})})
    return [
        Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN)
        for n in (nodes or grid.get_node_ids())
    ]


@pytest.fixture(scope="module")
def grid():
    with EmbeddedGrid(
        client_app="tests.apps.echo:app", run_config={}, num_clients=5, workers=2
    ) as g:
        yield g


def test_replies_come_back_in_push_order_from_both_workers(grid):
    msgs = _msgs(grid)
    replies = list(grid.send_and_receive(msgs, timeout=60))
    assert [r.metadata.src_node_id for r in replies] == [node_id_for(p) for p in range(5)]
    assert [r.content["metrics"]["partition"] for r in replies] == [0, 1, 2, 3, 4]
    # virtual client i lives on worker i % 2: two distinct processes
    pids = [r.content["metrics"]["pid"] for r in replies]
    assert len(set(pids)) == 2 and pids[0] == pids[2] == pids[4] and pids[1] == pids[3]
    assert replies[0].content["arrays"]["w"].numpy().tolist() == [0.0, 1.0, 2.0]


def test_context_state_persists_per_client(grid):
    before = {
        r.metadata.src_node_id: r.content["metrics"]["calls"]
        for r in grid.send_and_receive(_msgs(grid), timeout=60)
    }
    after = {
        r.metadata.src_node_id: r.content["metrics"]["calls"]
        for r in grid.send_and_receive(_msgs(grid), timeout=60)
    }
    assert all(after[n] == before[n] + 1 for n in before)


def test_client_exception_becomes_error_reply(grid):
    replies = list(grid.send_and_receive(_msgs(grid, {"action-2": "raise"}), timeout=60))
    assert len(replies) == 5
    bad = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in bad] == [node_id_for(2)]
    assert "client 2 was told to fail" in bad[0].error.reason


def test_crashed_worker_is_reported_and_replaced(grid):
    replies = list(grid.send_and_receive(_msgs(grid, {"action-1": "crash"}), timeout=60))
    crashed = [r for r in replies if r.has_error()]
    assert node_id_for(1) in [r.metadata.src_node_id for r in crashed]
    assert "exited with code 3" in crashed[0].error.reason
    # the replacement worker serves the next round for every client
    replies = list(grid.send_and_receive(_msgs(grid), timeout=60))
    assert len(replies) == 5 and not any(r.has_error() for r in replies)


def test_deadline_drops_late_replies(grid):
    t0 = time.monotonic()
    replies = list(
        grid.send_and_receive(_msgs(grid, {"action-0": "sleep", "sleep": 3.0}), timeout=1.0)
    )
    assert time.monotonic() - t0 < 2.5
    # client 0 was first in push order and is late: nothing after the deadline
    assert node_id_for(0) not in [r.metadata.src_node_id for r in replies]
    time.sleep(2.5)
    # the late reply is discarded, not delivered to the next call
    replies = list(grid.send_and_receive(_msgs(grid, nodes=[node_id_for(3)]), timeout=60))
    assert [r.metadata.src_node_id for r in replies] == [node_id_for(3)]


def test_replies_in_time_count_even_behind_a_late_one(grid):
    # client 0 (worker 0) stalls; clients 1 and 3 (worker 1) answer in time and must
    # not be dropped just because they were pushed after client 0
    replies = list(
        grid.send_and_receive(_msgs(grid, {"action-0": "sleep", "sleep": 3.0}), timeout=1.5)
    )
    got = [r.metadata.src_node_id for r in replies]
    assert node_id_for(0) not in got
    assert node_id_for(1) in got and node_id_for(3) in got
    assert got == sorted(got)  # still in push order
    time.sleep(2.0)
    assert len(list(grid.send_and_receive(_msgs(grid), timeout=60))) == 5


def test_unknown_node_is_refused(grid):
    with pytest.raises(ValueError, match="unknown node id"):
        grid.push_messages(_msgs(grid, nodes=[42]))
