"""Publishing Home Assistant discovery on connect, keeping the model select's options current, and
removing it all once it is turned off.

``DiscoveryPublisher.on_connect()`` is what the daemon calls from its connect callback (the transport's
network thread: it only publishes, never waits), before the shadow document goes out: Home Assistant
checks the model in force against the select's options, so the options must be there first.
Enabled: every entity's config, retained, QoS 1.
Disabled: if discovery was published before (a marker file in ``device.state_dir`` lists the topics),
an empty retained message on each of those topics, and the marker is deleted once the broker has
acknowledged all of them; a board that never enabled discovery publishes nothing. A changed
discovery prefix or device name removes the old topics the same way.

``refresh()`` runs on the daemon's main loop, every pass, before the shadow's reconcile: when a model
was copied into the models folder, downloaded or removed, or the model in force changed, it
republishes the select's config with the new options, so a model chosen or switched to afterwards is
one Home Assistant knows. The check is a stat of the models folder and its sub-folders; the folder
is listed again only when one of them changed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.ha.discovery import discovery_messages, list_models, model_select_message, select_options
from agent.system.files import atomic_write

log = logging.getLogger(__name__)
MARKER = "homeassistant.json"
# A folder changed this recently may change again within the same timestamp tick without its mtime
# moving: it is listed again at the next pass (as git treats "racily clean" files).
_RACY_NS = 2_000_000_000


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
        # What the select published last: its options, for the model in force, from the folder as it was.
        self._options: list[str] | None = None
        self._model: str | None = None
        self._folder: dict[str, int] | None = None  # folder -> mtime_ns; None: list it again

    def _published(self) -> list[str]:
        try:
            return list(json.loads(self.marker.read_text())["topics"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _write_marker(self, topics: list[str]) -> None:
        atomic_write(self.marker, json.dumps({"topics": topics}))

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
            model, folder = str(self.settings.model.path), self._folder_mtimes()
            models = self._models()
            messages = discovery_messages(self.settings, models)
            topics = [t for t, _ in messages]
            # Recorded first: if the board dies half way, the next start still knows what to remove.
            self._write_marker(sorted(set(topics) | set(previous)))
            for topic, payload in messages:
                self._publish(topic, payload, qos=1, retain=True)
                sent += 1
            self._options, self._model, self._folder = select_options(self.settings, models), model, folder
            stale = [t for t in previous if t not in topics]
            sent += self._remove(stale, keep=topics)
            log.info(
                "Home Assistant discovery: %d entities under %s/",
                len(messages),
                self.settings.homeassistant.discovery_prefix,
            )
            return sent
        if previous:
            sent = self._remove(previous, keep=[])
            log.info("Home Assistant discovery is off: removing %d entities", len(previous))
        return sent

    def refresh(self) -> int:
        """Main thread: republish the model select's config if its options changed since it was
        published (not before the first connect: that publishes everything). Returns messages sent."""
        if not self.settings.homeassistant.enabled:
            return 0
        with self._lock:
            model = str(self.settings.model.path)
            if self._options is None or (model == self._model and not self._folder_changed()):
                return 0
            folder = self._folder_mtimes()  # before listing: a change while listing is seen next time
            models = self._models()
            options = select_options(self.settings, models)
            self._model, self._folder = model, folder
            if options == self._options:
                return 0
            topic, payload = model_select_message(self.settings, models)
            self._publish(topic, payload, qos=1, retain=True)
            added = [o for o in options if o not in self._options]
            removed = [o for o in self._options if o not in options]
            self._options = options
        log.info(
            "Home Assistant discovery: the model select's options changed (%s)",
            ", ".join([f"+{o}" for o in added] + [f"-{o}" for o in removed]),
        )
        return 1

    def _folder_changed(self) -> bool:
        if self._folder is None:
            return True
        return any(_mtime(Path(d)) != m for d, m in self._folder.items())

    def _folder_mtimes(self) -> dict[str, int] | None:
        """mtime of the models folder and of each sub-folder (a file added, removed or renamed changes
        its folder's); None when one changed too recently to be trusted."""
        root = Path(self.settings.device.models_dir)
        out = {str(root): _mtime(root)}
        for folder, subs, _files in os.walk(root):
            subs[:] = [d for d in subs if not d.startswith(".")]  # list_models skips hidden folders
            for d in subs:
                out[os.path.join(folder, d)] = _mtime(Path(folder) / d)
        if time.time_ns() - max(out.values()) < _RACY_NS:
            return None
        return out

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


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1  # missing or unreadable: its appearance is a change too
