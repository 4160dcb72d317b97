"""Shared fixtures, kept in one module per real part so each has one owner."""

import logging
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

from agent.ops.logs import _AgentHandler
from tests.fixtures_broker import *  # noqa: F401,F403  private Mosquitto brokers on free ports
from tests.fixtures_models import *  # noqa: F401,F403  synthetic GGUF models

# The default run must be deterministic: property-based tests draw the same cases every run (a
# fuzzer that finds a new bug must not fail one CI run in ten). To explore new cases, run with
# HYPOTHESIS_PROFILE=explore; a failure it finds becomes a fixed example in the test.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _root_logger_restored():  # type: ignore[no-untyped-def]
    """A test that runs the CLI in-process installs the agent's log handler on pytest's capture
    stream, which is closed after that test: take that handler off again, so a later test's
    log lines never go to a closed stream."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if isinstance(h, _AgentHandler) and h not in before:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _own_state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --demo` records where it runs in $XDG_STATE_HOME, and commands without -c read that
    record: each test gets its own, so no test reads or writes the person's own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
def readonly_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A folder the store cannot write to: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    d_ = tmp_path / "ro"
    d_.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d_)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        yield d_
        subprocess.run(["umount", "-l", str(d_)], check=False)
    else:
        d_.chmod(0o555)
        yield d_
        d_.chmod(0o755)
