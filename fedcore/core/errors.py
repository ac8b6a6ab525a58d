"""One exception tree for fedcore, split by what the caller can do about it.

::

    FedcoreError
    ├── ConfigError          a config value is wrong: fix the file or flag it names
    ├── ModelError           the model factory / train / evaluate plug-in is unusable
    │   └── UserCodeError    a user's train/evaluate function raised or broke its contract
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
    "USER_CODE_FAILED",
    "UserCodeError",
    "is_user_code_error",
    "user_code_origin",
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


#: How the first line of a :class:`UserCodeError` begins, wherever its text travels
#: (an error reply's reason, a rejection, a log line).
USER_CODE_FAILED = "user code failed:"


class UserCodeError(ModelError):
    """A user's function (``model.train-fn``, ``model.evaluate-fn``) raised or broke its contract.

    It fails the same way on every client and every retry, so the server shows it
    once and does not retry. The first line names the config key, the function and
    its file and line; the rest is the user's own frames of the traceback, if any.

    Parameters
    ----------
    key : str
        The config key naming the function, e.g. ``"model.train-fn"``.
    where : str
        The function and its location, e.g. ``"mymodels:train (mymodels.py:12)"``.
    what : str
        What went wrong and, for a broken contract, what the contract is.
    detail : str (default: "")
        The trimmed traceback (the user's frames).

    """

    def __init__(self, key: str, where: str, what: str, detail: str = "") -> None:
        self.key = key
        self.where = where
        self.what = what
        self.detail = detail
        first = f"{USER_CODE_FAILED} {key} = {where}; {what}"
        super().__init__(first + (f"\n{detail}" if detail else ""))


def user_code_origin(reason: str) -> str:
    """The part of a :class:`UserCodeError`'s text that says which function failed.

    ``"user code failed: model.train-fn = 'm:f' (/src/m.py:3)"``: the key, the
    function and its file, without what went wrong (its first line has that).

    >>> user_code_origin("client error: user code failed: model.train-fn = 'm:f' (m.py:3); "
    ...                  "raised ValueError: boom")
    "user code failed: model.train-fn = 'm:f' (m.py:3)"
    """
    first = reason.strip().splitlines()[0] if reason.strip() else ""
    start = first.find(USER_CODE_FAILED)
    if start < 0:
        return first
    return first[start:].split("; ", 1)[0]


def is_user_code_error(reason: str) -> bool:
    """Whether an error text (a reply's reason, a rejection) comes from a :class:`UserCodeError`.

    >>> is_user_code_error("client reported an error: user code failed: model.train-fn = f")
    True
    >>> is_user_code_error("no reply within 60 s")
    False
    """
    lines = reason.strip().splitlines()
    return bool(lines) and USER_CODE_FAILED in lines[0]


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
