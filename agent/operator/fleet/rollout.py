"""The staged rollout driver: carries out agent.operator.fleet.plan's decisions through the devices' shadows
and keeps every step in the rollout record (agent/operator/fleet/store.py).

One ``step()``: read what the devices report, mark the ones that succeeded or failed, ask
``decide`` what to do, and do it: point the next wave's devices at the new model (their previous
desired model is recorded first), finish, or abort, which puts every device the rollout changed back
on its previous model through its shadow and waits for that too. ``run()`` steps until the rollout
ends (``wait``) or until there is nothing to do but wait for the devices. The state is committed
before each message goes out, so a rollout interrupted anywhere (Ctrl-C, a crash) is continued by
``run()`` on the same record: updates and restores that may not have gone out are sent again
(they are idempotent: the same desired values).

Given the operator's private key, every update and restore is signed as `edge-agent shadow set --key`
signs it (agent.signing.sign_update): for one device, at the document version its retained shadow
shows, valid until the wave's time is up. Boards that trust operator keys refuse unsigned changes of
model.* (403); a signed update that meets a newer version (409) is signed again at that version, once.
An answer that comes after ``reply_timeout_s`` (a slow board, one that was offline) is taken at the next
step: a refusal fails its device then, with its reason, rather than at the wave's timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.operator.fleet.client import FleetClient
from agent.operator.fleet.plan import (
    MODEL_KEYS,
    Policy,
    Target,
    decide,
    observe,
    restore_desired,
    restore_observe,
    wave_sizes,
)
from agent.operator.fleet.store import Device, Rollout, RolloutStore, Spec
from agent.signing import PrivateKey, iso, key_id, sign_update

log = logging.getLogger(__name__)

FINAL = ("succeeded", "aborted")
REJECTED = "rejected"  # in a device's message: the board refused the update, so it changed nothing


class RolloutDriver:
    def __init__(
        self,
        store: RolloutStore,
        client: FleetClient,
        *,
        clock: Callable[[], float] = time.time,
        reply_timeout_s: float = 5.0,
        on_progress: Callable[[Rollout], None] | None = None,
        key: PrivateKey | None = None,
    ) -> None:
        """``key``: the operator's private key that signs every update (None: unsigned updates)."""
        self.store = store
        self.client = client
        self.clock = clock
        self.reply_timeout_s = reply_timeout_s
        self.on_progress = on_progress or (lambda r: None)
        self.key = key

    # ------------------------------------------------------------------ entry points

    def create(self, target: Target, policy: Policy, devices: list[str], selection: str) -> Rollout:
        """Record a new rollout over ``devices`` (in this order) cut into the policy's waves."""
        sizes = wave_sizes(len(devices), policy.waves)
        assignment: list[tuple[str, int]] = []
        i = 0
        for wave, n in enumerate(sizes):
            assignment += [(d, wave) for d in devices[i : i + n]]
            i += n
        kid = key_id(self.key.public_key()) if self.key is not None else None
        spec = Spec(target, policy, selection, self.client.prefix, kid)
        r = self.store.create(spec, assignment, self.clock())
        log.info("rollout %s: %d device(s) in %d wave(s) %s", r.id, len(devices), len(sizes), sizes)
        return r

    def run(self, rid: str, *, wait: bool) -> Rollout:
        """Continue rollout ``rid`` (after a create, or a resume): until it ends when ``wait``, else
        until there is nothing to do but wait for the devices."""
        self._resend(self.store.load(rid))
        while True:
            seen = self.client.changes
            r, acted = self.step(rid)
            self.on_progress(r)
            if r.state in FINAL or (not wait and not acted):
                return r
            if not acted:
                self.client.wait_change(seen, self._wake_in(r))

    def step(self, rid: str) -> tuple[Rollout, bool]:
        """One pass; returns the rollout and whether it sent anything or changed state."""
        r = self.store.load(rid)
        if r.state == "running":
            return self._step_running(r)
        if r.state == "aborting":
            return self._step_aborting(r)
        return r, False

    # ------------------------------------------------------------------ running

    def _step_running(self, r: Rollout) -> tuple[Rollout, bool]:
        now = self.clock()
        if late := self._late_replies(r):
            r = self.store.load(r.id)
        target = r.spec.target
        for d in r.devices:
            if d.state != "updating":
                continue
            obs = observe(self.client.doc(d.device), target, d.version)
            if obs.outcome != "waiting":
                self.store.set_device(
                    r.id, d.device, state=obs.outcome, message=obs.message, done_at=now, version=obs.version
                )
                log.info("rollout %s: %s %s%s", r.id, d.device, obs.outcome, f": {obs.message}" if obs.message else "")
            elif obs.version != d.version or obs.message != d.message:
                self.store.set_device(r.id, d.device, version=obs.version, message=obs.message)
        r = self.store.load(r.id)
        dec = decide([d.row() for d in r.devices], r.spec.policy, r.wave, r.wave_started, now)
        for dev in dec.timed_out:
            d = next(x for x in r.devices if x.device == dev)
            why = f"timed out after --timeout-per-wave {r.spec.policy.timeout_per_wave_s:g} s"
            self.store.set_device(
                r.id, dev, state="failed", done_at=now, message=f"{why} ({d.message})" if d.message else why
            )
        if dec.action == "wait":
            return self.store.load(r.id), bool(dec.timed_out) or late
        if dec.action == "advance":
            wave = r.wave + 1
            self.store.set_rollout(r.id, wave=wave, wave_started=now, reason=dec.reason)
            log.info("rollout %s: wave %d of %d (%s)", r.id, wave + 1, r.waves(), dec.reason)
            self._send_wave(self.store.load(r.id), wave)
        elif dec.action == "finish":
            self.store.set_rollout(r.id, state="succeeded", reason=dec.reason, finished_at=now)
            log.info("rollout %s: succeeded (%s)", r.id, dec.reason)
        else:
            log.warning("rollout %s: aborting: %s", r.id, dec.reason)
            self.store.set_rollout(r.id, state="aborting", reason=dec.reason, wave_started=now)
            self._send_restores(self.store.load(r.id))
        return self.store.load(r.id), True

    def _send_wave(self, r: Rollout, wave: int) -> None:
        now = self.clock()
        todo = [d for d in r.devices if d.wave == wave and d.state == "pending"]
        for d in todo:
            doc = self.client.doc(d.device)
            desired_model = (((doc or {}).get("state") or {}).get("desired") or {}).get("model") or {}
            previous = {k: desired_model[k] for k in MODEL_KEYS if desired_model.get(k) is not None}
            # Committed before the update goes out: a crash after this line resends it on resume.
            self.store.set_device(r.id, d.device, state="updating", previous=previous, sent_at=now, version=None)
        self._send(r, [d.device for d in todo], {"model": r.spec.target.desired()}, restore=False)

    # ------------------------------------------------------------------ aborting

    def _send_restores(self, r: Rollout) -> None:
        # A device whose update it refused never changed: nothing to put back.
        changed = [d for d in r.devices if d.state in ("updating", "succeeded", "failed") and not _refused(d)]
        for d in changed:
            self.store.set_device(
                r.id,
                d.device,
                state="restoring",
                restore_version=None,
                message=f"{d.state}: {d.message}" if d.message else d.state,
            )
        for d in changed:
            self._send(r, [d.device], {"model": restore_desired(d.previous)}, restore=True)

    def _step_aborting(self, r: Rollout) -> tuple[Rollout, bool]:
        now = self.clock()
        if acted := self._late_replies(r):
            r = self.store.load(r.id)
        for d in r.devices:
            if d.state != "restoring":
                continue
            version = d.restore_version
            doc = self.client.doc(d.device)
            if version is None and doc is not None and _model_of(doc) == _defined(restore_desired(d.previous)):
                version = int(doc.get("version", 0))
            obs = restore_observe(doc, d.previous, version)
            if obs.outcome == "succeeded":
                self.store.set_device(r.id, d.device, state="restored", done_at=now, restore_version=version)
                acted = True
            elif obs.outcome == "failed" or (
                r.wave_started is not None and now - r.wave_started >= r.spec.policy.timeout_per_wave_s
            ):
                why = obs.message if obs.outcome == "failed" else "the restore timed out"
                self.store.set_device(r.id, d.device, state="restore_failed", done_at=now, message=why)
                acted = True
        r = self.store.load(r.id)
        if not any(d.state == "restoring" for d in r.devices):
            self.store.set_rollout(r.id, state="aborted", finished_at=now)
            log.warning(
                "rollout %s: aborted; %d device(s) restored, %d not",
                r.id,
                r.counts().get("restored", 0),
                r.counts().get("restore_failed", 0),
            )
            return self.store.load(r.id), True
        return r, acted

    # ------------------------------------------------------------------ messages

    def _send(self, r: Rollout, devices: list[str], desired: dict[str, Any], *, restore: bool) -> None:
        rid = r.id
        kind = "restore" if restore else "update"
        tokens = {f"rollout-{rid}-{kind}-{d}": d for d in devices}
        for token, device in tokens.items():
            self._send_one(r, device, desired, token, version=None)
        replies = self.client.replies(list(tokens), self.reply_timeout_s)
        if self.key is not None:  # a signed update that met a newer version: signed again at that version, once
            again = {
                t: int(body["version"])
                for t, (answer, body) in replies.items()
                if answer == "rejected" and body.get("code") == 409 and isinstance(body.get("version"), int)
            }
            for token, version in again.items():
                del replies[token]
                self._send_one(r, tokens[token], desired, token, version=version)
            replies.update(self.client.replies(list(again), self.reply_timeout_s))
        for token, (answer, body) in replies.items():
            self._answer(rid, tokens[token], kind, answer, body, restore=restore)
        for token, device in tokens.items():
            if token not in replies:
                log.info(
                    "rollout %s: %s did not answer the %s yet (offline?); it stays pending until the wave's timeout",
                    rid,
                    device,
                    kind,
                )

    def _send_one(self, r: Rollout, device: str, desired: dict[str, Any], token: str, *, version: int | None) -> None:
        if self.key is None:
            self.client.send_update(device, desired, token=token)
            return
        if version is None:  # a signature holds for one document version: the one the device shows now
            doc = self.client.doc(device)
            version = int(doc.get("version", 0)) if doc is not None else 0
        expires = iso(self.clock() + r.spec.policy.timeout_per_wave_s)  # a late delivery past the wave is refused
        signature = sign_update(desired, device=device, version=version, key=self.key, expires=expires)
        self.client.send_update(device, desired, token=token, version=version, signature=signature)

    def _late_replies(self, r: Rollout) -> bool:
        """Answers that came after ``reply_timeout_s`` (a slow board, or one that was offline), taken now:
        a refusal fails its device at once rather than at the wave's timeout. True when there were any."""
        restore = r.state == "aborting"
        if restore:
            waiting = [d.device for d in r.devices if d.state == "restoring" and d.restore_version is None]
        else:
            waiting = [d.device for d in r.devices if d.state == "updating" and d.version is None]
        kind = "restore" if restore else "update"
        tokens = {f"rollout-{r.id}-{kind}-{dev}": dev for dev in waiting}
        replies = self.client.replies(list(tokens), 0.0) if tokens else {}
        for token, (answer, body) in replies.items():
            self._answer(r.id, tokens[token], kind, answer, body, restore=restore)
        return bool(replies)

    def _answer(self, rid: str, device: str, kind: str, answer: str, body: dict[str, Any], *, restore: bool) -> None:
        if answer == "accepted":
            field = "restore_version" if restore else "version"
            self.store.set_device(rid, device, **{field: int(body["version"])})
        else:
            self._rejected(rid, device, kind, body, restore=restore)

    def _rejected(self, rid: str, device: str, kind: str, body: dict[str, Any], *, restore: bool) -> None:
        errors = body.get("errors") or {}
        why = f"{kind} {REJECTED} {body.get('code')}: {body.get('message')}" + (
            " (" + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ")" if errors else ""
        )
        self.store.set_device(
            rid, device, state="restore_failed" if restore else "failed", message=why, done_at=self.clock()
        )

    def _resend(self, r: Rollout) -> None:
        """After an interruption: what was marked sent but never acknowledged goes out again."""
        if r.state == "running":
            lost = [d.device for d in r.devices if d.state == "updating" and d.version is None]
            if lost:
                self._send(r, lost, {"model": r.spec.target.desired()}, restore=False)
        elif r.state == "aborting":
            for d in r.devices:
                if d.state == "restoring" and d.restore_version is None:
                    self._send(r, [d.device], {"model": restore_desired(d.previous)}, restore=True)

    def _wake_in(self, r: Rollout) -> float:
        """How long to wait for a device's message before stepping anyway (the wave's deadline)."""
        if r.wave_started is None:
            return 1.0
        left = r.wave_started + r.spec.policy.timeout_per_wave_s - self.clock()
        return max(0.05, min(5.0, left))


def _refused(d: Device) -> bool:
    """The board answered the rollout's update with a refusal: it was never applied."""
    return d.state == "failed" and d.version is None and (d.message or "").startswith(f"update {REJECTED} ")


def _model_of(doc: dict[str, Any]) -> dict[str, Any]:
    model = (((doc.get("state") or {}).get("desired") or {}).get("model")) or {}
    return {k: model.get(k) for k in MODEL_KEYS if model.get(k) is not None}


def _defined(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if v is not None}


__all__ = ["FINAL", "RolloutDriver"]
