"""Secure aggregation benchmark: fedcore SecAgg+ vs a plain round, vs Flower's SecAgg+, and scaling.

Usage (from the repository root)::

    .venv/bin/python benchmarks/secure_aggregation.py            # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/secure_aggregation.py --only overhead,throughput

Sections (all on this machine's CPU; the last line printed is one JSON object):

- ``overhead``: one training round on fedcore's embedded engine (real worker
  processes, Flower protobuf messages, fedcore's ClientApp training an MLP of
  1,001,755 parameters on synthetic data), 20 clients, 2 of them (10%)
  vanishing after sending their shares (their stage-3 message is withheld, so
  no deadline is waited for). Plain round = the 18 clients that train. Key
  ``overhead_vs_plain`` = median secure / median plain.
- ``flower``: 10 clients, MLPs of 100,243 and 1,001,755 parameters, no
  dropouts, on the same embedded engine and the same training: fedcore's
  secure round vs Flower 1.42's ``SecAggPlusWorkflow`` + ``secaggplus_mod``
  (legacy ``DefaultWorkflow``/``LegacyContext``, ``num_shares=10``,
  ``reconstruction_threshold=6``). Key ``speedup_vs_flower_secaggplus`` (Flower
  round / fedcore round; the smaller of the two sizes).
- ``throughput``: one client's mask generation (self mask + k pairwise masks,
  AES-256-CTR keystream into uint64 words, vectorized adds) for 1M coordinates,
  k = 12 (the auto k at n = 20); also Flower's ``pseudo_rand_gen`` for contrast.
- ``default``: train + evaluate rounds of ``simulations/default.toml`` (digits,
  CNN, 10 clients), secure (training and evaluation) vs plain, interleaved.
- ``scaling``: the pure protocol core (no engine, one process) at n = 10, 100,
  1,000 clients, k = auto (O(log n)), 10,000 coordinates, 10% dropping after
  sharing: server time and per-client time per round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])

import numpy as np  # noqa: E402

HIDDEN = {"100k": 301, "1M": 985}  # MLP 20 -> h -> h -> 10: h^2 + 32h + 10 parameters
SETTINGS: list = []  # the SecAggSettings under test (set in main)
CPU: list[float] = []  # CPU seconds (server + workers) of each round, in call order


def _config(clients: int, hidden: int, seed: int = 0):
    from fedcore.core.config import config_from_dict

    return config_from_dict(
        {
            "run": {"seed": seed, "clients": clients, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 2000, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": hidden}},
            "train": {"local-epochs": 1, "batch-size": 32, "lr": 0.05},
            "engine": {"workers": 2},
            # the clients' own config: they accept plain rounds too (this benchmark times
            # plain and secure rounds on one grid; the secure exchange is built directly)
            "secagg": {"enabled": False},
        }
    )


def _initial(cfg):
    from fedcore.clientside.data import holdout
    from fedcore.core.records import model_to_arrays
    from fedcore.runtime.serve import initial_model

    _, test = holdout(cfg.data, seed=cfg.run.seed)
    return model_to_arrays(initial_model(cfg, test))


def _server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1


class _StageTimes(logging.Handler):
    """Collects the secure stage's per-exchange timings (its debug log lines)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.items: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "replies in" in msg:
            stage = msg.split(":")[1].strip()
            self.items.append((stage, float(msg.rsplit(" ", 2)[-2])))


def _grid_class():
    from fedcore.engines.embedded import EmbeddedGrid
    from fedcore.secagg.protocol.machine import STAGE_MASKED
    from fedcore.secagg.protocol.wire import SECAGG

    class DropGrid(EmbeddedGrid):
        """Withholds the stage-3 message of ``self.drop``: those clients vanish after sharing."""

        drop: frozenset[int] = frozenset()

        def push_messages(self, messages):
            keep = []
            for m in messages:
                rec = m.content.config_records.get(SECAGG)
                if (
                    rec is not None
                    and rec.get("stage") == STAGE_MASKED
                    and m.metadata.dst_node_id in self.drop
                ):
                    continue
                keep.append(m)
            return super().push_messages(keep)

    return DropGrid


def _cpu_s(grid) -> float:
    """CPU seconds used so far by this process (all threads) and the grid's worker processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for w in grid._workers:  # the embedded engine's worker processes
        pid = getattr(w.process, "pid", None)
        if pid is None:  # executor 0 is a thread of this process: counted above
            continue
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


class _Round:
    """A counted round: its aggregate and the next model."""

    def __init__(self, agg, arrays):
        self.arrays, self.rejected = arrays, agg.rejected
        self.num_clients, self.num_examples, self.metrics = (
            agg.num_clients,
            agg.total_weight,
            agg.metrics,
        )


def _secure_stage(cfg):
    from fedcore.secagg.exchange import SecureExchange

    return SecureExchange(SETTINGS[0], seed=cfg.run.seed)


def _rounds(grid, cfg, arrays, nodes, stage, rnd: int):
    from flwr.app import ConfigRecord

    from fedcore.serverside.exchange import PlainExchange
    from fedcore.serverside.rounds import train_once
    from fedcore.serverside.strategies import FedAvg

    stage = stage or PlainExchange()
    strategy = FedAvg(seed=cfg.run.seed)
    conf = ConfigRecord({"lr": cfg.train.lr, "local-epochs": 1, "batch-size": cfg.train.batch_size})
    c0 = _cpu_s(grid)
    t0 = time.perf_counter()
    agg = train_once(
        grid,
        strategy,
        stage,
        server_round=rnd,
        arrays=arrays,
        config=conf,
        node_ids=nodes,
        timeout=600.0,
    )
    if agg.update is not None:
        new = strategy.server_update(rnd, arrays, agg)
    dt = time.perf_counter() - t0
    CPU.append(_cpu_s(grid) - c0)
    if agg.update is None:
        raise RuntimeError(f"round failed: {agg.rejected}")
    return dt, _Round(agg, new)


def bench_overhead(reps: int) -> dict:
    from fedcore.core.config import to_flat
    from fedcore.engines.embedded import node_id_for

    clients = 20
    cfg = _config(clients, HIDDEN["1M"])
    arrays = _initial(cfg)
    params = sum(int(np.prod(a.shape)) for a in arrays.values())
    nodes = [node_id_for(p) for p in range(clients)]
    dropped = frozenset(
        nodes[i] for i in np.random.default_rng(0).choice(clients, 2, replace=False)
    )
    survivors = [n for n in nodes if n not in dropped]
    grid = _grid_class()(
        client_app="clients.app:app", run_config=to_flat(cfg), num_clients=clients, workers=2
    )
    grid.drop = dropped
    times = _StageTimes()
    log = logging.getLogger("fedcore")
    log.addHandler(times)
    log.setLevel(logging.DEBUG)
    plain, secure, plain_cpu, secure_cpu = [], [], [], []
    try:
        secure_stage = _secure_stage(cfg)  # one per run: its ring choice carries over rounds
        _rounds(grid, cfg, arrays, survivors, None, 1)  # warm-up: imports, first messages
        _rounds(grid, cfg, arrays, nodes, secure_stage, 1)
        ring = SETTINGS[0].quantizer(clients, secure_stage.last_weight).ring_bits
        for r in range(reps):  # interleaved, so load from other processes hits both alike
            plain.append(_rounds(grid, cfg, arrays, survivors, None, 2 + r)[0])
            plain_cpu.append(CPU[-1])
            times.items.clear()
            dt, tr = _rounds(grid, cfg, arrays, nodes, secure_stage, 2 + r)
            secure.append(dt)
            secure_cpu.append(CPU[-1])
            assert tr.num_clients == len(survivors), tr.rejected
    finally:
        log.removeHandler(times)
        grid.close()
    stages = {s: round(v, 4) for s, v in times.items}
    exchange = sum(stages.values())
    return {
        "clients": clients,
        "parameters": params,
        "dropped_after_shares": len(dropped),
        "ring_bits_timed_rounds": ring,
        "plain_round_s": round(statistics.median(plain), 4),
        "secure_round_s": round(statistics.median(secure), 4),
        "plain_rounds_s": [round(v, 4) for v in plain],
        "secure_rounds_s": [round(v, 4) for v in secure],
        "secure_stage_s_last_round": stages,
        "secure_unmask_and_decode_s_last_round": round(secure[-1] - exchange, 4),
        "plain_round_cpu_s": round(statistics.median(plain_cpu), 4),
        "secure_round_cpu_s": round(statistics.median(secure_cpu), 4),
        "cpu_overhead_vs_plain": round(
            statistics.median(secure_cpu) / statistics.median(plain_cpu), 3
        ),
        "best_of_overhead_vs_plain": round(min(secure) / min(plain), 3),
        "overhead_vs_plain": round(statistics.median(secure) / statistics.median(plain), 3),
    }


def bench_default(reps: int) -> dict:
    """Train + evaluate rounds of the default simulation config (digits, CNN, 10 clients)."""
    from flwr.app import ConfigRecord

    from fedcore.core.config import to_flat
    from fedcore.engines.embedded import EmbeddedGrid, node_id_for
    from fedcore.runtime.serve import build_exchanges, build_strategy, plain_exchange
    from fedcore.serverside.rounds import evaluate_once, train_once
    from fedcore.storage.configfile import load_config

    cfg = load_config(ROOT / "simulations" / "default.toml")
    arrays = _initial(cfg)
    nodes = [node_id_for(p) for p in range(cfg.run.clients)]
    conf = ConfigRecord(
        {
            "lr": cfg.train.lr,
            "local-epochs": cfg.train.local_epochs,
            "batch-size": cfg.train.batch_size,
        }
    )
    grid = EmbeddedGrid(  # clients that accept plain rounds too (both kinds are timed)
        client_app="clients.app:app",
        run_config=to_flat(cfg.replace(secagg={"enabled": False})),
        num_clients=cfg.run.clients,
        workers=2,
    )
    strategy = build_strategy(cfg)
    secure = build_exchanges(cfg)
    plain = (plain_exchange(cfg), plain_exchange(cfg))
    out: dict = {"plain": [], "secure": [], "plain_cpu": [], "secure_cpu": []}

    def one(stages, rnd):
        nonlocal arrays
        c0, t0 = _cpu_s(grid), time.perf_counter()
        kw = dict(node_ids=nodes, timeout=600.0, server_round=rnd)
        agg = train_once(grid, strategy, stages[0], arrays=arrays, config=conf, **kw)
        new = strategy.server_update(rnd, arrays, agg)
        evaluate_once(grid, strategy, stages[1], arrays=new, config=ConfigRecord(), **kw)
        return time.perf_counter() - t0, _cpu_s(grid) - c0

    try:
        one(plain, 1)
        one(secure, 1)  # warm-up (and the 64-bit first round of the secure stages)
        for r in range(reps):
            for name, stages in (("plain", plain), ("secure", secure)):
                wall, cpu = one(stages, 2 + r)
                out[name].append(wall)
                out[name + "_cpu"].append(cpu)
    finally:
        grid.close()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        "plain_round_s": round(med["plain"], 4),
        "secure_round_s": round(med["secure"], 4),
        "plain_round_cpu_s": round(med["plain_cpu"], 4),
        "secure_round_cpu_s": round(med["secure_cpu"], 4),
        "overhead_vs_plain": round(med["secure"] / med["plain"], 3),
        "cpu_overhead_vs_plain": round(med["secure_cpu"] / med["plain_cpu"], 3),
        "extra_s_per_20_rounds": round(20 * (med["secure"] - med["plain"]), 2),
    }


def _flower_rounds(cfg, arrays, rounds: int, secure: bool) -> list[float]:
    from flwr.app import Context, RecordDict
    from flwr.common import ndarrays_to_parameters
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as FlowerFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from fedcore.core.aggregation import array_view
    from fedcore.core.config import to_flat
    from fedcore.engines.embedded import EmbeddedGrid

    clients = cfg.run.clients
    init = [np.array(array_view(a)) for a in arrays.values()]
    strategy = FlowerFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(init),
    )
    inner = (
        SecAggPlusWorkflow(num_shares=clients, reconstruction_threshold=6)
        if secure
        else default_fit_workflow
    )
    times: list[float] = []

    def fit(grid, context):
        t0 = time.perf_counter()
        inner(grid, context)
        times.append(time.perf_counter() - t0)

    class ListGrid(EmbeddedGrid):
        """Flower's workflows iterate the replies twice: hand them a list, not a stream."""

        def send_and_receive(self, messages, *, timeout=None):
            return list(super().send_and_receive(messages, timeout=timeout))

    grid = ListGrid(
        client_app="flower_secaggplus_app:app" if secure else "flower_secaggplus_app:plain_app",
        run_config=to_flat(cfg),
        num_clients=clients,
        workers=2,
    )
    try:
        ctx = Context(
            run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
        )
        legacy = LegacyContext(ctx, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=fit, evaluate_workflow=lambda g, c: None)(grid, legacy)
    finally:
        grid.close()
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    final = legacy.state.array_records[MAIN_PARAMS_RECORD]
    trained = [np.asarray(a.numpy()) for a in final.values()]
    if all(np.array_equal(a, b) for a, b in zip(trained, init, strict=True)):
        raise RuntimeError("Flower's rounds produced no update (every client failed?)")
    return times


def bench_flower(rounds: int, sizes: list[str]) -> dict:
    from fedcore.core.config import to_flat
    from fedcore.engines.embedded import EmbeddedGrid, node_id_for

    logging.getLogger("flwr").setLevel(logging.WARNING)
    out: dict = {}
    clients = 10
    for label in sizes:
        hidden = HIDDEN[label]
        cfg = _config(clients, hidden)
        arrays = _initial(cfg)
        nodes = [node_id_for(p) for p in range(clients)]
        grid = EmbeddedGrid(
            client_app="clients.app:app", run_config=to_flat(cfg), num_clients=clients, workers=2
        )
        ours, plain = [], []
        try:
            secure_stage = _secure_stage(cfg)
            _rounds(grid, cfg, arrays, nodes, secure_stage, 1)  # warm-up
            ring = SETTINGS[0].quantizer(clients, secure_stage.last_weight).ring_bits
            for r in range(rounds):
                plain.append(_rounds(grid, cfg, arrays, nodes, None, 2 + r)[0])
                ours.append(_rounds(grid, cfg, arrays, nodes, secure_stage, 2 + r)[0])
        finally:
            grid.close()
        flower = _flower_rounds(cfg, arrays, rounds + 1, secure=True)[1:]  # first round warms up
        flower_plain = _flower_rounds(cfg, arrays, rounds + 1, secure=False)[1:]
        out[label] = {
            "parameters": sum(int(np.prod(a.shape)) for a in arrays.values()),
            "fedcore_ring_bits": ring,
            "fedcore_secure_round_s": round(statistics.median(ours), 4),
            "fedcore_plain_round_s": round(statistics.median(plain), 4),
            "flower_secaggplus_round_s": round(statistics.median(flower), 4),
            "flower_plain_round_s": round(statistics.median(flower_plain), 4),
            "flower_secaggplus_vs_its_plain": round(
                statistics.median(flower) / statistics.median(flower_plain), 2
            ),
            "speedup_vs_flower_secaggplus": round(
                statistics.median(flower) / statistics.median(ours), 2
            ),
        }
    return out


def _best(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_throughput() -> dict:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from fedcore.secagg.protocol.crypto import RoundBinding
    from fedcore.secagg.protocol.machine import ClientRound, RoundParams
    from fedcore.secagg.protocol.quantize import Quantizer, encode
    from fedcore.secagg.protocol.rosters import EphemeralIdentity, PinnedRoster

    d, k = 1_000_000, 12
    out: dict = {"coordinates": d, "neighbours": k, "best_of": 5}
    delta = np.random.default_rng(0).standard_normal(d).astype(np.float32) * 0.01
    for ring, bits in ((64, 24), (32, 19)):
        q = Quantizer(clip=4.0, bits=bits, ring_bits=ring)
        params = RoundParams(RoundBinding(1, 1, b"b" * 16), k // 2 + 1, q, neighbours=k)
        nodes = list(range(1, k + 2))
        cs, ads = {}, {}
        for u in nodes:
            cs[u], ads[u] = ClientRound.start(u, params, EphemeralIdentity.generate())
        listing = [(u, ads[u].digest()) for u in nodes]
        boxes = {
            u: cs[u].share(listing, [ads[v] for v in nodes if v != u], ads[u], PinnedRoster({}))
            for u in nodes
        }
        me = cs[1]
        me.receive_shares({v: boxes[v][1] for v in nodes if v != 1})
        state = me.to_json()
        enc = encode(delta, 100, (0.5,), q, params.rounding_key(1))
        t_enc = _best(lambda q=q, p=params: encode(delta, 100, (0.5,), q, p.rounding_key(1)))
        t_mask = _best(lambda s=state, e=enc: ClientRound.from_json(s).mask(e, b"d" * 32))
        out[f"ring{ring}"] = {
            "mask_s": round(t_mask, 4),
            "mask_generation_MB_per_s": round((k + 1) * enc.nbytes / t_mask / 1e6, 1),
            "encode_quantize_s": round(t_enc, 4),
        }
    t_flower = _best(lambda: pseudo_rand_gen(os.urandom(32), 2**32, [(d,)]))
    out["flower_pseudo_rand_gen_MB_per_s"] = round(d * 8 / t_flower / 1e6, 1)
    out["mask_generation_MB_per_s"] = out["ring64"]["mask_generation_MB_per_s"]
    return out


def bench_scaling(ns: list[int], d: int) -> dict:
    from fedcore.secagg.protocol.crypto import RoundBinding
    from fedcore.secagg.protocol.graph import resolve
    from fedcore.secagg.protocol.machine import ClientRound, RoundParams, ServerRound
    from fedcore.secagg.protocol.quantize import Quantizer, decode, encode, extra_coordinates
    from fedcore.secagg.protocol.rosters import EphemeralIdentity, PinnedRoster

    q = Quantizer(clip=4.0, bits=24, ring_bits=64)
    out: dict = {}
    g = np.random.default_rng(1)
    for n in ns:
        nodes = list(range(1000, 1000 + n))
        k, t = resolve(n, 0, 0)
        params = RoundParams(RoundBinding(1, 1, b"c" * 16), t, q, ("train_loss",), neighbours=k)
        dim = d + extra_coordinates(1)
        drop = set(g.choice(nodes, max(1, n // 10), replace=False).tolist())
        client_s = dict.fromkeys(nodes, 0.0)
        server_s = 0.0
        content = b"m" * 32  # the digest of the round's model and config

        def timed(u, fn, *a, acc=client_s):
            t0 = time.perf_counter()
            r = fn(*a)
            acc[u] += time.perf_counter() - t0
            return r

        t0 = time.perf_counter()
        server = ServerRound(params, nodes, dim, PinnedRoster({}))
        server_s += time.perf_counter() - t0
        cs, ads, ids, rosters = {}, {}, {}, {}
        for u in nodes:
            ids[u] = EphemeralIdentity.generate()
            rosters[u] = PinnedRoster({})
            cs[u], ads[u] = timed(u, ClientRound.start, u, params, ids[u])
        t0 = time.perf_counter()
        listing, bundles = server.collect_adverts(ads)
        server_s += time.perf_counter() - t0
        boxes = {u: timed(u, cs[u].share, listing, bundles[u], ads[u], rosters[u]) for u in bundles}
        t0 = time.perf_counter()
        relay = server.collect_shares(boxes)
        server_s += time.perf_counter() - t0
        x = g.standard_normal(d).astype(np.float32) * 0.01
        for u in relay:
            if u in drop:
                continue
            timed(u, cs[u].receive_shares, relay[u])
            enc = timed(u, encode, x, 50, (1.0,), q, params.rounding_key(u))
            y = timed(u, cs[u].mask, enc, content)
            t0 = time.perf_counter()
            server.add_masked(u, y)
            server_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        survivors = server.survivor_set()
        server_s += time.perf_counter() - t0
        sigs = {u: timed(u, cs[u].confirm, survivors, ids[u]) for u in survivors}
        t0 = time.perf_counter()
        requests = server.collect_confirmations(sigs, dict.fromkeys(survivors, content))
        server_s += time.perf_counter() - t0
        replies = {u: timed(u, cs[u].unmask, requests[u], rosters[u]) for u in requests}
        t0 = time.perf_counter()
        total = server.finish(replies)
        res = decode(total, q, 1, len(server.u3))
        server_s += time.perf_counter() - t0
        assert res.total_weight == 50 * len(server.u3)
        counted = [client_s[u] for u in nodes if u not in drop]
        out[str(n)] = {
            "k": k,
            "t": t,
            "dropped_after_shares": len(drop),
            "server_s": round(server_s, 4),
            "client_mean_s": round(statistics.mean(counted), 5),
            "client_max_s": round(max(counted), 5),
            "critical_path_s": round(server_s + max(counted), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="overhead,flower,throughput,scaling,default")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per configuration")
    ap.add_argument("--scaling-dim", type=int, default=10_000)
    ap.add_argument("--scaling-n", default="10,100,1000")
    ap.add_argument("--flower-sizes", default="100k,1M")
    ap.add_argument("--ring-bits", type=int, default=None, help="override secagg.ring-bits")
    ap.add_argument("--bits", type=int, default=None, help="override secagg.bits")
    ap.add_argument("--neighbours", type=int, default=0, help="override secagg.neighbours")
    args = ap.parse_args()
    from fedcore.core.config import SecAggConfig
    from fedcore.secagg.exchange import SecAggSettings

    base = SecAggConfig()
    SETTINGS.append(
        SecAggSettings(
            neighbours=args.neighbours,
            clip=base.clip,
            bits=args.bits or base.bits,
            ring_bits=base.ring_bits if args.ring_bits is None else args.ring_bits,
            stage_timeout=base.stage_timeout,
        )
    )
    _server_identity()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    only = set(args.only.split(","))
    result: dict = {
        "machine": f"{os.cpu_count()} CPU cores (shared)",
        "load_average_at_start": os.getloadavg()[0],
        "ring_bits": SETTINGS[0].ring_bits,
        "neighbours": SETTINGS[0].neighbours,
        "bits": SETTINGS[0].bits,
    }
    if "throughput" in only:
        result["mask_generation"] = bench_throughput()
        print("throughput", json.dumps(result["mask_generation"]), flush=True)
    if "scaling" in only:
        result["scaling_pure_core"] = bench_scaling(
            [int(v) for v in args.scaling_n.split(",")], args.scaling_dim
        )
        print("scaling", json.dumps(result["scaling_pure_core"]), flush=True)
    if "overhead" in only:
        result["embedded_20x1M"] = bench_overhead(args.reps)
        result["overhead_vs_plain"] = result["embedded_20x1M"]["overhead_vs_plain"]
        print("overhead", json.dumps(result["embedded_20x1M"]), flush=True)
    if "default" in only:
        result["default_simulation_rounds"] = bench_default(args.reps)
        print("default", json.dumps(result["default_simulation_rounds"]), flush=True)
    if "flower" in only:
        result["vs_flower_10_clients"] = bench_flower(args.reps, args.flower_sizes.split(","))
        result["speedup_vs_flower_secaggplus"] = min(
            v["speedup_vs_flower_secaggplus"] for v in result["vs_flower_10_clients"].values()
        )
        print("flower", json.dumps(result["vs_flower_10_clients"]), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
