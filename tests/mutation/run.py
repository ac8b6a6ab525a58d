"""Mutation testing of fedcore's pure, security- and correctness-critical core (``make mutants``).

Runs mutmut (https://mutmut.readthedocs.io) on one module ("area") at a time, each with
the fast tests that cover it, and prints, as its last line, one JSON object::

    {"killed": ..., "survived": ..., "total": ..., "score": ..., "equivalent": ...,
     "modules": {"<area>": {...the same per module...}}, ...}

``score = killed / total``. A mutant whose tests ran out of time (an infinite loop) or
whose test process crashed counts as killed; one that no selected test reaches counts
as survived. Mutants listed in ``tests/mutation/equivalent.toml`` (reviewed: the mutated
code behaves as the original, or differs only where the docs leave it open) leave
``total`` and are counted in ``equivalent`` (and ``within_contract``). docs/testing.md
explains the figures and lists the reviewed survivors.

Nothing is written into the source tree: each area runs in ``mutants/<area>/`` (git-
ignored), on a snapshot copy of the sources and tests, where mutmut writes its mutated
copies under ``mutants/<area>/mutants/``. ``AREAS`` below is the one place that says
what is mutated and which tests run against it.

Usage::

    python tests/mutation/run.py                      # every area, fresh
    python tests/mutation/run.py --area shamir        # one area
    python tests/mutation/run.py --area shamir --survivors   # re-test last run's survivors
    python tests/mutation/run.py --list               # the areas and their tests
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "mutants"
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.toml"
#: What each area's sandbox holds: the library, the apps and the tests (read by the tests).
SNAPSHOT = ("fedcore", "clients", "server", "tests", "simulations", "pyproject.toml")
#: Arguments of every pytest run mutmut makes (stats, clean run, each mutant).
PYTEST_ARGS = (
    # the project's addopts may parallelise the suite (xdist); mutmut runs tests in-process
    "-o",
    "addopts=--strict-markers",
    "-p",
    "no:xdist",
    "-p",
    "no:cacheprovider",
    "-p",
    "tests.mutation.plugin",  # hypothesis: derandomized, no example database, no deadline
    "-m",
    "not slow",
    # a mutant that makes one test wait (a deadline, a queue) fails that test after 60 s,
    # well before mutmut's own wall limit for the whole run of its tests
    "--timeout=60",
)


@dataclass(frozen=True)
class Area:
    """One module under mutation and the fast tests that cover it.

    ``functions``: names (``func``, ``Class.method``, fnmatch globs) whose mutants count;
    empty means the whole file. ``deselect``: test ids of the listed files not to run
    (slow ones whose cases faster tests cover, and ones that fail under mutmut on the
    original code), each with its reason beside it.
    """

    name: str
    file: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()
    deselect: tuple[str, ...] = ()
    note: str = ""
    #: False: only run when named (``--area``), outside ``make mutants``'s time budget.
    default: bool = True

    @property
    def module(self) -> str:
        return self.file.removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        """mutmut's mutant-name patterns for ``functions`` (all of the module if none)."""
        if not self.functions:
            return [f"{self.module}.*"]
        out = []
        for name in self.functions:
            cls, _, func = name.rpartition(".")
            mangled = f"xǁ{cls}ǁ{func}" if cls else f"x_{func}"
            out.append(f"{self.module}.{mangled}__mutmut_*")
        return out


_MACHINE_TESTS = (
    "tests/test_secagg_core.py",
    "tests/test_secagg_protocol.py",
    "tests/test_secagg_exposure.py",
    "tests/test_secagg_adversarial.py",
)

AREAS: tuple[Area, ...] = (
    Area(
        "aggregation",
        "fedcore/core/aggregation.py",
        tests=(
            "tests/test_aggregation.py",
            "tests/test_aggregation_perf.py",
            "tests/test_mutants_aggregation.py",
        ),
    ),
    Area(
        "partition",
        "fedcore/clientside/partition.py",
        tests=("tests/test_partition.py", "tests/test_mutants_partition.py"),
    ),
    Area(
        "sampling",
        "fedcore/core/sampling.py",
        tests=("tests/test_sampling.py", "tests/test_mutants_sampling.py"),
    ),
    Area(
        "shamir",
        "fedcore/secagg/protocol/shamir.py",
        tests=(
            "tests/test_secagg_core.py",
            "tests/test_secagg_protocol.py",
            "tests/test_mutants_shamir.py",
        ),
    ),
    Area(
        "quantize",
        "fedcore/secagg/protocol/quantize.py",
        tests=(
            "tests/test_secagg_core.py",
            "tests/test_secagg_protocol.py",
            "tests/test_mutants_quantize.py",
        ),
    ),
    Area(
        "crypto",
        "fedcore/secagg/protocol/crypto.py",
        tests=(
            "tests/test_secagg_core.py",
            "tests/test_secagg_protocol.py",
            "tests/test_mutants_crypto.py",
        ),
    ),
    Area(
        "checkpoint",
        "fedcore/serverside/checkpoint.py",
        tests=("tests/test_checkpoint.py", "tests/test_mutants_checkpoint.py"),
    ),
    Area(
        "keys",
        "fedcore/core/keys.py",
        tests=(
            "tests/test_config.py",
            "tests/test_config_declared_once.py",
            "tests/test_flower_config.py",
            "tests/test_mutants_keys.py",
        ),
        deselect=("tests/test_config.py::test_cli_stops_before_training_with_one_message",),
    ),
    Area(
        "config",
        "fedcore/core/config.py",
        tests=(
            "tests/test_config.py",
            "tests/test_config_declared_once.py",
            "tests/test_flower_config.py",
            "tests/test_mutants_config.py",
        ),
        functions=(
            "*.cross_check",
            "Config.validate",
            "_resolve_aliases",
            "_unknown_key_hint",
            "_build_section",
            "config_from_dict",
            "config_from_flat",
        ),
        deselect=(
            "tests/test_config.py::test_cli_stops_before_training_with_one_message",
            # counts stack frames to point a deprecation warning at the caller; mutmut's
            # trampolines add frames, so it fails on the unmutated code too
            "tests/test_config_declared_once.py::"
            "test_old_key_still_works_with_one_warning_naming_the_new_key",
        ),
        note="validation only: the sections' cross-checks and the readers of raw values",
    ),
    # Being extended as this list was written (reply validation, the guard, SecAgg+'s
    # consistency check): their tests select the suite's own files only, no test_mutants_*.
    Area(
        "exchange",
        "fedcore/serverside/exchange.py",
        tests=(
            "tests/test_reply_validation.py",
            "tests/test_fault_tolerance.py",
            # strategies that take individual replies (robust ones) or summed extras
            # (SCAFFOLD's control variates) from the exchange
            "tests/test_strategy.py",
            "tests/test_strategies_oracle.py",
            "tests/test_strategy_options.py",
            "tests/test_scaffold.py",
            "tests/test_mutants_exchange.py",
        ),
        functions=("num_examples_of", "PlainExchange.aggregate"),
        deselect=(
            # 10 s of training to an optimum; the reference-step tests cover the exchange
            "tests/test_scaffold.py::test_the_papers_scaffold_reaches_the_optimum_and_fedavg_does_not",
        ),
        note="reply validation only",
    ),
    Area(
        "guard",
        "fedcore/deploy/guard.py",
        tests=("tests/test_guard_polling.py", "tests/test_mutants_guard.py"),
        deselect=(
            # these serve the guard with uvicorn, which takes mutmut's wrapper of the async
            # __call__ for an ASGI2 app and fails on the unmutated code
            "tests/test_guard_polling.py::test_open_endpoint_over_loopback_needs_the_servers_token",
            "tests/test_guard_polling.py::test_oversized_requests_get_413_and_are_logged",
        ),
    ),
    Area(
        "graph",
        "fedcore/secagg/protocol/graph.py",
        tests=(
            "tests/test_secagg_core.py",
            "tests/test_secagg_protocol.py",
            "tests/test_secagg_exposure.py",
            "tests/test_secagg_adversarial.py",
            "tests/test_mutants_graph.py",
        ),
    ),
    # The client's side of SecAgg+ is what holds against an active server (bounds on t
    # and k, the signed survivor set, refusing to unmask both secrets of a peer): in the
    # budget. The server's stages and the wire codecs (~840 more mutants, ~15 minutes on
    # two cores) run on demand: --area machine-server.
    Area(
        "machine",
        "fedcore/secagg/protocol/machine.py",
        tests=_MACHINE_TESTS,
        functions=(
            "ClientRound.*",
            "ClientLimits.check",
            "Advert.verify",
            "Advert.signed_message",
            "consistency_message",
            "set_digest",
            "ServerRound.survivor_set",
            "_t_core",
        ),
        note="the client's protocol and the survivor set",
    ),
    Area(
        "machine-server",
        "fedcore/secagg/protocol/machine.py",
        tests=_MACHINE_TESTS,
        functions=(
            "ServerRound.__init__",
            "ServerRound._*",
            "ServerRound.collect_*",
            "ServerRound.add_masked",
            "ServerRound.finish",
            "ServerRound.max_total_weight",
            "RoundParams.*",
            "Advert.to_bytes",
            "Advert.from_bytes",
            "Advert.digest",
            "rounding_key",
            "_pack",
            "_unpack",
            "_share_bytes",
            "_self_key",
            "_listing_nodes",
        ),
        note="the server's stages and the wire codecs (not in make mutants: time)",
        default=False,
    ),
)


# ------------------------------------------------------------------ equivalent mutants


#: Kinds of reviewed survivors. ``equivalent``: no input tells the mutant from the
#: original. ``within-contract``: the outputs differ only where the docs leave them open
#: (rounding inside the documented error bound, the wording of a refusal that is still
#: the same error, speed or memory that no documented limit pins).
KINDS = ("equivalent", "within-contract")


@dataclass(frozen=True)
class Equivalent:
    """A reviewed survivor: mutating ``before`` into ``after`` in ``function`` (see KINDS)."""

    file: str
    function: str
    before: str
    after: str
    kind: str
    reason: str

    def matches(self, file: str, function: str, before: str, after: str) -> bool:
        return (self.file, self.function, self.before, self.after) == (
            file,
            function,
            before,
            after,
        )


def load_equivalents(path: Path = EQUIVALENT) -> list[Equivalent]:
    """The reviewed list; every entry needs all five fields and a real reason."""
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("mutant", [])
    out = []
    for i, e in enumerate(entries):
        missing = [k for k in Equivalent.__dataclass_fields__ if k not in e]
        if missing or len(str(e.get("reason", "")).strip()) < 20 or e["kind"] not in KINDS:
            raise SystemExit(
                f"{path}: entry {i + 1} needs file, function, before, after, kind (one of "
                f"{', '.join(KINDS)}) and a reason of at least 20 characters "
                f"(missing {missing})"
            )
        out.append(Equivalent(**{k: str(e[k]) for k in Equivalent.__dataclass_fields__}))
    return out


# ------------------------------------------------------------------ results


@dataclass
class Mutant:
    """One mutant's outcome, with the stable description used by ``equivalent.toml``."""

    key: str
    function: str
    status: str
    before: str = ""
    after: str = ""
    diff: str = ""


@dataclass
class AreaResult:
    """An area's counts (``killed`` includes timeouts and crashes)."""

    name: str
    killed: int = 0
    timeout: int = 0
    survived: int = 0
    no_tests: int = 0
    equivalent: int = 0
    within_contract: int = 0
    seconds: float = 0.0
    survivors: list[Mutant] = field(default_factory=list)
    stale: list[Equivalent] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.killed + self.survived

    def row(self) -> dict[str, object]:
        return {
            "killed": self.killed,
            "survived": self.survived,
            "total": self.total,
            "score": round(self.killed / self.total, 4) if self.total else 1.0,
            "timeout": self.timeout,
            "no_tests": self.no_tests,
            "equivalent": self.equivalent,
            "within_contract": self.within_contract,
            "seconds": round(self.seconds, 1),
        }


def function_of(key: str) -> str:
    """``mod.xǁClassǁmethod__mutmut_3`` -> ``Class.method``; ``mod.x_f__mutmut_1`` -> ``f``."""
    mangled = key.rsplit("__mutmut_", 1)[0].rpartition(".")[2]
    if mangled.startswith("xǁ"):
        _, cls, func = mangled.split("ǁ")
        return f"{cls}.{func}"
    return mangled.removeprefix("x_")


def describe(diff: str) -> tuple[str, str]:
    """The removed and the added lines of a mutant's diff, each stripped (stable across edits)."""
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln[:1] == "-" and ln[:3] != "---"]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln[:1] == "+" and ln[:3] != "+++"]
    return "\n".join(minus), "\n".join(plus)


def collect(area: Area, sandbox: Path, equivalents: Sequence[Equivalent]) -> AreaResult:
    """Read mutmut's verdicts for ``area`` from its sandbox and classify them."""
    from mutmut.configuration import reset_config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    result = AreaResult(area.name)
    here = Path.cwd()
    os.chdir(sandbox)
    try:
        reset_config()
        data = SourceFileMutationData(path=Path(area.file))
        data.load()
        used: set[int] = set()
        for key, code in sorted(data.exit_code_by_key.items()):
            func = function_of(key)
            if area.functions and not any(fnmatch.fnmatchcase(func, p) for p in area.functions):
                continue
            status = status_by_exit_code[code]
            if status in ("killed", "timeout", "segfault"):
                result.killed += 1
                result.timeout += status != "killed"
                continue
            if status not in ("survived", "no tests"):
                raise SystemExit(
                    f"{area.name}: mutant {key} ended '{status}'; the run did not finish "
                    f"(see {sandbox}.log)"
                )
            diff = get_diff_for_mutant(key, path=area.file)
            before, after = describe(diff)
            hit = [
                i for i, e in enumerate(equivalents) if e.matches(area.file, func, before, after)
            ]
            if hit:
                used.update(hit)
                result.equivalent += 1
                result.within_contract += equivalents[hit[0]].kind == "within-contract"
                continue
            result.survived += 1
            result.no_tests += status == "no tests"
            result.survivors.append(Mutant(key, func, status, before, after, diff))
        result.stale = [
            e
            for i, e in enumerate(equivalents)
            if e.file == area.file
            and i not in used
            and (
                not area.functions
                or any(fnmatch.fnmatchcase(e.function, p) for p in area.functions)
            )
        ]
    finally:
        os.chdir(here)
        reset_config()
    return result


# ------------------------------------------------------------------ running mutmut


def prepare(area: Area, sandbox: Path, *, fresh: bool) -> None:
    """Snapshot the tree into ``sandbox``; write its config (pyproject + ``[tool.mutmut]``)."""
    import tomli_w

    if fresh and sandbox.exists():
        shutil.rmtree(sandbox)
    sandbox.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
    for name in SNAPSHOT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, sandbox / name, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(src, sandbox / name)
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if "[tool.mutmut]" in project:
        raise SystemExit("pyproject.toml has a [tool.mutmut] table; the areas live in AREAS")
    missing = [t for t in area.tests if not (ROOT / t.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"area {area.name}: test files {missing} do not exist")
    selection = [*area.tests, *(f"--deselect={d}" for d in area.deselect)]
    mutmut = {
        "source_paths": ["fedcore"],
        "only_mutate": [area.file],
        "also_copy": ["clients", "server", "simulations"],
        "pytest_add_cli_args_test_selection": selection,
        "pytest_add_cli_args": list(PYTEST_ARGS),
        "use_git_change_detection": False,
        # a mutant's tests are stopped after 10 x (their clean time + 5 s) of wall time and
        # twice that of CPU: generous on a busy machine (a tighter wall limit calls slow
        # runs timeouts, i.e. false kills), yet a looping mutant costs a minute, not 15 x
        "timeout_multiplier": 10.0,
        "timeout_constant": 5.0,
    }
    text = project + "\n" + tomli_w.dumps({"tool": {"mutmut": mutmut}})
    (sandbox / "pyproject.toml").write_text(text, encoding="utf-8")


def previous_verdicts(area: Area, sandbox: Path) -> dict[str, int | None]:
    """mutmut's exit codes of the last run in ``sandbox`` (for ``--survivors``)."""
    meta = sandbox / "mutants" / f"{area.file}.meta"
    if not meta.exists():
        raise SystemExit(
            f"area {area.name}: no earlier run in {sandbox}; run it without --survivors"
        )
    return json.loads(meta.read_text())["exit_code_by_key"]


def keep_verdicts(area: Area, sandbox: Path, earlier: dict[str, int | None]) -> None:
    """Write back the earlier verdicts of mutants this run did not re-test.

    mutmut forgets every verdict when an area's test selection changes; ``--survivors``
    re-tests only the survivors, so the kills of the run before stay on record.
    """
    meta = sandbox / "mutants" / f"{area.file}.meta"
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    for key, code in codes.items():
        if code is None and earlier.get(key) is not None:
            codes[key] = earlier[key]
    meta.write_text(json.dumps(data, indent=4))


def run_area(
    area: Area, equivalents: Sequence[Equivalent], *, workers: int, survivors: bool
) -> AreaResult:
    """Run mutmut on one area in its sandbox; return its classified results."""
    sandbox = WORK / area.name
    earlier = previous_verdicts(area, sandbox) if survivors else None
    if earlier is None:
        names = area.globs()
    else:  # survived (0), no tests (5, 33) or never run
        names = sorted(k for k, c in earlier.items() if c in (0, 5, 33, None))
    prepare(area, sandbox, fresh=not survivors)
    if survivors:  # map tests to functions afresh: edited tests keep their names
        (sandbox / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    env = {
        **os.environ,
        # one thread per test process: the workers share two cores with everyone else
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("PYTHONPATH", None)
    mutmut = Path(sys.executable).with_name("mutmut")
    log = WORK / f"{area.name}.log"
    start = time.monotonic()
    if names:
        with log.open("w") as out:
            rc = subprocess.call(
                [str(mutmut), "run", "--max-children", str(workers), *names],
                cwd=sandbox,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if rc != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"mutmut failed on area {area.name} (exit {rc}); {log}:\n{tail}")
    if earlier:
        keep_verdicts(area, sandbox, earlier)
    result = collect(area, sandbox, equivalents)
    result.seconds = time.monotonic() - start
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen areas one after another; print the report and the JSON last line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", action="append", choices=[a.name for a in AREAS])
    parser.add_argument("--workers", type=int, default=2, help="parallel mutants (default 2)")
    parser.add_argument(
        "--survivors", action="store_true", help="re-test only the last run's survivors"
    )
    parser.add_argument("--fail-under", type=float, default=0.0, help="exit 1 below this score")
    parser.add_argument("--list", action="store_true", help="print the areas and exit")
    parser.add_argument(
        "--table",
        action="store_true",
        help="print equivalent.toml as the Markdown table of docs/testing.md and exit",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(load_equivalents()))
        return 0
    areas = [a for a in AREAS if (a.name in args.area if args.area else a.default)]
    if args.list:
        for a in areas:
            scope = ", ".join(a.functions) or "whole file"
            print(f"{a.name:12} {a.file} ({scope})\n{'':12} tests: {' '.join(a.tests)}")
        return 0
    equivalents = load_equivalents()
    WORK.mkdir(exist_ok=True)
    results = []
    for area in areas:
        print(f"== {area.name}: {area.file}", flush=True)
        res = run_area(area, equivalents, workers=args.workers, survivors=args.survivors)
        results.append(res)
        row = res.row()
        print(
            f"   {row['killed']}/{row['total']} killed (score {row['score']}), "
            f"{row['equivalent']} equivalent, {row['seconds']} s",
            flush=True,
        )
        for m in res.survivors:
            print(f"   SURVIVED {m.key} ({m.status}) in {m.function}")
            print(_indent("- " + m.before.replace("\n", "\n- "), 6))
            print(_indent("+ " + m.after.replace("\n", "\n+ "), 6))
        for e in res.stale:
            print(
                f"   STALE equivalent entry (no such surviving mutant): {e.function}: {e.before!r}"
            )
    killed = sum(r.killed for r in results)
    total = sum(r.total for r in results)
    summary = {
        "killed": killed,
        "survived": sum(r.survived for r in results),
        "total": total,
        "score": round(killed / total, 4) if total else 1.0,
        "timeout": sum(r.timeout for r in results),
        "no_tests": sum(r.no_tests for r in results),
        "equivalent": sum(r.equivalent for r in results),
        "within_contract": sum(r.within_contract for r in results),
        "stale_equivalents": sum(len(r.stale) for r in results),
        "seconds": round(sum(r.seconds for r in results), 1),
        "modules": {r.name: r.row() for r in results},
    }
    report = {
        **summary,
        "survivors": [{"area": r.name, **m.__dict__} for r in results for m in r.survivors],
    }
    (WORK / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary))
    return 1 if summary["score"] < args.fail_under else 0


def markdown_table(equivalents: Sequence[Equivalent]) -> str:
    """The reviewed survivors as a Markdown table (file, function, mutation, kind, reason)."""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    rows = [
        "| file | function | mutation (before → after) | kind | why no test can fail |",
        "|---|---|---|---|---|",
    ]
    for e in equivalents:
        before = cell(e.before).replace("`", "'")
        after = cell(e.after).replace("`", "'") or "(removed)"
        rows.append(
            f"| `{e.file.rsplit('/', 1)[-1]}` | `{e.function}` | `{before}` → `{after}` "
            f"| {e.kind} | {cell(e.reason)} |"
        )
    return "\n".join(rows)


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
