"""Secure aggregation over the embedded engine: real worker processes, real Flower messages.

A :class:`FaultGrid` (the embedded grid plus a man in the middle) withholds
messages to make a client vanish at a chosen stage, tells the fault-injecting
ClientApp to fail or stall, and tampers with relayed share boxes or advert
signatures on their way through the server.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedcore.core.aggregation import array_view
from fedcore.core.config import to_flat
from fedcore.core.records import model_to_arrays
from fedcore.engines.embedded import EmbeddedGrid, node_id_for
from fedcore.secagg.exchange import SecAggSettings, SecureExchange
from fedcore.secagg.protocol.machine import (
    STAGE_CONFIRM,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    Advert,
)
from fedcore.secagg.protocol.wire import SECAGG, unpack_ids
from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.rounds import Observer, RoundPolicy, run_federation
from fedcore.serverside.strategies import FedAvg, Sampling

from .exchanges import evaluate_step, train_step

pytestmark = pytest.mark.slow

CLIENTS = 6
NODES = [node_id_for(p) for p in range(CLIENTS)]
SETTINGS = SecAggSettings(stage_timeout=20.0)


class FaultGrid(EmbeddedGrid):
    """The embedded grid with a configurable man in the middle (test only)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reset()

    def reset(self):
        self.faults: dict[tuple[str, int], str] = {}
        self.tamper_out = None
        self.tamper_in = None

    def push_messages(self, messages):
        keep = []
        for m in messages:
            rec = m.content.config_records.get(SECAGG)
            action = self.faults.get((rec.get("stage") if rec else None, m.metadata.dst_node_id))
            if action == "silent":  # the client vanished: it never answers this stage
                continue
            if action:
                rec["test-fault"] = action
            if self.tamper_out is not None and rec is not None:
                self.tamper_out(m, rec)
            keep.append(m)
        return super().push_messages(keep)

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.tamper_in is None:
            return replies
        return (self.tamper_in(r) for r in replies)


@pytest.fixture(scope="module")
def setup():
    from fedcore.clientside.data import holdout
    from fedcore.core.config import config_from_dict
    from fedcore.runtime.serve import initial_model

    cfg = config_from_dict(
        {
            "run": {"seed": 7, "clients": CLIENTS, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 400, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 32}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
        }
    )
    _, test = holdout(cfg.data, seed=cfg.run.seed)
    arrays = model_to_arrays(initial_model(cfg, test))
    grid = FaultGrid(
        client_app="tests.apps.secagg_faults:app",
        run_config=to_flat(cfg),
        num_clients=CLIENTS,
        workers=2,
    )
    yield grid, arrays, cfg
    grid.close()


@pytest.fixture
def grid(setup):
    setup[0].reset()
    return setup[0]


def _train_config(cfg, attempt=None):
    conf = {"lr": cfg.train.lr, "local-epochs": 1, "batch-size": cfg.train.batch_size}
    if attempt is not None:
        conf["attempt"] = attempt
    return ConfigRecord(conf)


def _secure(grid, arrays, cfg, rnd, settings=SETTINGS, nodes=NODES, timeout=60.0, stage=None):
    stage = stage or SecureExchange(settings, seed=cfg.run.seed)
    q = stage.settings.quantizer(len(nodes), stage.last_weight)
    result = train_step(
        stage,
        grid,
        FedAvg(seed=cfg.run.seed),
        server_round=rnd,
        arrays=arrays,
        config=_train_config(cfg),
        node_ids=nodes,
        timeout=timeout,
        observer=Observer(),
    )
    return _WithQuantizer(result, q)


class _WithQuantizer:
    """A trained round's result plus the quantizer it used (for the error bound)."""

    def __init__(self, result, quantizer):
        self.result, self.quantizer = result, quantizer

    def __getattr__(self, name):
        return getattr(self.result, name)


def _plain(grid, arrays, cfg, rnd, nodes, attempt=None):
    return train_step(
        PlainExchange(accumulation_block=1),
        grid,
        FedAvg(seed=cfg.run.seed),
        server_round=rnd,
        arrays=arrays,
        config=_train_config(cfg, attempt),
        node_ids=nodes,
        timeout=60.0,
        observer=Observer(),
    )


def _max_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(
        float(np.abs(array_view(a[k]).astype(np.float64) - array_view(b[k])).max()) for k in a
    )


def _assert_equals_plain(grid, arrays, cfg, rnd, secure, counted, attempt=None):
    """The secure mean equals plain weighted FedAvg over ``counted`` within the bound."""
    plain = _plain(grid, arrays, cfg, rnd, counted, attempt)
    assert secure.num_clients == plain.num_clients == len(counted)
    assert secure.num_examples == plain.num_examples  # the total weight, recovered exactly
    bound = len(counted) * secure.quantizer.step / secure.num_examples
    assert _max_diff(secure.arrays, plain.arrays) < bound + 2e-7  # + float32 rounding of each
    assert _max_diff(secure.arrays, arrays) > 1e-3  # it did train
    assert abs(secure.metrics["train_loss"] - plain.metrics["train_loss"]) < 1e-3


def test_secure_round_equals_plain_fedavg(setup, grid):
    _, arrays, cfg = setup
    secure = _secure(grid, arrays, cfg, 1)
    assert secure.rejected == ()
    _assert_equals_plain(grid, arrays, cfg, 1, secure, NODES)


def test_second_round_switches_to_the_32_bit_ring_and_stays_exact(setup, grid):
    _, arrays, cfg = setup
    stage = SecureExchange(SETTINGS, seed=cfg.run.seed)
    first = _secure(grid, arrays, cfg, 1, stage=stage)
    assert first.quantizer.ring_bits == 64 and stage.last_weight == first.num_examples
    second = _secure(grid, arrays, cfg, 9, stage=stage)
    assert second.quantizer.ring_bits == 32 and second.quantizer.bits == first.quantizer.bits
    _assert_equals_plain(grid, arrays, cfg, 9, second, NODES)
    # a fresh stage (a resumed run) uses the 64-bit ring for the same round, and the same
    # clients train it with fresh randomness (their replay guard counts the attempt): two
    # sums of one round over different sets cannot be differenced into one client's update
    again = _secure(grid, arrays, cfg, 9)
    assert again.quantizer.ring_bits == 64
    assert not all(
        np.array_equal(array_view(again.arrays[k]), array_view(second.arrays[k])) for k in arrays
    )
    _assert_equals_plain(grid, arrays, cfg, 9, again, NODES, attempt=1)


@pytest.mark.parametrize(
    ("stage", "rnd"),
    [(STAGE_KEYS, 31), (STAGE_SHARES, 32), (STAGE_MASKED, 33), (STAGE_UNMASK, 34)],
)
def test_client_vanishing_at_each_stage(setup, grid, stage, rnd):
    _, arrays, cfg = setup
    gone = node_id_for(2)
    grid.faults[(stage, gone)] = "silent"
    secure = _secure(grid, arrays, cfg, rnd)
    assert [(r.node_id, r.stage) for r in secure.rejected] == [(gone, stage)]
    counted = NODES if stage == STAGE_UNMASK else [n for n in NODES if n != gone]
    _assert_equals_plain(grid, arrays, cfg, rnd, secure, counted)


def test_client_vanishing_before_it_confirms_fails_the_round_before_any_share(setup, grid):
    """Its neighbours cannot reveal without its signature: the server stops at once."""
    _, arrays, cfg = setup
    gone = node_id_for(2)
    grid.faults[(STAGE_CONFIRM, gone)] = "silent"
    unmask_sent = []
    grid.tamper_out = lambda m, rec: unmask_sent.append(m) if rec["stage"] == STAGE_UNMASK else None
    secure = _secure(grid, arrays, cfg, 35)
    assert secure.arrays is None and unmask_sent == []
    assert (gone, STAGE_CONFIRM) in [(r.node_id, r.stage) for r in secure.rejected]


def test_client_failing_and_stalling_past_the_deadline(setup, grid):
    _, arrays, cfg = setup
    grid.faults[(STAGE_SHARES, node_id_for(1))] = "raise"
    grid.faults[(STAGE_MASKED, node_id_for(4))] = "sleep:6"
    secure = _secure(grid, arrays, cfg, 3, timeout=3.0)
    reasons = {(r.node_id, r.stage): r.reason for r in secure.rejected}
    assert "injected fault" in reasons[(node_id_for(1), STAGE_SHARES)]
    assert "no reply within 3 s" in reasons[(node_id_for(4), STAGE_MASKED)]
    counted = [n for n in NODES if n not in (node_id_for(1), node_id_for(4))]
    _assert_equals_plain(grid, arrays, cfg, 3, secure, counted)


def test_tampered_and_replayed_share_boxes_are_refused(setup, grid, caplog):
    _, arrays, cfg = setup
    recorded: dict[int, list[bytes]] = {}

    def record(m: Message, rec: ConfigRecord):
        if rec["stage"] == STAGE_MASKED:
            recorded[m.metadata.dst_node_id] = list(rec["boxes"])

    grid.tamper_out = record
    _secure(grid, arrays, cfg, 4)

    def attack(m: Message, rec: ConfigRecord):
        if rec["stage"] != STAGE_MASKED:
            return
        boxes = list(rec["boxes"])
        if m.metadata.dst_node_id == node_id_for(0):  # flip one bit of the first box
            boxes[0] = boxes[0][:-1] + bytes([boxes[0][-1] ^ 1])
        if m.metadata.dst_node_id == node_id_for(3):  # replay last round's box
            boxes[1] = recorded[node_id_for(3)][1]
        rec["boxes"] = boxes

    grid.tamper_out = attack
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        secure = _secure(grid, arrays, cfg, 5)
    refused = [
        r.getMessage() for r in caplog.records if "refused the relayed share" in r.getMessage()
    ]
    assert len(refused) == 2
    assert any(f"client {node_id_for(0)} refused" in line for line in refused)
    assert any(f"client {node_id_for(3)} refused" in line for line in refused)
    # every client still counted: the others hold enough shares
    _assert_equals_plain(grid, arrays, cfg, 5, secure, NODES)


def test_bad_advert_signature_removes_that_client(setup, grid):
    _, arrays, cfg = setup
    liar = node_id_for(5)

    def forge(reply: Message) -> Message:
        rec = reply.content.config_records.get(SECAGG)
        if reply.metadata.src_node_id == liar and rec is not None and "advert" in rec:
            adv = Advert.from_bytes(rec["advert"])
            sig = bytes([adv.signature[0] ^ 1]) + adv.signature[1:]
            rec["advert"] = Advert(
                adv.node_id, adv.c_pk, adv.s_pk, adv.b_commit, adv.max_weight, adv.credential, sig
            ).to_bytes()
        return reply

    grid.tamper_in = forge
    secure = _secure(grid, arrays, cfg, 6)
    assert [(r.node_id, r.stage) for r in secure.rejected] == [(liar, STAGE_KEYS)]
    assert "signature" in secure.rejected[0].reason
    _assert_equals_plain(grid, arrays, cfg, 6, secure, [n for n in NODES if n != liar])


def test_clients_refuse_a_server_that_swaps_a_key(setup, grid):
    """A server that substitutes its own mask key for 5's (keeping 5's signature)."""
    _, arrays, cfg = setup
    victim = node_id_for(5)
    fake = Advert.from_bytes  # placeholder for mypy-free closure

    def swap(m: Message, rec: ConfigRecord):
        if rec["stage"] != STAGE_SHARES:
            return
        adverts = []
        for raw in rec["adverts"]:
            a = fake(raw)
            if a.node_id == victim:
                a = Advert(
                    a.node_id,
                    a.c_pk,
                    bytes(32 * [9]),
                    a.b_commit,
                    a.max_weight,
                    a.credential,
                    a.signature,
                )
            adverts.append(a.to_bytes())
        rec["adverts"] = adverts

    grid.tamper_out = swap
    secure = _secure(grid, arrays, cfg, 7)
    # every neighbour of 5 refused to go on (and 5 itself lost them): too few remain
    assert secure.arrays is None
    reasons = {r.node_id: r.reason for r in secure.rejected if r.stage == STAGE_SHARES}
    assert set(reasons) == set(NODES)
    # the listing names each advert by its digest: a swapped key is not the advert listed
    assert all("not the one listed" in reasons[n] for n in NODES if n != victim)


def test_too_few_survivors_fails_cleanly_and_keeps_the_model(setup, grid, caplog):
    _, arrays, cfg = setup
    for p in range(4):
        grid.faults[(STAGE_MASKED, node_id_for(p))] = "silent"
    stage = SecureExchange(SETTINGS, seed=cfg.run.seed)
    unmask_sent = []
    grid.tamper_out = lambda m, rec: unmask_sent.append(m) if rec["stage"] == STAGE_UNMASK else None
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        final = run_federation(
            grid,
            FedAvg(seed=cfg.run.seed, sampling=Sampling(fraction_evaluate=0.0)),
            arrays=arrays,
            rounds=1,
            train_config=_train_config(cfg),
            evaluate_config=ConfigRecord(),
            policy=RoundPolicy(timeout=60.0, min_available_clients=CLIENTS, retries=0),
            exchange=stage,
        )
    assert final is arrays  # the previous model, untouched
    assert unmask_sent == []  # no share of anyone's secret was asked for
    text = caplog.text
    assert "secure aggregation failed, keeping the previous model" in text
    assert "no share was requested" in text


def test_secure_evaluation_equals_plain_evaluation_and_hides_per_client_counts(setup, grid):
    _, arrays, cfg = setup
    seen_replies = []
    grid.tamper_in = lambda r: seen_replies.append(r) or r
    kwargs = dict(
        server_round=10,
        arrays=arrays,
        config=ConfigRecord(),
        node_ids=NODES,
        timeout=60.0,
        observer=Observer(),
    )
    stage = SecureExchange(SETTINGS, seed=cfg.run.seed)
    secure = evaluate_step(stage, grid, FedAvg(seed=cfg.run.seed), **kwargs)
    grid.tamper_in = None
    plain = evaluate_step(PlainExchange(), grid, FedAvg(seed=cfg.run.seed), **kwargs)
    assert secure.rejected == () and secure.num_clients == plain.num_clients == CLIENTS
    assert secure.num_examples == plain.num_examples
    q = SETTINGS.quantizer(CLIENTS, None)
    bound = CLIENTS * q.metric_step / secure.num_examples
    for key in ("eval_loss", "eval_acc"):
        assert abs(secure.metrics[key] - plain.metrics[key]) < bound + 1e-9
    # no reply of the secure exchange carried a plaintext metric record
    assert seen_replies and all("metrics" not in r.content.metric_records for r in seen_replies)


def test_masked_vector_on_the_wire_is_uniform(setup, grid):
    """(c) on real traffic: every byte position of a client's masked words is uniform.

    The same check on the client's encoded (unmasked) vector fails: it can tell.
    """
    from scipy.stats import chisquare

    from fedcore.secagg.protocol.quantize import encode
    from fedcore.secagg.protocol.wire import MASKED

    _, arrays, cfg = setup
    seen = []
    grid.tamper_in = lambda r: seen.append(r) or r
    result = _secure(grid, arrays, cfg, 11)
    ys = [
        array_view(r.content.array_records[MASKED]["y"])
        for r in seen
        if MASKED in r.content.array_records
    ]
    assert len(ys) == CLIENTS

    def worst_p(words: np.ndarray) -> float:
        as_bytes = words.view(np.uint8).reshape(len(words), -1)
        return min(
            chisquare(np.bincount(as_bytes[:, b], minlength=256)).pvalue
            for b in range(as_bytes.shape[1])
        )

    assert worst_p(ys[0]) > 1e-6
    # control: an update of the same size, encoded but not masked, is far from uniform
    delta = np.random.default_rng(0).normal(0, 0.01, ys[0].size - 3).astype(np.float32)
    plain = encode(delta, 100, [0.5], result.quantizer, b"k" * 32)
    assert worst_p(plain) < 1e-6


def test_unmask_requests_carry_only_each_clients_neighbours(setup, grid):
    """On a graph that is not complete (k = 4 of 5 peers): each client is sent the
    confirmations of its own counted neighbours, never a non-neighbour's."""
    from fedcore.secagg.protocol.crypto import RoundBinding
    from fedcore.secagg.protocol.graph import graph_seed, harary_graph, round_degree

    _, arrays, cfg = setup
    seen, listing = {}, {}

    def spy(m: Message, rec: ConfigRecord):
        if rec["stage"] == STAGE_SHARES:
            listing["ids"] = unpack_ids(rec["listing-ids"])
            listing["digests"] = list(rec["listing-digests"])
            listing["session"] = bytes(rec["session"])
        if rec["stage"] == STAGE_UNMASK:
            seen[m.metadata.dst_node_id] = unpack_ids(rec["signers"])

    grid.tamper_out = spy
    grid.faults[(STAGE_MASKED, node_id_for(0))] = "silent"
    settings = SecAggSettings(stage_timeout=20.0, neighbours=4)
    secure = _secure(grid, arrays, cfg, 12, settings=settings)
    assert secure.arrays is not None and set(seen) == set(NODES) - {node_id_for(0)}
    binding = RoundBinding(int(grid.run.run_id), 12, listing["session"]).encode()
    pairs = list(zip(listing["ids"], listing["digests"], strict=True))
    graph = harary_graph(
        listing["ids"],
        round_degree(4, len(pairs)),
        seed=graph_seed(binding, pairs),
        server_round=12,
    )
    assert all(len(v) == 4 for v in graph.values())  # not complete: each misses one peer
    survivors = set(NODES) - {node_id_for(0)}
    for node, signers in seen.items():
        assert set(signers) == set(graph[node]) & survivors


def test_scaffold_control_variates_travel_and_are_summed_securely(setup, grid):
    """SCAFFOLD under secure aggregation: the global control variate reaches every client
    in the masked stage, each client's control-variate delta travels only masked, and
    the securely summed deltas equal the plain exchange's within the quantization bound."""
    from fedcore.core.aggregation import spec_of
    from fedcore.serverside.strategies import STRATEGIES

    _, arrays, cfg = setup
    rng = np.random.default_rng(3)
    c = {k: rng.normal(0, 0.05, s.shape) for k, s in spec_of(arrays).items()}

    def scaffold():
        s = STRATEGIES.get("scaffold")(seed=cfg.run.seed)
        s.control = dict(c)  # a non-zero global control variate, as after some rounds
        return s

    seen = []
    grid.tamper_in = lambda r: seen.append(r) or r
    exchange = SecureExchange(SETTINGS, seed=cfg.run.seed)
    q = SETTINGS.quantizer(CLIENTS, None)
    kw = dict(
        server_round=21, arrays=arrays, config=_train_config(cfg), node_ids=NODES, timeout=60.0
    )
    secure = train_step(exchange, grid, scaffold(), **kw)
    grid.tamper_in = None
    plain = train_step(PlainExchange(accumulation_block=1), grid, scaffold(), **kw)
    assert secure.rejected == () and secure.num_clients == plain.num_clients == CLIENTS
    assert seen and not any("scaffold.delta-c" in r.content.array_records for r in seen)
    s, p = secure.aggregate.extras["scaffold.delta-c"], plain.aggregate.extras["scaffold.delta-c"]
    assert s.keys() == p.keys() == c.keys()
    bound = CLIENTS * q.step / secure.num_examples
    assert max(float(np.abs(s[k] - p[k]).max()) for k in s) < bound + 1e-6
    assert max(float(np.abs(p[k]).max()) for k in p) > 1e-3  # the deltas are not trivial
    assert _max_diff(secure.arrays, plain.arrays) < bound + 2e-7
