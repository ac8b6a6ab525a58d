"""Mutation testing of the critical core: ``python tests/mutation/run.py`` (``make mutants``)."""
