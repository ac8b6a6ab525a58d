"""Run a documentation page's examples verbatim: its files, its commands, its Python."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

BLOCK = re.compile(r"<!-- (file: (?P<name>\S+)|run|run-python) -->\n```\w*\n(?P<body>.*?)```", re.S)


def blocks(doc: Path) -> Iterator[tuple[str, str | None, str]]:
    """``(kind, file name, body)`` of each marked block: kind is file, run or run-python."""
    for m in BLOCK.finditer(doc.read_text()):
        yield ("file" if m["name"] else m.group(1)), m["name"], m["body"]


def run_page(doc: Path, cwd: Path) -> list[str]:
    """Write the page's files into ``cwd``, run its commands and Python there, in order.

    Only what the page promises may be importable (``PYTHONPATH`` is emptied). Every
    command must exit 0. Returns what each ``run-python`` block printed.
    """
    env = {**os.environ, "PYTHONPATH": ""}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    printed = []
    for kind, name, body in blocks(doc):
        if kind == "file":
            (cwd / str(name)).write_text(body)
        elif kind == "run":
            for line in body.strip().splitlines():
                argv = shlex.split(line)
                argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
                proc = subprocess.run(
                    argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
                )
                assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        else:
            proc = subprocess.run(
                [sys.executable, "-c", body],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr
            printed.append(proc.stdout.strip())
    return printed
