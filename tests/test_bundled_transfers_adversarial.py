"""A malicious node or ServerApp against the object parts of a bundled transfer.

The guard serves a bundle's object parts with Flower's own object handlers on the
SuperLink's state (``fedcore.flower_adapter.FleetObjects`` / ``RuntimeObjects``), not
through the app. These tests drive those classes against Flower's real in-memory
LinkState and ObjectStore, as the SuperLink builds them, and check what a sender who
controls the frames cannot get stored or pulled: content that is not its object's,
an object outside its push session or run, a run that is not running, a Runtime task
it has no token for. (Authentication of the bundle's first part is attacked on the
real SuperLink in ``tests/test_guard_polling.py``.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.server.superlink.linkstate.linkstate_factory import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.inflatable.inflatable_object import get_object_id
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.servicer.runtime import runtime_handlers

from fedcore import flower_adapter as flower

#: a real Flower object (the store reads an object's head: its kind and children)
CONTENT = ConfigRecord({"signature": b"the node's reply"}).deflate()
OID = get_object_id(CONTENT)
NODE = 7


@pytest.fixture(params=["in-memory", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What ``fedcore server`` runs by default (``--database :flwr-in-memory:``), and a file."""
    return FLWR_IN_MEMORY_DB_NAME if request.param == "in-memory" else str(tmp_path / "state.db")


def _link(database: str, *, running: bool = True) -> tuple[Any, Any, int, str]:
    """Flower's state with one run (running, or still pending): (app, state, run, token)."""
    factory = LinkStateFactory(database, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, "default", None, None, "serverapp")
    token = ""
    if running:
        task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
        token = state.claim_task(task_id)
        assert token and state.activate_task(task_id)
    app = SimpleNamespace(
        state=SimpleNamespace(
            linkstate_factory=factory,
            runtime_state_factory=factory,
            runtime_handlers=runtime_handlers,
        )
    )
    return app, state, run_id, token


def _session(state: Any, run_id: int, oid: str = OID) -> str:
    """A push session in which the SuperLink waits for object ``oid``."""
    session = state.start_session(run_id)
    assert state.preregister_object_tree(ObjectTree(object_id=oid), session) == [oid]
    return session


def _push(objects: Any, run_id: int, session: str, content: bytes, oid: str = OID) -> bool | None:
    req = PushObjectRequest(
        node=Node(node_id=NODE),
        run_id=run_id,
        object_id=oid,
        object_content=content,
        session_id=session,
    )
    got = objects.push(req.SerializeToString())
    return None if got is None else PushObjectResponse.FromString(got).stored


def _pull(objects: Any, run_id: int, node: int = NODE) -> PullObjectResponse:
    req = PullObjectRequest(node=Node(node_id=node), run_id=run_id, object_id=OID)
    got = objects.pull(req.SerializeToString())
    assert got is not None
    return PullObjectResponse.FromString(got)


def test_content_that_is_not_its_objects_is_never_stored_or_served(database: str) -> None:
    app, state, run_id, _ = _link(database)
    objects = flower.FleetObjects.of(app)
    assert objects is not None
    session = _session(state, run_id)
    assert (
        _push(objects, run_id, session, ConfigRecord({"signature": b"forged"}).deflate()) is False
    )
    got = _pull(objects, run_id)
    assert got.object_found and not got.object_available  # still waiting for the real one
    assert _push(objects, run_id, session, CONTENT) is True
    got = _pull(objects, run_id)
    assert got.object_available and got.object_content == CONTENT
    # stored once: the same id cannot be pushed again (over it) in that session
    assert (
        _push(objects, run_id, session, ConfigRecord({"signature": b"a later one"}).deflate())
        is False
    )
    assert _pull(objects, run_id).object_content == CONTENT


def test_an_object_outside_its_session_or_run_is_refused(database: str) -> None:
    app, state, run_id, _ = _link(database)
    objects = flower.FleetObjects.of(app)
    assert objects is not None
    session = _session(state, run_id)
    unasked = ConfigRecord({"x": 1}).deflate()
    assert _push(objects, run_id, session, unasked, get_object_id(unasked)) is False
    assert _push(objects, run_id, "a-session-that-does-not-exist", CONTENT) is False
    # the same session named for another run (a second running run of the same state)
    second = state.create_run(None, None, None, {}, "default", None, None, "serverapp")
    task_id = state.get_run_info(run_ids=[second])[0].primary_task_id
    assert state.claim_task(task_id) and state.activate_task(task_id)
    assert _push(objects, second, session, CONTENT) is False
    assert _push(objects, run_id, session, CONTENT) is True  # the genuine push still works


def test_a_run_that_is_not_running_gets_nothing_through_the_direct_handlers(
    database: str,
) -> None:
    """The handler's run-status check refuses (None): the guard then asks the whole app,
    whose answer is Flower's error, and nothing is stored."""
    app, state, run_id, _ = _link(database, running=False)
    objects = flower.FleetObjects.of(app)
    assert objects is not None
    session = _session(state, run_id)
    assert _push(objects, run_id, session, CONTENT) is None
    req = PullObjectRequest(node=Node(node_id=NODE), run_id=run_id, object_id=OID)
    assert objects.pull(req.SerializeToString()) is None


def test_runtime_object_handlers_need_the_tasks_one_token_and_the_superlinks_node(
    database: str,
) -> None:
    app, state, run_id, token = _link(database)
    for headers in (
        [],
        [(b"flwr-task-token", b"f" * 64)],
        [(b"flwr-task-token", token.encode()), (b"flwr-task-token", token.encode())],
        [(b"flwr-task-token", b"")],
    ):
        assert flower.RuntimeObjects.of(app, headers) is None, headers
    objects = flower.RuntimeObjects.of(app, [(b"Flwr-Task-Token", token.encode())])
    assert objects is not None
    session = _session(state, run_id)
    # a frame naming a node (the guard names the SuperLink's): Flower's handler refuses
    assert _push(objects, run_id, session, CONTENT) is None
    req = PushObjectRequest(
        node=Node(node_id=flower.SUPERLINK_NODE_ID),
        object_id=OID,
        object_content=ConfigRecord({"signature": b"forged"}).deflate(),
        session_id=session,
    )
    got = objects.push(req.SerializeToString())
    assert got is not None and not PushObjectResponse.FromString(got).stored
    req.object_content = CONTENT
    got = objects.push(req.SerializeToString())
    assert got is not None and PushObjectResponse.FromString(got).stored
    assert _pull(objects, run_id, node=flower.SUPERLINK_NODE_ID).object_content == CONTENT
