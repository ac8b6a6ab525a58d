"""Datasets: scikit-learn's digits, a synthetic generator and users' own files.

A :class:`Dataset` is two arrays: ``x`` (float32, one row per example, any
example shape) and ``y`` (int64 class labels ``0..num_classes-1``). Files:

- ``.npz`` holding arrays ``x`` and ``y`` (read with ``allow_pickle=False``);
- ``.csv`` with a header row, numeric feature columns and an integer label
  column (``data.label-column``, default ``label``).

For simulation, :func:`simulation_split` holds out a test set for the server and
splits the rest among clients; :func:`client_data` returns one client's part
and nothing else.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcore.clientside.partition import partition
from fedcore.core.config import DataConfig
from fedcore.core.errors import DataError
from fedcore.core.seeds import derive_seed, rng

log = logging.getLogger("fedcore")

__all__ = [
    "ENCODE_HINT",
    "ClientData",
    "Dataset",
    "cached_simulation_split",
    "client_data",
    "label_warnings",
    "load_dataset",
    "holdout",
    "load_file",
    "simulation_split",
    "split_local",
]


@dataclass(frozen=True)
class Dataset:
    """Examples ``x`` (float32) and integer labels ``y`` (int64)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} examples but y has {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> Dataset:
        """The examples at ``idx`` (a copy: the subset does not keep the rest alive)."""
        return Dataset(self.x[idx].copy(), self.y[idx].copy(), self.num_classes)


@dataclass(frozen=True)
class ClientData:
    """One client's own examples: a local training part and a local validation part."""

    train: Dataset
    val: Dataset


#: How to turn labels that are not integers 0..C-1 into such labels.
ENCODE_HINT = (
    "encode the labels as integers 0..C-1 before saving, e.g. "
    "classes, y = np.unique(labels, return_inverse=True) (classes[i] names class i)"
)


def _labels(y: np.ndarray, source: str) -> tuple[np.ndarray, int]:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be one-dimensional, found shape {y.shape}")
    if y.size == 0:
        raise DataError(f"{source}: no examples")
    if not np.issubdtype(y.dtype, np.number):
        first = y.flat[0].item() if hasattr(y.flat[0], "item") else y.flat[0]
        raise DataError(
            f"{source}: labels must be integers 0..C-1, found dtype {y.dtype} "
            f"(e.g. {first!r}): {ENCODE_HINT}"
        )
    if not np.all(np.isfinite(y)) or not np.all(np.mod(y, 1) == 0):
        bad = y[~(np.isfinite(y) & (np.mod(np.nan_to_num(y), 1) == 0))][0].item()
        raise DataError(
            f"{source}: labels must be integers 0..C-1, found {bad!r} (dtype {y.dtype}): "
            f"{ENCODE_HINT}"
        )
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}: {ENCODE_HINT}")
    return y, int(y.max()) + 1


def label_warnings(y: np.ndarray, num_classes: int, source: str) -> list[str]:
    """Why labels ``y`` look wrong for ``num_classes`` inferred classes (empty list: fine).

    Labels that do not start at 0, or leave a class between 0 and the largest label
    without examples, usually mean the labels are not encoded as ``0..C-1``::

        >>> label_warnings(np.array([1, 2, 2, 1]), 3, "d.npz")[0].split(";")[0]
        'd.npz: labels start at 1, not 0, so class 0 has no examples and 3 classes are assumed'
    """
    counts = np.bincount(y, minlength=num_classes)
    out: list[str] = []
    low = int(y.min())
    if low > 0:
        out.append(
            f"{source}: labels start at {low}, not 0, so class"
            f"{' 0' if low == 1 else f'es 0..{low - 1}'} {'has' if low == 1 else 'have'} no "
            f"examples and {num_classes} classes are assumed; if the labels are "
            f"{low}..{int(y.max())}, subtract {low} ({ENCODE_HINT}), or set data.num-classes "
            "if the missing classes are real"
        )
    empty = [int(c) for c in np.flatnonzero(counts == 0) if c >= low]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        out.append(
            f"{source}: class(es) {shown} of 0..{num_classes - 1} have no examples; the model "
            f"still gets {num_classes} outputs ({ENCODE_HINT}, or set data.num-classes)"
        )
    return out


def _features(x: np.ndarray, source: str) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: features must be numeric, found dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{source}: features contain NaN or Inf")
    return x


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits as ``(N, 1, 8, 8)`` in [0, 1].

    Read straight from the CSV scikit-learn ships (what ``load_digits`` reads),
    without importing scikit-learn: that import (with SciPy) costs about 1.3 s
    and 75 MB in every process that loads the data, i.e. every simulation worker.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    files = [Path(r) / "datasets" / "data" / "digits.csv.gz" for r in roots]
    if files and files[0].is_file():
        data = np.loadtxt(files[0], delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:  # pragma: no cover - a scikit-learn without the bundled file
        from sklearn.datasets import load_digits as _load

        d = _load()
        images, target = d.images, d.target
    x = (images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset(x, target.astype(np.int64), 10)


def make_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Gaussian-cluster classification data (scikit-learn ``make_classification``)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=cfg.synthetic_examples,
        n_features=cfg.synthetic_features,
        n_informative=max(2, cfg.synthetic_features // 2),
        n_redundant=0,
        n_classes=cfg.synthetic_classes,
        n_clusters_per_class=1,
        random_state=np.random.RandomState(rng(seed, "synthetic").integers(2**31)),
    )
    return Dataset(x.astype(np.float32), y.astype(np.int64), cfg.synthetic_classes)


def load_file(path: str | Path, *, label_column: str = "label", num_classes: int = 0) -> Dataset:
    """Read a user's ``.npz`` (arrays ``x``, ``y``) or ``.csv`` (header + label column).

    ``num_classes`` > 0 fixes the class count (a client's file may lack some
    classes); labels must then be below it. 0 infers ``max(y) + 1``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"data file '{p}' does not exist (data.path in a config, or a client's own "
            "file: `fedcore client --data FILE`)"
        )
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                missing = {"x", "y"} - set(f.files)
                if missing:
                    raise DataError(
                        f"{p}: missing array(s) {sorted(missing)}; found {sorted(f.files)}. "
                        "Save with np.savez(path, x=features, y=labels)"
                    )
                x, y = f["x"], f["y"]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt zip, object arrays, ...
            raise DataError(f"{p}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    elif suffix == ".csv":
        x, y = _read_csv(p, label_column)
    else:
        raise DataError(f"{p}: unsupported file type '{suffix}'; use .npz or .csv")
    y, inferred = _labels(y, str(p))
    if num_classes and inferred > num_classes:
        raise DataError(
            f"{p}: label {inferred - 1} found but data.num-classes = {num_classes}; "
            f"labels must be in 0..{num_classes - 1}"
        )
    if not num_classes:  # (with data.num-classes set, a client may lack classes)
        for warning in label_warnings(y, inferred, str(p)):
            log.warning("%s", warning)
    return Dataset(_features(x, str(p)), y, num_classes or inferred)


def _read_csv(p: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{p}: empty CSV file") from None
        header = [h.strip() for h in header]
        if label_column not in header:
            raise DataError(
                f"{p}: no label column '{label_column}' in header {header}; set data.label-column"
            )
        li = header.index(label_column)
        rows: list[list[float]] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{p}:{line_no}: {len(row)} fields, header has {len(header)}")
            try:
                rows.append([float(v) for v in row])
            except ValueError:
                raise _cell_error(p, line_no, header, row, li) from None
    if not rows:
        raise DataError(f"{p}: no data rows")
    table = np.asarray(rows, dtype=np.float64)
    return np.delete(table, li, axis=1), table[:, li]


def _cell_error(p: Path, line_no: int, header: list[str], row: list[str], li: int) -> DataError:
    """The first non-numeric cell of ``row``: its column, row and value."""
    for j, value in enumerate(row):
        try:
            float(value)
        except ValueError:
            where = f"{p}:{line_no}: column '{header[j]}' (column {j + 1}) has value {value!r}"
            if j == li:
                return DataError(f"{where}: labels must be integers 0..C-1: {ENCODE_HINT}")
            return DataError(
                f"{where}: features must be numbers; encode or drop that column before "
                "training (fedcore reads every column but the label as a feature)"
            )
    return DataError(f"{p}:{line_no}: a non-numeric value")  # pragma: no cover


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The whole dataset named by ``data.source``."""
    if cfg.source == "digits":
        return load_digits()
    if cfg.source == "synthetic":
        return make_synthetic(cfg, seed)
    return load_file(cfg.path, label_column=cfg.label_column, num_classes=cfg.num_classes)


def _split(n: int, fraction: float, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (rest, held-out) index split; held-out has ``round(n*fraction)`` items."""
    perm = gen.permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass(frozen=True)
class SimulationSplit:
    """The held-out test set and the per-client index lists into ``train``."""

    train: Dataset
    test: Dataset
    parts: tuple[np.ndarray, ...]


def holdout(cfg: DataConfig, *, seed: int) -> tuple[Dataset, Dataset]:
    """Load the dataset and split it into (train, test); the server keeps the test part."""
    data = load_dataset(cfg, seed)
    train_idx, test_idx = _split(len(data), cfg.test_fraction, rng(seed, "test-split"))
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f"{len(data)} examples with data.test-fraction={cfg.test_fraction} leaves an empty "
            "train or test set"
        )
    return data.subset(train_idx), data.subset(test_idx)


def simulation_split(cfg: DataConfig, *, seed: int, num_clients: int) -> SimulationSplit:
    """Hold out ``test-fraction`` for the server and partition the rest among clients."""
    train, test = holdout(cfg, seed=seed)
    parts = partition(
        train.y,
        num_clients,
        method=cfg.partition,
        rng=rng(seed, "partition"),
        alpha=cfg.alpha,
        shards_per_client=cfg.shards_per_client,
    )
    return SimulationSplit(train, test, tuple(parts))


@functools.lru_cache(maxsize=4)
def _cached_split(cfg: DataConfig, seed: int, num_clients: int) -> SimulationSplit:
    return simulation_split(cfg, seed=seed, num_clients=num_clients)


def cached_simulation_split(cfg: DataConfig, *, seed: int, num_clients: int) -> SimulationSplit:
    """:func:`simulation_split`, computed once per process (what :func:`client_data` reads).

    ``fedcore simulate``'s preflight calls it before the engine forks its worker
    processes, which then share the loaded data with the server instead of loading
    and splitting it again inside round 1 (the 1,000-client round: ~0.1 s, measured,
    and the copies' memory). Treat the arrays as read-only.
    """
    return _cached_split(cfg, seed, num_clients)


def split_local(data: Dataset, val_fraction: float, seed: int) -> ClientData:
    """Split one client's examples into local train and validation parts.

    The validation part has ``round(n * val_fraction)`` examples, at least one when
    ``n >= 2`` and ``val_fraction > 0``; a client with a single example validates on it.
    """
    n = len(data)
    k = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    elif n < 2:
        k = 0
    perm = rng(seed, "val-split").permutation(n)
    train = data.subset(np.sort(perm[k:]))
    val = data.subset(np.sort(perm[:k])) if k > 0 else train
    return ClientData(train, val)


def client_data(
    cfg: DataConfig, *, seed: int, partition_id: int, num_partitions: int
) -> ClientData:
    """Simulation client ``partition_id``'s own data (its partition, split train/val)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    split = _cached_split(cfg, seed, num_partitions)
    own = split.train.subset(split.parts[partition_id])
    return split_local(own, cfg.val_fraction, seed=derive_seed(seed, "client", partition_id))
