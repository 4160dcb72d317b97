"""Shared fixtures, kept in one module per real part so each has one owner."""

import os

from hypothesis import settings

from tests.fixtures_broker import *  # noqa: F401,F403  private Mosquitto brokers on free ports
from tests.fixtures_models import *  # noqa: F401,F403  synthetic GGUF models

# The default run must be deterministic: property-based tests draw the same cases every run (a
# fuzzer that finds a new bug must not fail one CI run in ten). To explore new cases, run with
# HYPOTHESIS_PROFILE=explore; a failure it finds becomes a fixed example in the test.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
