"""What the docs say about the shadow is what the board does (issue 17, section 3):

- docs/shadow.md's `swap.policy=zram` example prints the note the daemon really gives (the agent hands
  swap to its root unit; it used to say the agent does not manage swap);
- docs/protocol.md's topic table is generated from Topics and lists every topic the device uses,
  `{root}/events` among them; a topic added to Topics without a row fails the staleness check.

The swap example runs the real `edge-agent shadow` command against a real daemon on a real broker.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import main
from agent.mqtt.topics import Topics
from agent.ops import protocol_doc
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import ROOT, InProcessDaemon, wait_online, write_daemon_config

DEV = "dev-docs"
SHADOW_MD = (ROOT / "docs" / "shadow.md").read_text()


def test_the_swap_example_in_shadow_md_is_what_the_daemon_says(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV)
    with BrokerClient(broker) as peer:
        peer.subscribe(Topics("edge", DEV).device_status)
        with InProcessDaemon(cfg):
            wait_online(peer, DEV)
            capsys.readouterr()
            assert main(["shadow", "set", "-c", str(cfg), "swap.policy=zram", "--wait"]) == 0
            out = capsys.readouterr().out
            assert main(["shadow", "get", "-c", str(cfg)]) == 0
            table = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: swap.policy: ")]
    assert len(notes) == 1, out
    assert notes[0] in SHADOW_MD, f"docs/shadow.md does not show the note the daemon gives:\n{notes[0]}"
    row = next(line for line in table.splitlines() if line.startswith("swap.policy"))
    state = re.split(r"\s{2,}", row.strip(), maxsplit=3)[3]
    assert state.startswith("pending: ") and state in SHADOW_MD, row
    assert "does not manage swap" not in SHADOW_MD


def test_the_topic_table_lists_every_topic_the_device_uses() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    table = doc.split("<!-- BEGIN GENERATED: topics -->", 1)[1].split("<!-- END GENERATED: topics -->", 1)[0]
    for topic in ("{root}/events", "{root}/telemetry", "{root}/status", "{root}/jobs/{job_id}/result",
                  "{root}/shadow/update", "$share/{group}/{prefix}/fleet/jobs/submit"):  # fmt: skip
        assert f"`{topic}`" in table, topic


def test_a_topic_added_without_a_row_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    class MoreTopics(Topics):
        @property
        def heartbeat(self) -> str:
            return f"{self.root}/heartbeat"

    monkeypatch.setattr(protocol_doc, "Topics", MoreTopics)
    with pytest.raises(KeyError, match="heartbeat"):
        protocol_doc.render((ROOT / "docs" / "protocol.md").read_text())
