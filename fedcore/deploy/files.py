"""Create files without clobbering: private keys born mode 0600, no overwrite without force."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedcore.core.errors import DeploymentError
from fedcore.storage.files import atomic_write

__all__ = ["PRIVATE", "PUBLIC", "check_kit_dir", "make_dir", "write_new"]

PRIVATE = 0o600
PUBLIC = 0o644


def make_dir(path: Path, *, mode: int = 0o755) -> None:
    """Create ``path`` (and parents) with ``mode``; an existing directory is kept."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)


def write_new(path: Path, data: bytes, *, mode: int, force: bool = False) -> None:
    """Write ``data`` to ``path`` with permission ``mode`` set when the file is created.

    Without ``force`` an existing file is an error (``O_EXCL``: no race between the
    check and the write). With ``force`` the new content goes to a temporary file
    created with ``mode`` and is renamed over the old one, so the target never
    exists with wider permissions, not even for an instant.
    """
    make_dir(path.parent)
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise DeploymentError(
                f"{path} already exists; refusing to overwrite it. "
                "Pass --force to replace it (old keys stop working)."
            ) from None
        try:
            if mode != PRIVATE:  # public files: undo the umask; keys keep their birth mode
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    # atomic_write's temporary file is created 0600 (mkstemp), then given ``mode``.
    atomic_write(path, data, mode=mode)


def check_kit_dir(kit: Path, files: tuple[str, ...], private_key: str, what: str) -> None:
    """Raise :class:`DeploymentError` unless ``kit`` holds ``files`` and its key is private."""
    for name in files:
        if not (kit / name).is_file():
            raise DeploymentError(
                f"{kit / name} is missing: --kit must be {what} made by `fedcore provision`"
            )
    mode = stat.S_IMODE((kit / private_key).stat().st_mode)
    if mode & 0o077:
        raise DeploymentError(
            f"{kit / private_key} has mode {mode:o}: private keys must not be readable by "
            f"others; run `chmod 600 {kit / private_key}`"
        )
