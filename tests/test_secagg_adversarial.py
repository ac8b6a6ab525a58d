"""A malicious server (and a malicious client) against fedcore's real secure-aggregation code.

Each test is one attack from issue 9, run by :class:`tests.adversary.Attacker` over
fedcore's embedded engine against the real ClientApp (``clients.app:app``, worker
processes, Flower messages): it shows what the adversary cannot learn (the client
refuses, or the round fails cleanly) while an honest round still gives the exact sum.
The max-flow feasibility check over the real graphs is ``tests/test_secagg_exposure.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcore.clientside.handlers import handle_train
from fedcore.core.aggregation import array_view
from fedcore.core.config import config_from_dict, to_flat
from fedcore.core.records import model_to_arrays
from fedcore.engines.embedded import EmbeddedGrid, node_id_for
from fedcore.secagg.exchange import SecAggSettings, SecureExchange
from fedcore.secagg.protocol.graph import harary_graph
from fedcore.secagg.protocol.machine import (
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    UnmaskReply,
)
from fedcore.secagg.protocol.quantize import decode
from fedcore.secagg.protocol.wire import MASKED
from fedcore.serverside.rounds import Observer
from fedcore.serverside.strategies import FedAvg

from .adversary import Q64, Attacker
from .exchanges import train_step

pytestmark = [pytest.mark.adversarial, pytest.mark.slow]

N = 20  # the default graph at n = 20: k = 12, t = 7
NODES = [node_id_for(p) for p in range(N)]
CFG = config_from_dict(
    {
        "run": {"seed": 11, "clients": N, "centralized-baseline": False},
        "data": {"source": "synthetic", "synthetic-examples": 600, "partition": "iid"},
        "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
        "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
    }
)


class TamperGrid(EmbeddedGrid):
    """The embedded grid; ``tamper_in`` rewrites replies on their way to the server."""

    tamper_in = None

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        return replies if self.tamper_in is None else [self.tamper_in(r) for r in replies]


@pytest.fixture(scope="module")
def fed():
    from fedcore.clientside.data import holdout
    from fedcore.runtime.serve import initial_model

    _, test = holdout(CFG.data, seed=CFG.run.seed)
    arrays = model_to_arrays(initial_model(CFG, test))
    grid = TamperGrid(
        client_app="clients.app:app", run_config=to_flat(CFG), num_clients=N, workers=2
    )
    yield grid, arrays
    grid.close()


@pytest.fixture
def grid(fed):
    fed[0].tamper_in = None
    return fed[0]


_ROUNDS = iter(range(100, 10_000))


def _round() -> int:
    """A fresh round number per attempt (each client's replay guard counts per round)."""
    return next(_ROUNDS)


def _plain_update(arrays: ArrayRecord, rnd: int, node: int, attempt: int = 0, **conf):
    """``(n_u, trained_u - global)`` computed in this process by the real training handler."""
    p = node - node_id_for(0)
    ctx = Context(
        run_id=1,
        node_id=node,
        node_config={"partition-id": p, "num-partitions": N},
        state=RecordDict(),
        run_config=to_flat(CFG),
    )
    config = {"server-round": rnd, "local-epochs": 1, "batch-size": 16, "lr": 0.1, **conf}
    if attempt:
        config["attempt"] = attempt
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
        dst_node_id=node,
        message_type="train",
    )
    reply = handle_train(msg, ctx)
    n = int(reply.content.metric_records["metrics"]["num-examples"])
    trained = reply.content.array_records["arrays"]
    flat = np.concatenate(
        [
            (array_view(trained[k]).astype(np.float64) - array_view(arrays[k])).ravel()
            for k in sorted(arrays.keys())
        ]
    )
    return n, flat


def _honest(att: Attacker):
    """Run every stage honestly; the attacker's replies at the unmask stage."""
    adverts = att.keys()
    boxes = att.shares(adverts)
    att.masked(boxes)
    survivors = att.server.survivor_set()
    sigs = att.confirm({u: survivors for u in survivors})
    requests = att.server.collect_confirmations(sigs)
    return att.unmask(requests)


def _finish(att: Attacker, replies):
    total = att.server.finish({u: UnmaskReply(b, sk) for u, (b, sk) in replies.items()})
    return decode(total, Q64, 1, len(att.server.u3))


def test_honest_round_gives_the_exact_weighted_sum(grid, fed):
    arrays = fed[1]
    rnd = _round()
    att = Attacker(grid, NODES, arrays, rnd)
    decoded = _finish(att, _honest(att))
    plain = [_plain_update(arrays, rnd, u) for u in NODES]
    total = sum(n for n, _ in plain)
    mean = sum(n * x for n, x in plain) / total
    assert decoded.total_weight == total  # exact
    assert np.abs(decoded.mean - mean).max() < N * Q64.step / total + 1e-6
    assert np.abs(mean).max() > 1e-3  # it trained


def test_inconsistent_survivor_views_reveal_nothing(grid, fed):
    """Attack 1: u's neighbours are told "u counted", everyone else "u's neighbours
    dropped" (so they would reveal the neighbours' mask keys). Honest clients sign one
    view each and reveal only if every counted neighbour signed the identical view."""
    arrays = fed[1]
    att = Attacker(grid, NODES, arrays, _round())
    att.masked(att.shares(att.keys()))
    u = NODES[3]
    near = set(att.server.graph[u])
    everyone = att.server.survivor_set()
    view_a = everyone  # u and its neighbours
    view_b = tuple(v for v in everyone if v not in near)  # the rest: N(u) "dropped"
    sets = {v: view_a if v in near or v == u else view_b for v in everyone}
    sigs = att.confirm(sets)
    # the server hands each client whatever confirmations it holds for its neighbours
    replies = att.unmask(
        {v: {w: sigs[w] for w in att.server.graph[v] if w in sigs} for v in everyone}
    )
    learned = att.learned(replies)
    assert not learned.exposes(u, att.server.maskers[u])
    assert learned.b_shares.get(u, 0) < att.params.threshold  # nobody revealed u's seed
    refusals = [r for (stage, _), r in att.errors.items() if stage == STAGE_UNMASK]
    # each refused: it saw a neighbour's confirmation missing or over another view, or
    # it had refused to confirm a view with too few of its neighbours counted
    assert refusals and all("refusing to reveal" in r or "out of order" in r for r in refusals)


def test_plaintext_downgrade_is_refused(grid, fed):
    """Attack 2: the server sends a plain ``train``: the client's own config wants
    secure aggregation, so it answers with an error and no weights."""
    arrays = fed[1]
    msgs = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=u,
            message_type="train",
        )
        for u in NODES[:4]
    ]
    replies = list(grid.send_and_receive(msgs, timeout=60.0))
    assert len(replies) == 4
    for r in replies:
        assert r.has_error() and "secure aggregation" in r.error.reason
        assert not r.has_content()


def test_threshold_chosen_by_the_server_is_refused(grid, fed):
    """Attack 4: t = 2 with k = 4 lets a server split u's neighbours in two halves."""
    att = Attacker(grid, NODES, fed[1], _round(), threshold=2, neighbours=4)
    adverts = att.keys()
    assert adverts == {}
    reasons = [r for (stage, _), r in att.errors.items() if stage == STAGE_KEYS]
    assert len(reasons) == N and all("strict majority" in r for r in reasons)


def test_replayed_round_is_refused_and_a_retry_trains_afresh(grid, fed):
    """Attack 6: a second keys message of one attempt is refused; a new attempt of the
    same round trains with fresh randomness, so the difference of two sums over sets
    that differ by one client is not that client's update."""
    arrays = fed[1]
    rnd = _round()
    first = Attacker(grid, NODES, arrays, rnd)
    sum_all = _finish(first, _honest(first))
    # replay of the same attempt's keys stage: refused by every client
    again = Attacker(grid, NODES, arrays, rnd, session=first.params.binding.session)
    assert again.keys() == {}
    assert all("replay" in r for r in again.errors.values())
    # a new attempt without the victim
    victim = NODES[0]
    second = Attacker(grid, NODES[1:], arrays, rnd)
    sum_rest = _finish(second, _honest(second))
    n_u, x_u = _plain_update(arrays, rnd, victim)
    diff = sum_all.mean * sum_all.total_weight - sum_rest.mean * sum_rest.total_weight
    # with fresh training randomness the difference is far from n_u x_u ...
    err = np.linalg.norm(diff - n_u * x_u) / np.linalg.norm(n_u * x_u)
    assert err > 0.1
    # ... while with the same randomness (what a replay would give) it is n_u x_u
    rest = [_plain_update(arrays, rnd, v) for v in NODES[1:]]
    same = sum_all.mean * sum_all.total_weight - sum(n * x for n, x in rest)
    assert np.linalg.norm(same - n_u * x_u) / np.linalg.norm(n_u * x_u) < 0.01


def test_per_client_training_config_isolates_nobody(grid, fed):
    """Attack 7: everyone but the victim gets a learning rate near zero, so the sum would
    be the victim's update. The victim signed another model/config digest than its
    neighbours, so they refuse to reveal its self-mask seed; an out-of-bounds rate is
    refused outright by the client's own bounds."""
    arrays = fed[1]
    att = Attacker(grid, NODES, arrays, _round())
    victim = NODES[5]
    boxes = att.shares(att.keys())
    att.masked(
        boxes,
        records=lambda u: att.model_records(u, lr=0.1 if u == victim else 1e-6),
    )
    survivors = att.server.survivor_set()
    sigs = att.confirm({u: survivors for u in survivors})
    replies = att.unmask(
        {v: {w: sigs[w] for w in att.server.maskers[v] if w in survivors} for v in survivors}
    )
    learned = att.learned(replies)
    assert victim not in learned.seeds and learned.b_shares.get(victim, 0) == 0
    # and lr = 0 (below train.min-lr) is refused by each client before training
    att2 = Attacker(grid, NODES, arrays, _round())
    att2.masked(att2.shares(att2.keys()), records=lambda u: att2.model_records(u, lr=0.0))
    masked_errors = [r for (stage, _), r in att2.errors.items() if stage == STAGE_MASKED]
    assert len(masked_errors) == N and all("train.min-lr" in r for r in masked_errors)


def test_steered_graph_is_refused(grid, fed):
    """Attack 8: the server relays neighbours from a graph of its choosing (e.g. ground
    from run seeds to surround a victim with colluders); each client recomputes its
    neighbours from the listing of the round's adverts and refuses."""
    arrays = fed[1]
    att = Attacker(grid, NODES, arrays, _round())
    adverts = att.keys()
    steered = harary_graph(sorted(adverts), 12, seed=1234, server_round=att.round)
    bundles = {u: [adverts[v] for v in steered[u]] for u in adverts}
    boxes = att.shares(adverts, bundles=bundles)
    assert boxes == {}
    reasons = [r for (stage, _), r in att.errors.items() if stage == STAGE_SHARES]
    assert len(reasons) == N
    assert all("listing's graph" in r or "missing" in r for r in reasons)
    # the graph is a function of the adverts: a new attempt (fresh keys) gets another one
    other = Attacker(grid, NODES, arrays, _round())
    other.shares(other.keys())
    assert other.server.graph != att.server.graph


def test_a_client_inflating_its_weight_voids_the_round(grid, fed):
    """Attack 9 (malicious client): it adds to its weight coordinate so the total is ~1
    and the mean is scaled by ~N. The total must lie in [counted, sum of signed caps]."""
    arrays = fed[1]
    d = sum(int(np.prod(a.shape)) for a in arrays.values())
    cheat = NODES[2]

    def inflate(reply: Message) -> Message:
        rec = reply.content.array_records.get(MASKED)
        if reply.metadata.src_node_id == cheat and rec is not None:
            y = np.array(array_view(rec["y"]))
            y[d] -= np.uint64(10_000)  # the ring wraps: the total weight collapses
            rec["y"] = type(rec["y"]).from_numpy_ndarray(y)
        return reply

    grid.tamper_in = inflate
    result = train_step(
        SecureExchange(SecAggSettings(ring_bits=64), seed=CFG.run.seed),
        grid,
        FedAvg(seed=CFG.run.seed),
        server_round=_round(),
        arrays=arrays,
        config=ConfigRecord({"local-epochs": 1, "batch-size": 16, "lr": 0.1}),
        node_ids=NODES,
        timeout=60.0,
        observer=Observer(),
    )
    assert result.arrays is None  # the round is discarded, the model kept


def test_a_bad_share_is_identified_and_the_round_completes(grid, fed):
    """A client sends a wrong share at the unmask stage: the commitments pick a correct
    reconstruction, the wrong share is named, and the sum is still exact."""
    arrays = fed[1]
    rnd = _round()
    att = Attacker(grid, NODES, arrays, rnd)
    replies = _honest(att)
    liar = NODES[7]
    b, sk = replies[liar]
    owner = next(iter(b))
    replies[liar] = ({**b, owner: (b[owner] + 1) % (2**255 - 19)}, sk)
    decoded = _finish(att, replies)
    assert any(r.node_id == liar and "bad share" in r.reason for r in att.server.rejected)
    plain = [_plain_update(arrays, rnd, u) for u in NODES]
    total = sum(n for n, _ in plain)
    assert decoded.total_weight == total


def test_server_named_code_never_runs_on_a_client(tmp_path, fed):
    """Attack 3: the run config names ``model.factory`` / ``model.train-fn``; a client
    with its own config (deployment: ``fedcore client --config``) never imports them."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_mod.py"
    evil.write_text(
        "from pathlib import Path\n"
        f"def factory(**kw):\n    Path({str(marker)!r}).write_text('factory ran')\n"
        f"def train(model, loader, settings):\n    Path({str(marker)!r}).write_text('train ran')\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        own = tmp_path / "client.toml"
        own.write_text(
            '[run]\nseed = 11\nclients = 4\n[data]\nsource = "synthetic"\n'
            'synthetic-examples = 200\npartition = "iid"\n[model]\nfactory = "mlp"\n'
            "[model.kwargs]\nhidden = 8\n"
        )
        own_cfg = config_from_dict(
            {
                "run": {"seed": 11, "clients": 4},
                "data": {"source": "synthetic", "synthetic-examples": 200, "partition": "iid"},
                "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            }
        )
        run_config = {
            **to_flat(own_cfg),
            "model.factory": "evil_mod:factory",
            "model.train-fn": "evil_mod:train",
        }
        grid = EmbeddedGrid(
            client_app="clients.app:app",
            run_config=run_config,
            num_clients=4,
            workers=1,
            client_config=own,
        )
        try:
            from fedcore.clientside.data import holdout
            from fedcore.runtime.serve import initial_model

            _, test = holdout(own_cfg.data, seed=11)
            arrays = model_to_arrays(initial_model(own_cfg, test))
            result = train_step(
                SecureExchange(SecAggSettings(), seed=11),
                grid,
                FedAvg(seed=11),
                server_round=1,
                arrays=arrays,
                config=ConfigRecord({"local-epochs": 1, "batch-size": 16, "lr": 0.1}),
                node_ids=[node_id_for(p) for p in range(4)],
                timeout=60.0,
                observer=Observer(),
            )
        finally:
            grid.close()
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists()  # neither the factory nor the train function ran
    assert result.arrays is not None and result.num_clients == 4  # its own model trained


def test_two_sums_of_one_evaluation_are_refused(grid, fed):
    """Attack 6 on evaluation: metrics do not change between attempts, so a client
    answers one secure evaluation per round."""
    arrays = fed[1]
    rnd = _round()
    ex = SecureExchange(SecAggSettings(), seed=CFG.run.seed)
    from .exchanges import evaluate_step

    kwargs = dict(
        server_round=rnd,
        arrays=arrays,
        config=ConfigRecord(),
        node_ids=NODES,
        timeout=60.0,
        observer=Observer(),
    )
    first = evaluate_step(ex, grid, FedAvg(seed=CFG.run.seed), **kwargs)
    assert first.num_clients == N
    second = evaluate_step(ex, grid, FedAvg(seed=CFG.run.seed), **kwargs)
    assert second.num_clients == 0
    assert any("already answered a secure evaluation" in r.reason for r in second.rejected)


def test_fabricated_neighbours_are_refused_by_provisioned_clients(tmp_path):
    """Attack 5: the server invents clients (fresh keys of its own, correctly signed
    adverts) to sit around a victim. Provisioned clients accept only keys in the
    federation's CA-signed admitted list, so every client that gets a fabricated
    neighbour refuses to share. Real handlers, real kits, no grid."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedcore.deploy.provision import provision
    from fedcore.secagg.handler import handle_secagg
    from fedcore.secagg.protocol.crypto import RoundBinding
    from fedcore.secagg.protocol.machine import Advert, ClientRound, RoundParams
    from fedcore.secagg.protocol.rosters import KeyIdentity
    from fedcore.secagg.protocol.wire import SECAGG, pack_ids
    from fedcore.storage.keys import ADMITTED_LIST, FEDERATION_CA, IDENTITY_KEY

    fed = provision(tmp_path / "fed", clients=4)
    real = {10 + i: fed.client_kit(f"client-{i + 1}") for i in range(4)}
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={
                IDENTITY_KEY: str(kit / "identity.key"),
                FEDERATION_CA: str(kit / "ca.pem"),
                ADMITTED_LIST: str(kit / "admitted.json"),
            },
            state=RecordDict(),
            run_config=to_flat(CFG),
        )
        for node, kit in real.items()
    }
    fake = list(range(90, 98))  # eight clients the server made up
    nodes = sorted([*real, *fake])
    params = RoundParams(RoundBinding(1, 1, b"f" * 16), 7, Q64, ("train_loss",), neighbours=11)

    def call(node, fields):
        msg = Message(
            RecordDict({SECAGG: ConfigRecord(fields)}),
            dst_node_id=node,
            message_type="train.secagg",
        )
        return handle_secagg(msg, contexts[node], train=handle_train)

    adverts = {
        u: Advert.from_bytes(
            call(u, {**params.to_dict(), "stage": STAGE_KEYS}).content.config_records[SECAGG][
                "advert"
            ]
        )
        for u in real
    }
    for u in fake:  # correctly signed, with keys the server holds
        adverts[u] = ClientRound.start(
            u, params, KeyIdentity(ec.generate_private_key(ec.SECP384R1()))
        )[1]
    listing = [(u, adverts[u].digest()) for u in nodes]
    from fedcore.secagg.protocol.graph import graph_seed, harary_graph

    graph = harary_graph(
        nodes, 11, seed=graph_seed(params.binding.encode(), listing), server_round=1
    )
    for u in real:
        fields = {
            "server-round": 1,
            "session": params.binding.session,
            "stage": STAGE_SHARES,
            "listing-ids": pack_ids(v for v, _ in listing),
            "listing-digests": [d for _, d in listing],
            "adverts": [adverts[v].to_bytes() for v in graph[u]],
        }
        with pytest.raises(Exception, match="not in the federation's admitted list"):
            call(u, fields)
