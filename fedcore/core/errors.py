"""One exception tree for fedcore, split by what the caller can do about it.

::

    FedcoreError
    ├── ConfigError          a config value is wrong: fix the file or flag it names
    ├── ModelError           the model factory / train / evaluate plug-in is unusable
    ├── DataError            a dataset or data file cannot be read or split as asked
    ├── AggregationError     replies cannot be combined (shapes, keys, weights)
    ├── ReplyError           one client's reply is malformed; carries client_id, stage
    ├── RoundFailedError     a round could not complete (too few replies); model kept
    ├── CheckpointError      a checkpoint is missing, corrupt or from another run
    ├── SecureAggregationError   a secure-aggregation protocol step failed
    ├── EngineError          an engine could not start or finish the apps' run
    └── DeploymentError      provisioning, a kit, or a deployment process is unusable

Every message says what was expected, what was found and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeploymentError",
    "EngineError",
    "FedcoreError",
    "ModelError",
    "ReplyError",
    "RoundFailedError",
    "SecureAggregationError",
]


class FedcoreError(Exception):
    """Base of every error fedcore raises on purpose."""


class ConfigError(FedcoreError):
    """A configuration value is invalid.

    Parameters
    ----------
    key : str
        Dotted config key, e.g. ``"data.alpha"``.
    value : object
        The offending value as found.
    allowed : str
        What would be accepted, phrased so the user can act on it.

    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"config key '{key}' has value {value!r}: {allowed}")


class ModelError(FedcoreError):
    """The model factory or a custom train/evaluate function cannot be used."""


class DataError(FedcoreError):
    """A dataset or data file cannot be loaded or partitioned as configured."""


class AggregationError(FedcoreError):
    """Replies cannot be aggregated together (inconsistent keys, shapes or weights)."""


class ReplyError(FedcoreError):
    """One client's reply was rejected.

    Parameters
    ----------
    client_id : int
        Node id of the client whose reply was rejected.
    stage : str
        Protocol stage, e.g. ``"train"`` or ``"evaluate"``.
    reason : str
        Why it was rejected.

    """

    def __init__(self, client_id: int, stage: str, reason: str) -> None:
        self.client_id = client_id
        self.stage = stage
        self.reason = reason
        super().__init__(f"client {client_id} ({stage}): {reason}")


class RoundFailedError(FedcoreError):
    """A round could not be completed; the previous global model is kept."""


class CheckpointError(FedcoreError):
    """A checkpoint cannot be used to resume (missing, corrupt, or mismatched)."""


class SecureAggregationError(FedcoreError):
    """A secure-aggregation step failed (bad signature, tampered share, too few peers)."""


class EngineError(FedcoreError):
    """A simulation engine could not start or finish a run (a process failed, a timeout)."""


class DeploymentError(FedcoreError):
    """Provisioning, a kit, or a deployment process (server, client) is unusable."""
