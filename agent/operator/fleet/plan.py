"""A staged rollout's decisions, as pure functions: no broker, no clock of their own, no I/O.

The rollout driver (agent/operator/fleet/rollout.py) feeds them what it knows (the devices' rows, their
shadow documents, the time) and carries out what they return:

- ``parse_waves`` / ``wave_sizes``: the waves, as shares of the fleet (Mender's phases, 5 %, 15 %,
  80 %), cut into device counts;
- ``observe``: what one device's shadow document says about its update: still waiting (offline,
  downloading, applying), succeeded (the model in force, so it passed its canary too), or failed
  (an error under model.path: download, checksum, space, load or canary);
- ``decide``: what the rollout does next: wait, time out the devices still pending when the wave's
  time is up, advance to the next wave, finish, or abort (AWS IoT Jobs' abort criteria: a failure
  threshold once a minimum number of devices has finished; hawkBit's per-group success threshold);
- ``restore_observe``: whether a device put back on its previous model is there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Device states in a rollout. updating: the new desired state was sent (or is being sent);
# restoring: the previous model was put back in desired after an abort.
DeviceState = Literal["pending", "updating", "succeeded", "failed", "restoring", "restored", "restore_failed"]
TERMINAL = ("succeeded", "failed")
# The desired model keys a rollout sets, records and puts back (signature: the model's signed manifest).
MODEL_KEYS = ("path", "sha256", "url", "size", "signature")


class PlanError(ValueError):
    """A rollout option that cannot work; the message says what to write instead."""


@dataclass(frozen=True)
class Target:
    path: str
    sha256: str
    url: str | None = None
    size: int | None = None
    signature: str | None = None  # the manifest of `edge-agent model sign` (model.signature); None: FILE.sig

    def desired(self) -> dict[str, Any]:
        """The desired model section that points a board at this target (null clears an old url, size or
        signature)."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "url": self.url,
            "size": self.size,
            "signature": self.signature,
        }


@dataclass(frozen=True)
class Threshold:
    """Failures tolerated: a share of the devices that finished (``pct``) or a count."""

    pct: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> Threshold:
        t = text.strip()
        try:
            if t.endswith("%"):
                v = float(t[:-1])
                if not 0 <= v <= 100:
                    raise ValueError
                return cls(pct=v)
            n = int(t)
            if n < 0:
                raise ValueError
            return cls(count=n)
        except ValueError:
            raise PlanError(
                f"--max-failures takes a percentage (10%) or a count of devices (2), got {text!r}"
            ) from None

    def exceeded(self, failed: int, finished: int) -> bool:
        if self.count is not None:
            return failed > self.count
        return finished > 0 and failed / finished * 100 > (self.pct or 0.0) + 1e-9

    def __str__(self) -> str:
        return f"{self.pct:g}%" if self.pct is not None else str(self.count)


@dataclass(frozen=True)
class Policy:
    waves: tuple[float, ...]  # each wave's share of the fleet, percent, adding up to 100
    max_failures: Threshold
    min_devices: int
    timeout_per_wave_s: float


def parse_waves(text: str) -> tuple[float, ...]:
    """ "5%,15%,80%" -> (5, 15, 80). The shares must add up to 100 %."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out = []
    for p in parts:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%?", p)
        if m is None or float(m.group(1)) <= 0:
            raise PlanError(f"--waves takes positive percentages separated by commas (5%,15%,80%), got {p!r}")
        out.append(float(m.group(1)))
    if not out:
        raise PlanError("--waves needs at least one wave")
    if abs(sum(out) - 100) > 0.01:
        raise PlanError(f"--waves must add up to 100%, got {sum(out):g}% ({text})")
    return tuple(out)


def wave_sizes(n: int, waves: Sequence[float]) -> list[int]:
    """Devices per wave for a fleet of ``n``: each wave's cumulative share rounded up, so an early
    small wave still has one device; waves left empty by a small fleet are dropped."""
    sizes, done, cum = [], 0, 0.0
    for share in waves:
        cum += share
        upto = n if cum >= 99.99 else min(n, math.ceil(n * cum / 100 - 1e-9))
        upto = max(upto, min(n, done + 1))
        if upto > done:
            sizes.append(upto - done)
            done = upto
    return sizes


# --------------------------------------------------------------------------------------------
# One device


@dataclass(frozen=True)
class Observation:
    outcome: Literal["waiting", "succeeded", "failed"]
    message: str | None = None
    version: int | None = None  # the document version that carries our update, when known


def _state(doc: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    st = (doc or {}).get("state") or {}
    return dict(st.get("desired") or {}), dict(st.get("reported") or {})


def observe(doc: Mapping[str, Any] | None, target: Target, version: int | None) -> Observation:
    """What a device's shadow document says about its update to ``target``. ``version``: the
    document version our update got (None: sent but not acknowledged, e.g. the device is offline)."""
    if doc is None:
        return Observation("waiting", "no shadow document yet (the device never connected?)")
    desired, reported = _state(doc)
    want = desired.get("model") or {}
    ours = want.get("path") == target.path and want.get("sha256") == target.sha256
    if version is None:
        if not ours:
            return Observation("waiting", "the update has not reached the device yet")
        version = int(doc.get("version", 0))
    elif not ours and int(doc.get("version", 0)) >= version:
        return Observation("failed", "desired model was changed by someone else during the rollout", version)
    applied = reported.get("applied_version")
    if not isinstance(applied, int) or applied < version:
        return Observation("waiting", "the device has not applied the update yet", version)
    model = reported.get("model") or {}
    serving = reported.get("serving") or {}
    if model.get("path") == target.path and model.get("sha256") == target.sha256 and serving.get("file") == target.path:
        return Observation("succeeded", None, version)
    err = (reported.get("errors") or {}).get("model.path")
    if err:
        return Observation("failed", str(err), version)
    note = (reported.get("pending") or {}).get("model.path")
    dl = reported.get("download") or {}
    if note and dl.get("path") == target.path and dl.get("total"):
        note = f"{note}: {dl.get('bytes', 0) / 2**20:.1f} of {dl['total'] / 2**20:.1f} MiB"
    return Observation("waiting", note or "applying", version)


def restore_desired(previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The desired model section that puts a device back where it was: its previous desired keys,
    and null for the ones it did not have (the board's config file applies again)."""
    prev = previous or {}
    return {k: prev.get(k) for k in MODEL_KEYS}


def restore_observe(
    doc: Mapping[str, Any] | None, previous: Mapping[str, Any] | None, version: int | None
) -> Observation:
    """Whether a device put back on its previous model serves it again."""
    if doc is None or version is None:
        return Observation("waiting", "the restore has not reached the device yet", version)
    desired, reported = _state(doc)
    applied = reported.get("applied_version")
    if not isinstance(applied, int) or applied < version:
        return Observation("waiting", "the device has not applied the restore yet", version)
    model = desired.get("model") or {}
    if any(model.get(k) != (previous or {}).get(k) for k in MODEL_KEYS) and int(doc.get("version", 0)) > version:
        return Observation("failed", "desired model was changed by someone else during the restore", version)
    delta = ((doc.get("state") or {}).get("delta") or {}).get("model") or {}
    err = (reported.get("errors") or {}).get("model.path")
    if err:
        return Observation("failed", str(err), version)
    if not delta:
        return Observation("succeeded", None, version)
    return Observation("waiting", "applying the previous model", version)


# --------------------------------------------------------------------------------------------
# The rollout


@dataclass(frozen=True)
class Row:
    """One device in a rollout, as the decisions need it."""

    device: str
    wave: int
    state: DeviceState
    message: str | None = None


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "advance", "finish", "abort"]
    reason: str = ""
    timed_out: tuple[str, ...] = ()  # devices of the current wave to mark failed (timed_out) first


def decide(rows: Sequence[Row], policy: Policy, wave: int, wave_started: float | None, now: float) -> Decision:
    """What to do next, with ``wave`` the current wave (-1: none started yet) that started at
    ``wave_started``. Devices still updating when the wave's time is up count as failed (a device
    offline for the whole wave is one of them). Abort when failures pass ``max_failures`` once
    ``min_devices`` devices have finished, or when a finished wave's own failures pass it."""
    waves = max((r.wave for r in rows), default=-1) + 1
    if wave < 0:
        return Decision("advance", "first wave") if waves else Decision("finish", "no devices")
    timed_out: tuple[str, ...] = ()
    if wave_started is not None and now - wave_started >= policy.timeout_per_wave_s:
        timed_out = tuple(r.device for r in rows if r.wave == wave and r.state in ("pending", "updating"))
    state = {r.device: ("failed" if r.device in timed_out else r.state) for r in rows}
    finished = [r for r in rows if state[r.device] in TERMINAL]
    failed = [r for r in finished if state[r.device] == "failed"]
    if len(finished) >= policy.min_devices and failed and policy.max_failures.exceeded(len(failed), len(finished)):
        return Decision(
            "abort",
            f"{len(failed)} of {len(finished)} finished devices failed, more than "
            f"--max-failures {policy.max_failures} (checked from --min-devices "
            f"{policy.min_devices} on)",
            timed_out,
        )
    current = [r for r in rows if r.wave == wave]
    if any(state[r.device] not in TERMINAL for r in current):
        return Decision("wait", "", timed_out)
    wave_failed = sum(1 for r in current if state[r.device] == "failed")
    if wave_failed and policy.max_failures.exceeded(wave_failed, len(current)):
        return Decision(
            "abort",
            f"wave {wave + 1}: {wave_failed} of {len(current)} devices failed, more than "
            f"--max-failures {policy.max_failures}",
            timed_out,
        )
    if wave + 1 < waves:
        return Decision(
            "advance", f"wave {wave + 1} done: {len(current) - wave_failed} of {len(current)} succeeded", timed_out
        )
    return Decision("finish", f"all {waves} wave(s) done", timed_out)


__all__ = [
    "MODEL_KEYS",
    "Decision",
    "DeviceState",
    "Observation",
    "PlanError",
    "Policy",
    "Row",
    "Target",
    "Threshold",
    "decide",
    "observe",
    "parse_waves",
    "restore_desired",
    "restore_observe",
    "wave_sizes",
]
