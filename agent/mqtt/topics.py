"""Every MQTT topic the device uses, in one place: ``{prefix}/{device_id}/...`` and the fleet's."""

from __future__ import annotations

from agent.mqtt.wire import ID_RE, PREFIX_RE


class Topics:
    """Topic names for one device: ``{prefix}/{device_id}/...``."""

    def __init__(self, prefix: str, device_id: str) -> None:
        # Both end up inside topic filters: '+', '#', '/' or '$' would change what is matched.
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"topic prefix {prefix!r} must be 1-32 characters from A-Z a-z 0-9 _ -")
        if not ID_RE.match(device_id):
            raise ValueError(f"device id {device_id!r} must be 1-64 characters from A-Z a-z 0-9 _ -")
        self.prefix = prefix
        self.device_id = device_id
        self.root = f"{prefix}/{device_id}"

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r}, {self.device_id!r})"

    @property
    def submit(self) -> str:
        return f"{self.root}/jobs/submit"

    @property
    def cancel_filter(self) -> str:
        """Subscription for cancel requests of any job."""
        return f"{self.root}/jobs/+/cancel"

    @property
    def device_status(self) -> str:
        return f"{self.root}/status"

    def cancel(self, job_id: str) -> str:
        return self._job(job_id, "cancel")

    def status(self, job_id: str) -> str:
        return self._job(job_id, "status")

    def result(self, job_id: str) -> str:
        return self._job(job_id, "result")

    def stream(self, job_id: str) -> str:
        return self._job(job_id, "stream")

    def fleet_submit(self, group: str) -> str:
        """Shared-subscription filter: each fleet job goes to one device of the group."""
        if not ID_RE.match(group):
            raise ValueError(f"fleet group {group!r} must be 1-64 characters from A-Z a-z 0-9 _ -")
        return f"$share/{group}/{self.fleet_publish}"

    @property
    def fleet_publish(self) -> str:
        """Where clients publish fleet jobs (no $share part)."""
        return f"{self.prefix}/fleet/jobs/submit"

    # Filters for subscribers (clients and tests) that follow every job of this device.
    @property
    def status_filter(self) -> str:
        return f"{self.root}/jobs/+/status"

    @property
    def result_filter(self) -> str:
        return f"{self.root}/jobs/+/result"

    @property
    def stream_filter(self) -> str:
        return f"{self.root}/jobs/+/stream"

    @property
    def telemetry(self) -> str:
        """Memory telemetry readings (agent/telemetry), QoS 1."""
        return f"{self.root}/telemetry"

    @property
    def events(self) -> str:
        """Governor level changes and actions, throttling, spool drops (agent/telemetry/events.py), QoS 1."""
        return f"{self.root}/events"

    # The device shadow (agent/shadow, docs/protocol.md "Device shadow").
    @property
    def shadow(self) -> str:
        """The whole shadow document, retained."""
        return f"{self.root}/shadow"

    @property
    def shadow_update(self) -> str:
        return f"{self.root}/shadow/update"

    @property
    def shadow_update_accepted(self) -> str:
        return f"{self.root}/shadow/update/accepted"

    @property
    def shadow_update_rejected(self) -> str:
        return f"{self.root}/shadow/update/rejected"

    @property
    def shadow_get(self) -> str:
        return f"{self.root}/shadow/get"

    @property
    def shadow_get_accepted(self) -> str:
        return f"{self.root}/shadow/get/accepted"

    @property
    def shadow_get_rejected(self) -> str:
        return f"{self.root}/shadow/get/rejected"

    @property
    def shadow_delta(self) -> str:
        return f"{self.root}/shadow/delta"

    def job_id_from_topic(self, topic: str, leaf: str) -> str | None:
        """The job id in ``{root}/jobs/{job_id}/{leaf}``, or None if the topic is not one, or the id is invalid."""
        head, tail = f"{self.root}/jobs/", f"/{leaf}"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        job_id = topic[len(head) : len(topic) - len(tail)]
        return job_id if ID_RE.match(job_id) else None

    def job_id_from_cancel_topic(self, topic: str) -> str | None:
        return self.job_id_from_topic(topic, "cancel")

    def _job(self, job_id: str, leaf: str) -> str:
        if not ID_RE.match(job_id):
            raise ValueError(f"job id {job_id!r} must be 1-64 characters from A-Z a-z 0-9 _ -")
        return f"{self.root}/jobs/{job_id}/{leaf}"
