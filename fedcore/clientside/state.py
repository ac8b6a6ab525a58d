"""Client state that outlives one message: versioned by round, atomic, resumable.

A client keeps arrays between rounds (SCAFFOLD's control variate ``c_i``; local
layers and accountants later). Each named item is stored once per server round
that wrote it, and a round reads *the latest version written for an earlier
round*::

    save("scaffold", 7, arrays)   # after training in round 7
    load("scaffold", 8)           # -> round 7's arrays (or the latest < 8)
    load("scaffold", 7)           # -> the latest < 7: a re-run of round 7 starts
                                  #    from the same state as the first run did

Only the last two versions are kept. That is what makes a server restart exact:
a server killed after its clients wrote round ``r + 1`` but before its own
checkpoint of ``r + 1`` resumes from round ``r`` and re-runs ``r + 1``; its clients
read their round-``r`` state again and write the same round-``r + 1`` state, so the
resumed run is bit-identical to an uninterrupted one.

Two backends, one behaviour:

- a directory (the node config's ``state-dir``; in simulation
  ``<run-dir>/client-state/<partition-id>``): one safetensors file per version,
  ``<name>.r<round>.safetensors``, written by write-fsync-rename
  (:func:`fedcore.storage.files.atomic_write`), so a crash leaves the old version or
  the new one, never half of one. Nothing is ever unpickled.
- otherwise Flower's per-node ``context.state`` (a ``RecordDict`` that lives as long
  as the node's process): one ArrayRecord per version, ``fedcore.<name>.r<round>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, RecordDict

from fedcore.core.aggregation import array_view, numpy_to_array
from fedcore.storage.files import arrays_from_safetensors, arrays_to_safetensors, atomic_write

__all__ = ["KEEP_VERSIONS", "STATE_DIR", "ClientState"]

#: Node-config key naming the client's state directory.
STATE_DIR = "state-dir"
#: Versions kept per item (the one a re-run round reads, and the newest).
KEEP_VERSIONS = 2

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SUFFIX = ".safetensors"


class ClientState:
    """One client's versioned arrays, in a directory or in ``context.state``.

    Parameters
    ----------
    directory : str or Path, optional
        Where the versions live (created on the first save).
    records : RecordDict, optional
        Flower's ``context.state``, used when there is no directory.

    Examples
    --------
    >>> from flwr.app import RecordDict
    >>> state = ClientState(records=RecordDict())
    >>> state.save("demo", 1, {"w": np.array([1.0])})
    >>> state.save("demo", 2, {"w": np.array([2.0])})
    >>> state.load("demo", 2)["w"].tolist(), state.load("demo", 3)["w"].tolist()
    ([1.0], [2.0])
    >>> state.load("demo", 1) is None
    True

    """

    def __init__(
        self, directory: str | Path | None = None, *, records: RecordDict | None = None
    ) -> None:
        if directory is None and records is None:
            raise ValueError("ClientState needs a directory or a RecordDict")
        self.directory = Path(directory) if directory is not None else None
        self.records = records

    @classmethod
    def of(cls, context: Context) -> ClientState:
        """The node's store: ``state-dir`` from its node config, else ``context.state``."""
        directory = context.node_config.get(STATE_DIR)
        if directory:
            return cls(str(directory))
        return cls(records=context.state)

    # -- versions -------------------------------------------------------------
    def versions(self, name: str) -> list[int]:
        """Rounds for which ``name`` has a stored version, ascending."""
        _check_name(name)
        if self.directory is None:
            assert self.records is not None
            prefix = f"fedcore.{name}.r"
            keys = [k[len(prefix) :] for k in self.records.keys() if k.startswith(prefix)]
        else:
            if not self.directory.is_dir():
                return []
            prefix = f"{name}.r"
            keys = [
                f[len(prefix) : -len(_SUFFIX)]
                for f in os.listdir(self.directory)
                if f.startswith(prefix) and f.endswith(_SUFFIX)
            ]
        return sorted(int(k) for k in keys if k.isdigit())

    def load(self, name: str, server_round: int) -> dict[str, np.ndarray] | None:
        """The latest version of ``name`` written for a round before ``server_round``."""
        earlier = [r for r in self.versions(name) if r < server_round]
        if not earlier:
            return None
        version = earlier[-1]
        if self.directory is None:
            assert self.records is not None
            record = self.records.array_records[f"fedcore.{name}.r{version}"]
        else:
            record = arrays_from_safetensors(self._path(name, version).read_bytes())
        return {k: np.array(array_view(a)) for k, a in record.items()}

    def save(self, name: str, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Store ``arrays`` as round ``server_round``'s version; keep the last two.

        Versions for later rounds (left by a run that went further before a
        restart) are stale and removed, as is everything before the previous
        version; a temporary file a crash left behind is removed too.
        """
        _check_name(name)
        record = ArrayRecord({k: numpy_to_array(np.asarray(v)) for k, v in arrays.items()})
        if self.directory is None:
            assert self.records is not None
            self.records[f"fedcore.{name}.r{server_round}"] = record
        else:
            meta = {"name": name, "round": server_round}
            data = arrays_to_safetensors(record, metadata=meta)
            atomic_write(self._path(name, server_round), data, mode=0o600)
        older = [r for r in self.versions(name) if r < server_round]
        keep = {server_round, *older[-(KEEP_VERSIONS - 1) :]}
        for version in self.versions(name):
            if version not in keep:
                self._delete(name, version)
        self._sweep(name)

    # -- helpers ----------------------------------------------------------------
    def _path(self, name: str, version: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.r{version:08d}{_SUFFIX}"

    def _delete(self, name: str, version: int) -> None:
        if self.directory is None:
            assert self.records is not None
            del self.records[f"fedcore.{name}.r{version}"]
        else:
            self._path(name, version).unlink(missing_ok=True)

    def _sweep(self, name: str) -> None:
        """Remove temporary files an interrupted :func:`atomic_write` left behind."""
        if self.directory is None:
            return
        prefix = f".{name}.r"
        for f in os.listdir(self.directory):
            if f.startswith(prefix) and f.endswith(".tmp"):
                (self.directory / f).unlink(missing_ok=True)


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(
            f"client-state name {name!r} must be lower-case letters, digits, '-' or '_'"
        )
