"""What the server tells its operator: thin dropout margins, why clients were dropped, its test set.

- :func:`dropout_margin_warnings`: settings under which one client dropping out voids
  (or stalls) every round, each naming the keys and the fix; :func:`serve` logs them once.
- :class:`DropReporter`: an observer that logs each dropped client (its kit name where
  the server can tell it, its node id, the stage, the first line of the reason) and keeps
  them in ``<run-dir>/dropped.json``, which ``fedcore server`` prints as they come.
- :func:`server_data_line`: how many rows of its data the server evaluates on, and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedcore.core.config import Config
from fedcore.core.records import Rejection
from fedcore.core.sampling import sample_size
from fedcore.serverside.rounds import Observer, RoundRecord
from fedcore.storage.files import write_json

__all__ = [
    "DROPPED_FILE",
    "DropReporter",
    "client_names",
    "describe_stage",
    "dropout_margin_warnings",
    "format_drop",
    "read_dropped",
    "server_data_line",
]

log = logging.getLogger("fedcore")

#: The run directory's list of dropped clients (round, node, client, stage, reason).
DROPPED_FILE = "dropped.json"

#: Secure-aggregation stages by the names the exchange records them under.
_SECAGG_STAGES = {
    "secagg-keys": "SecAgg+ keys stage",
    "secagg-shares": "SecAgg+ shares stage",
    "secagg-masked": "SecAgg+ masked-input stage (training or evaluation)",
    "secagg-confirm": "SecAgg+ confirm stage",
    "secagg-unmask": "SecAgg+ unmask stage",
}


def dropout_margin_warnings(cfg: Config, num_nodes: int) -> list[str]:
    """Settings under which one client dropping out voids or stalls every round.

    ``num_nodes`` is the number of clients expected (``run.clients``). Each warning
    names the keys, the values and the fix::

        >>> from fedcore.core.config import config_from_dict
        >>> cfg = config_from_dict({"run": {"clients": 3}})  # secure aggregation is on
        >>> [w.split(" per round")[0] for w in dropout_margin_warnings(cfg, 3)]
        ['secure aggregation over 3 client(s)']
        >>> dropout_margin_warnings(cfg.replace(run={"clients": 4}), 4)
        []
    """
    out: list[str] = []
    n = int(num_nodes)
    if n < 1:
        return out
    r, s = cfg.round, cfg.strategy
    if r.min_available_clients >= n:
        out.append(
            f"round.min-available-clients = {r.min_available_clients} with {n} client(s): "
            f"every round waits until all {n} are connected, so one client offline stalls "
            f"the run for round.timeout ({r.timeout:g} s) each round; set "
            f"round.min-available-clients = {n - 1} (or connect more clients)"
        )
    sample = sample_size(n, fraction=s.fraction_train, minimum=s.min_train_clients)
    if sample and r.min_train_replies >= sample:
        out.append(
            f"round.min-train-replies = {r.min_train_replies} and each round samples "
            f"{sample} client(s) (strategy.fraction-train = {s.fraction_train:g}, "
            f"strategy.min-train-clients = {s.min_train_clients}, {n} client(s)): one client "
            f"that fails voids the round; set round.min-train-replies = {max(1, sample - 1)} "
            "or sample more clients"
        )
    if cfg.secagg.enabled and sample >= 3:
        from fedcore.secagg.protocol.graph import resolve

        k, t = resolve(sample, cfg.secagg.neighbours, cfg.secagg.threshold)
        if sample == 3 or t >= k:
            out.append(
                f"secure aggregation over {sample} client(s) per round: each has k = {k} "
                f"neighbour(s) and threshold t = {t} (secagg.neighbours = "
                f"{cfg.secagg.neighbours}, secagg.threshold = {cfg.secagg.threshold}; 0 = "
                "auto), and at least 3 masked inputs are needed, so one client dropping out "
                "after the keys stage voids the round for every client; run at least 4 "
                "clients per round (and keep secagg.threshold below secagg.neighbours), or "
                "set [secagg] enabled = false"
            )
    return out


def describe_stage(stage: str) -> str:
    """A rejection's stage for people: ``train``, ``evaluate``, or the SecAgg+ stage."""
    return _SECAGG_STAGES.get(stage, stage)


def client_names(node_keys: Mapping[int, Any], admitted_path: str | Path | None) -> dict[int, str]:
    """Node id -> the client's kit name, where its registered key is in the admitted list.

    ``node_keys`` are the identity keys the SuperLink authenticated each node with
    (:func:`fedcore.runtime.serve.registered_node_keys`); ``admitted_path`` is the
    server kit's ``admitted.json`` (the ServerApp's node config ``admitted-list``).
    Anything unreadable gives no names (the node id is shown instead).
    """
    if not node_keys or not admitted_path:
        return {}
    try:
        from fedcore.storage.keys import load_admitted_keys, public_key_pem

        by_key = {public_key_pem(k): name for name, k in load_admitted_keys(admitted_path).items()}
        return {
            node: by_key[pem]
            for node, key in node_keys.items()
            if (pem := public_key_pem(key)) in by_key
        }
    except Exception:  # noqa: BLE001 - names are a courtesy: fall back to node ids
        log.debug("client names unavailable", exc_info=True)
        return {}


class DropReporter(Observer):
    """Logs why each client was dropped and keeps the list in ``<run-dir>/dropped.json``.

    Parameters
    ----------
    run_dir : Path
        Where ``dropped.json`` is (re)written atomically after each round with drops.
    names : callable
        ``() -> {node id: kit name}``, asked when each round starts (while its clients
        are connected) and again when an unknown node is dropped.
    history : sequence of dict (default: empty)
        Entries already in ``dropped.json`` (a resumed run keeps them).

    """

    def __init__(
        self,
        run_dir: Path,
        names: Callable[[], Mapping[int, str]],
        history: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.path = Path(run_dir) / DROPPED_FILE
        self._names = names
        self._known: dict[int, str] = {}
        self.entries: list[dict[str, Any]] = [dict(e) for e in history]
        self._named_round: int | None = None
        self._said: dict[str, int] = {}  # reason -> the round whose log line gave it

    def _refresh(self) -> None:
        try:
            self._known.update(self._names())
        except Exception:  # noqa: BLE001 - a name is a courtesy
            log.debug("client names unavailable", exc_info=True)

    def stage_started(self, server_round: int, stage: str, num_messages: int) -> None:
        """Learn the names of the round's clients while they are connected."""
        if server_round != self._named_round:
            self._named_round = server_round
            self._refresh()

    def name_of(self, node: int) -> str:
        """``client-3 (node 123)`` where the kit name is known, else ``node 123``."""
        if node not in self._known:
            self._refresh()
        name = self._known.get(node)
        return f"{name} (node {node})" if name else f"node {node}"

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        """Log the round's rejections (one line per stage and reason) and rewrite ``dropped.json``.

        A reason already logged in an earlier round is not repeated: the line says
        "the same reason as in round N".
        """
        if not rejected:
            return
        groups: dict[tuple[str, str], list[str]] = {}
        for r in rejected:
            reason = r.reason.strip().splitlines()[0] if r.reason.strip() else "no reason given"
            who = self.name_of(int(r.node_id))
            stage = describe_stage(r.stage)
            groups.setdefault((stage, reason), []).append(who)
            self.entries.append(
                {
                    "round": int(record.round),
                    "node": int(r.node_id),
                    "client": who,
                    "stage": stage,
                    "reason": reason,
                }
            )
        for (stage, reason), who in groups.items():
            if reason in self._said:
                text = f"the same reason as in round {self._said[reason]}"
            else:
                self._said[reason] = record.round
                text = reason
            log.warning("round %d: dropped %s at %s: %s", record.round, ", ".join(who), stage, text)
        write_json(self.path, self.entries)


def read_dropped(run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``<run-dir>/dropped.json`` (none if it is absent or unreadable)."""
    import json

    try:
        entries = json.loads((Path(run_dir) / DROPPED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def format_drop(entry: Mapping[str, Any]) -> str:
    """One line of ``fedcore server``'s output for a ``dropped.json`` entry."""
    return (
        f"  round {entry.get('round')}: dropped {entry.get('client')} at "
        f"{entry.get('stage')}: {entry.get('reason')}"
    )


def server_data_line(cfg: Config, total: int, test_rows: int) -> str:
    """How many rows the server evaluates on, and why (its held-out test fraction)."""
    where = f"data.path = {cfg.data.path}" if cfg.data.source == "file" else cfg.data.source
    return (
        f"the server evaluates the global model on {test_rows} of the {total} example(s) "
        f"of its own data ({where}): data.test-fraction = {cfg.data.test_fraction:g} is "
        "held out (seeded by run.seed); the other rows are not used by a deployment server "
        "(set data.test-fraction to use more of them, see docs/deployment.md)"
    )
