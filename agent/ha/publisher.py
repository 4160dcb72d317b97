"""Publishing Home Assistant discovery on connect, and removing it once it is turned off.

``DiscoveryPublisher.on_connect()`` is what the daemon calls from its connect callback (the transport's
network thread: it only publishes, never waits). Enabled: every entity's config, retained, QoS 1.
Disabled: if discovery was published before (a marker file in ``device.state_dir`` lists the topics),
an empty retained message on each of those topics, and the marker is deleted once the broker has
acknowledged all of them; a board that never enabled discovery publishes nothing. A changed
discovery prefix or device name removes the old topics the same way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.ha.discovery import discovery_messages, list_models

log = logging.getLogger(__name__)
MARKER = "homeassistant.json"


class DiscoveryPublisher:
    def __init__(
        self,
        settings: Any,
        publish: Callable[..., Any],
        *,
        models: Callable[[], list[str]] | None = None,
        marker: Path | None = None,
    ) -> None:
        """``publish(topic, payload, qos=, retain=, on_delivered=)``: the transport's publish."""
        self.settings = settings
        self._publish = publish
        self._models = models or (lambda: list_models(Path(settings.device.models_dir)))
        self.marker = marker or Path(settings.device.state_dir) / MARKER
        self._lock = threading.Lock()

    def _published(self) -> list[str]:
        try:
            return list(json.loads(self.marker.read_text())["topics"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _write_marker(self, topics: list[str]) -> None:
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(json.dumps({"topics": topics}))
        os.replace(tmp, self.marker)

    def on_connect(self) -> int:
        """Publish discovery (or its removal); returns the number of messages sent."""
        with self._lock:
            try:
                return self._on_connect()
            except OSError as e:  # the marker could not be written (a full disk): try again next connect
                log.warning("Home Assistant discovery: %s", e)
                return 0

    def _on_connect(self) -> int:
        previous = self._published()
        sent = 0
        if self.settings.homeassistant.enabled:
            messages = discovery_messages(self.settings, self._models())
            topics = [t for t, _ in messages]
            # Recorded first: if the board dies half way, the next start still knows what to remove.
            self._write_marker(sorted(set(topics) | set(previous)))
            for topic, payload in messages:
                self._publish(topic, payload, qos=1, retain=True)
                sent += 1
            stale = [t for t in previous if t not in topics]
            sent += self._remove(stale, keep=topics)
            log.info("Home Assistant discovery: %d entities under %s/", len(messages),
                     self.settings.homeassistant.discovery_prefix)  # fmt: skip
            return sent
        if previous:
            sent = self._remove(previous, keep=[])
            log.info("Home Assistant discovery is off: removing %d entities", len(previous))
        return sent

    def _remove(self, topics: list[str], keep: list[str]) -> int:
        if not topics:
            return 0
        pending = set(topics)
        lock = threading.Lock()

        def delivered(topic: str) -> None:
            with lock:
                pending.discard(topic)
                done = not pending
            if done:
                try:
                    if keep:
                        self._write_marker(sorted(keep))
                    else:
                        self.marker.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("Home Assistant discovery: %s", e)

        for topic in topics:
            self._publish(topic, b"", qos=1, retain=True, on_delivered=lambda t=topic: delivered(t))
        return len(topics)
