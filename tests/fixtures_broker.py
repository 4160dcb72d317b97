"""Fixtures that run private Mosquitto brokers (owner: transport).

``broker``: one plain broker with persistence, fresh per test. ``broker_factory``: make
several, or custom ones (TLS, passwords, ACL, not started yet). ``tls_material``: a CA,
a server certificate and per-device client certificates, once per session. Every broker
made here is stopped at teardown, whether the test passed or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker import MosquittoBroker, TLSFiles, make_tls_material

__all__ = ["broker", "broker_factory", "tls_material"]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    made: list[MosquittoBroker] = []

    def make(name: str | None = None, *, start: bool = True, **kwargs: Any) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / (name or f"broker{len(made)}"), **kwargs)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        try:
            b.stop(timeout=5)
        except Exception:  # one broker failing to stop must not leave the others running
            b.kill()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    return broker_factory("broker")


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_material(tmp_path_factory.mktemp("tls"))
