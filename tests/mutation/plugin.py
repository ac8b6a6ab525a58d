"""pytest plugin for mutation runs (``-p tests.mutation.plugin``): repeatable hypothesis.

Each mutant must meet the same generated examples as the clean run, so a verdict does
not depend on the run: examples are derandomized, no example database carries failures
from one mutant to the next, and neither a deadline nor a health check can fail a test
that the mutant merely slowed down.
"""

import sys

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fedcore-mutants",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("fedcore-mutants")


@pytest.fixture(autouse=True)
def _fresh_fedcore_caches():
    """Empty fedcore's memoizing caches before each test, as in a fresh process.

    mutmut forks every mutant's test run from a process that has already run the tests
    on the original code, so an ``lru_cache`` (the kernel's ``.npy`` header parser, say)
    would answer from the original's results and hide the mutant.
    """
    for name, module in list(sys.modules.items()):
        if name == "fedcore" or name.startswith("fedcore."):
            for value in list(vars(module).values()):
                clear = getattr(value, "cache_clear", None)
                if callable(clear):
                    clear()
