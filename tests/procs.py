"""Find live processes by a marker in their command line or environment (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def procs_mentioning(marker: str) -> list[str]:
    """Command lines of live processes whose command line or environment mentions ``marker``."""
    found = []
    needle_b = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and (needle_b in cmd or needle_b in env):
            found.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found
