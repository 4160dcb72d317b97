"""Shared fixtures, kept in one module per real part so each has one owner."""

from tests.fixtures_broker import *  # noqa: F401,F403  private Mosquitto brokers on free ports
from tests.fixtures_models import *  # noqa: F401,F403  synthetic GGUF models

