"""pytest plugin for mutation runs (``-p tests.mutation.plugin``): repeatable hypothesis.

Each mutant must meet the same generated examples as the clean run, so a verdict does
not depend on the run: examples are derandomized, no example database carries failures
from one mutant to the next, and neither a deadline nor a health check can fail a test
that the mutant merely slowed down.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fedcore-mutants",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("fedcore-mutants")
