"""Weighted-mean kernel: fedcore's streaming kernel vs Flower's ``aggregate_arrayrecords``.

Both get the same replies: ``--clients`` Flower ``RecordDict``s, each an
``"arrays"`` ArrayRecord of ``--params`` float32 parameters (a small CNN's
layout) and a ``"metrics"`` MetricRecord with ``"num-examples"``.

- wall time: the kernels run interleaved, ``--reps`` times each, in this
  process; median (and min) wall and CPU time;
- peak extra memory: each kernel runs once in a fresh subprocess; peak RSS
  (``ru_maxrss``) after the aggregation minus RSS once the replies are built.

fedcore is measured like-for-like (``finite=False``: no NaN/Inf check, Flower does
none), with validation (``finite=True``, as ``FedAvg`` runs it), and end to end
through the plain exchange and ``FedAvg.server_update`` on reply
``Message``s. The last line printed is
one JSON object.

    python benchmarks/aggregation.py [--clients 50] [--params 1000000] [--reps 9]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from fedcore.core.aggregation import WeightedMean, array_view, numpy_to_array, spec_of
from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.pools import aggregation_pool
from fedcore.serverside.strategies import FedAvg

KERNELS = ("flower", "fedcore", "fedcore-1thread", "fedcore-validated", "fedcore-fedavg")

#: Threads of fedcore's kernels (``--threads``: the server's default, 1; 0 = one per
#: core, at most 4); "fedcore-1thread" is the same kernel on the calling thread alone.
THREADS = 1


def layout(params: int) -> dict[str, tuple[int, ...]]:
    """A small CNN's arrays, the big dense layer sized so the total is ``params``."""
    fixed = {
        "conv1.weight": (32, 1, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc2.weight": (10, 1000),
        "fc2.bias": (10,),
    }
    rest = params - sum(int(np.prod(s)) for s in fixed.values())
    rows = rest // 1000 - 1
    if rows < 1:
        raise SystemExit(f"--params must be at least {sum(map(np.prod, fixed.values())) + 2000}")
    return {"fc1.weight": (rows, 1000), "fc1.bias": (rest - rows * 1000,), **fixed}


def build_replies(clients: int, params: int, seed: int = 0) -> list[RecordDict]:
    """``clients`` replies with random weights and ``num-examples`` in [10, 1000)."""
    rng = np.random.default_rng(seed)
    shapes = layout(params)
    replies = []
    for _ in range(clients):
        arrays = ArrayRecord(
            {k: numpy_to_array(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
        )
        n = int(rng.integers(10, 1000))
        replies.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}))
    return replies


def _as_messages(replies: list[RecordDict]) -> tuple[ArrayRecord, list[Message]]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    template = replies[0]["arrays"]
    msgs = []
    for i, content in enumerate(replies):
        out = Message(
            RecordDict({"arrays": template, "config": ConfigRecord()}),
            dst_node_id=1000 + i,
            message_type=MessageType.TRAIN,
        )
        out.metadata.__dict__["_message_id"] = f"{i:032x}"
        reply = Message(content, reply_to=out)
        reply.metadata.__dict__["_src_node_id"] = 1000 + i
        msgs.append(reply)
    return template, msgs


def kernel(name: str, replies: list[RecordDict], block: int) -> Callable[[], ArrayRecord]:
    """A zero-argument callable that aggregates ``replies`` once with kernel ``name``."""
    if name == "flower":
        return lambda: aggregate_arrayrecords(replies, "num-examples")
    if name in ("fedcore", "fedcore-1thread", "fedcore-validated"):
        finite = name == "fedcore-validated"
        spec = spec_of(replies[0]["arrays"])
        pool = None if name == "fedcore-1thread" else aggregation_pool(THREADS)

        def run() -> ArrayRecord:
            acc = WeightedMean(spec, block=block, pool=pool)
            for r in replies:
                acc.add(r["arrays"], r["metrics"]["num-examples"], finite=finite)
            return acc.result()

        return run
    if name == "fedcore-fedavg":
        template, msgs = _as_messages(replies)
        strategy = FedAvg(seed=0)
        exchange = PlainExchange(accumulation_block=block, accumulation_threads=THREADS)

        def run_fedavg() -> ArrayRecord:
            agg = exchange.aggregate(msgs, arrays=template)
            assert agg.update is not None and not agg.rejected, agg.rejected
            return strategy.server_update(1, template, agg)

        return run_fedavg
    raise SystemExit(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")


def max_abs_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    """Largest element-wise difference between two records (same keys)."""
    return max(float(np.max(np.abs(a[k].numpy() - b[k].numpy()))) for k in a)


def time_kernels(replies: list[RecordDict], reps: int, block: int) -> dict[str, dict[str, float]]:
    """Interleaved repetitions (so every kernel sees the same machine load)."""
    fns = {name: kernel(name, replies, block) for name in KERNELS}
    for fn in fns.values():  # warm up: imports, first-touch of the replies
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()  # CPU of every thread
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {
            "wall_median_ms": 1e3 * statistics.median(wall[name]),
            "wall_min_ms": 1e3 * min(wall[name]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
        }
        for name in fns
    }


def _vm_hwm() -> int:
    """Peak RSS of this process in bytes (``VmHWM``; Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(name: str, clients: int, params: int, block: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS during one aggregation minus RSS before it.

    The kernel's setup (e.g. wrapping replies as messages) and a warm-up on a tiny
    input happen before the baseline; the peak is reset right before the
    aggregation (``clear_refs``), so transients of building the replies cannot
    hide it.
    """
    # Warm the kernel up on a tiny input first, so the first use of library code
    # (pages of libtorch / numpy faulted in) is not counted as the kernel's memory.
    kernel(name, build_replies(2 * block + 1, 40_000, seed=1), block)()
    replies = build_replies(clients, params)
    fn = kernel(name, replies, block)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    rss_before = psutil.Process().memory_info().rss
    result = fn()
    peak = _vm_hwm()
    del result
    return {
        "replies_mib": clients * params * 4 / 2**20,
        "rss_after_replies_mib": rss_before / 2**20,
        "peak_extra_mib": (peak - rss_before) / 2**20,
    }


def measure_memory(clients: int, params: int, block: int) -> dict[str, dict[str, float]]:
    """Each kernel once in its own fresh interpreter."""
    out = {}
    for name in KERNELS:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--probe",
                name,
                "--clients",
                str(clients),
                "--params",
                str(params),
                "--block",
                str(block),
                "--threads",
                str(THREADS),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    """Parse arguments, run the timing and the memory probes, print the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument(
        "--block",
        type=int,
        default=WeightedMean({}).block,
        help="fedcore's accumulation block (default: WeightedMean's default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of fedcore's kernel (default 1, as strategy.accumulation-threads; "
        "0 = one per core, at most 4)",
    )
    p.add_argument("--probe", choices=KERNELS, help=argparse.SUPPRESS)
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.clients, args.params, args.block)))
        return

    replies = build_replies(args.clients, args.params)
    ref = kernel("flower", replies, args.block)()
    ours = kernel("fedcore", replies, args.block)()
    one_thread = kernel("fedcore-1thread", replies, args.block)()
    validated = kernel("fedcore-validated", replies, args.block)()
    exact = _exact_mean(replies)
    timing = time_kernels(replies, args.reps, args.block)
    floor = bare_adds(replies, args.reps)
    memory = measure_memory(args.clients, args.params, args.block)
    del replies
    gc.collect()

    flower = timing["flower"]["wall_median_ms"]
    result = {
        "benchmark": "aggregation",
        "clients": args.clients,
        "params": args.params,
        "reps": args.reps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}",
        "torch_threads_default": torch.get_num_threads(),
        "block": args.block,
        "threads": getattr(aggregation_pool(THREADS), "threads", 1),
        "timing": timing,
        "memory": memory,
        "flower_ms": flower,
        "fedcore_ms": timing["fedcore"]["wall_median_ms"],
        "fedcore_validated_ms": timing["fedcore-validated"]["wall_median_ms"],
        "fedcore_fedavg_ms": timing["fedcore-fedavg"]["wall_median_ms"],
        "speedup_vs_flower": flower / timing["fedcore"]["wall_median_ms"],
        "speedup_vs_flower_1thread": flower / timing["fedcore-1thread"]["wall_median_ms"],
        "speedup_vs_flower_validated": flower / timing["fedcore-validated"]["wall_median_ms"],
        "speedup_vs_flower_fedavg": flower / timing["fedcore-fedavg"]["wall_median_ms"],
        "speedup_vs_flower_cpu": timing["flower"]["cpu_median_ms"]
        / timing["fedcore"]["cpu_median_ms"],
        "peak_extra_mib": {k: v["peak_extra_mib"] for k, v in memory.items()},
        "model_mib": args.params * 4 / 2**20,
        "max_abs_diff_vs_flower": max_abs_diff(ours, ref),
        "max_abs_err_vs_exact": {
            "flower": max_abs_diff(ref, exact),
            "fedcore": max_abs_diff(ours, exact),
        },
        "validated_equals_unvalidated": all(ours[k].data == validated[k].data for k in ours),
        "threads_equal_one_thread": all(ours[k].data == one_thread[k].data for k in ours),
        **floor,
    }
    for name, t in timing.items():
        print(
            f"{name:18s} wall median {t['wall_median_ms']:7.1f} ms (min {t['wall_min_ms']:6.1f})"
            f"  cpu {t['cpu_median_ms']:7.1f} ms  peak extra "
            f"{memory[name]['peak_extra_mib']:6.1f} MiB",
            file=sys.stderr,
        )
    print(json.dumps(result))


def bare_adds(replies: list[RecordDict], reps: int) -> dict[str, float]:
    """The floor under any kernel: ``blk += n_i * theta_i`` over the largest array, nothing else.

    One thread, and two threads each owning half of the array with no synchronisation
    between replies (median ms over ``reps``): no checks, no float64 flush, no result.
    """
    import threading

    name = max(replies[0]["arrays"], key=lambda k: replies[0]["arrays"][k].numpy().size)
    views = [
        (
            torch.from_numpy(array_view(r["arrays"][name]).reshape(-1)),
            float(r["metrics"]["num-examples"]),
        )
        for r in replies
    ]
    blk = torch.empty(views[0][0].numel(), dtype=torch.float32)

    def adds(lo: int, hi: int) -> None:
        b = blk[lo:hi]
        for t, w in views:
            b.add_(t[lo:hi], alpha=w)

    def two() -> None:
        half = blk.numel() // 2
        other = threading.Thread(target=adds, args=(half, blk.numel()))
        other.start()
        adds(0, half)
        other.join()

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, float] = {}
        for label, fn in (
            ("bare_add_1thread_ms", lambda: adds(0, blk.numel())),
            ("bare_add_2threads_ms", two),
        ):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
            out[label] = statistics.median(times)
        return out
    finally:
        torch.set_num_threads(n)


def _exact_mean(replies: list[RecordDict]) -> ArrayRecord:
    """Float64 reference (each product and sum in float64), rounded to float32 once."""
    weights = np.array([r["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    out = {}
    for k in replies[0]["arrays"]:
        acc = np.zeros(replies[0]["arrays"][k].shape, dtype=np.float64)
        for r, w in zip(replies, weights, strict=True):
            acc += w * r["arrays"][k].numpy().astype(np.float64)
        out[k] = numpy_to_array((acc / weights.sum()).astype(np.float32))
    return ArrayRecord(out)


if __name__ == "__main__":
    main()
