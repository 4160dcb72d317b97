"""The device shadow service: the shadow topics in, the document, replies and actions out.

Owns the board's shadow at run time: it answers updates and gets, persists what it accepts
(agent.shadow.store), keeps the retained document and the delta published, clears retained
updates once handled, and, on the daemon's main loop, reconciles the settings in force with
desired through the daemon's ``Executor`` and folds what happened into reported.

Its dependencies are injected, so the daemon wires it with a few lines and tests run it against a
real broker with a fake executor: ``publish(topic, payload, qos, retain)`` (MqttTransport.publish),
``ack(msg)`` (MqttTransport.ack), the ``Executor`` (agent.app.applier.LiveSettings), ``facts()`` (the
board and the model in force, for reported), a wall clock, ``wake()`` (tick the main loop) and
``send_event(event)`` (the daemon's Uplink, called on the main loop only).

Refused updates that concern the operator's signatures (403; 400 under model.signature; a signed update
meeting a version conflict, 409) are events on ``{root}/events`` (agent.telemetry.events.update_refused_event),
queued on the network thread and sent by ``run_pending``, at most ``RateLimit.burst`` per window; the
rest are counted and told in one event when the window is over.

Threads. ``on_message`` and ``on_connect`` run on the MQTT network thread: they validate, persist,
acknowledge and reply, and never wait for a model swap; they only mark reconcile work as due and
call ``wake()``. ``start``, ``run_pending``, ``reload`` and ``refresh_facts`` run on the daemon's
main loop, which is where the executor is called. One lock guards the document; it is never held
while the executor runs.

Delivery: updates are at least once (an update stored but not yet acknowledged when the daemon dies
is delivered again and merged again; one with a ``version`` is then refused 409). A retained update
is handled once and then cleared with an empty retained message on the same topic; because MQTT
does not tell a subscriber whether a live message was published retained, every handled update is
followed by that clear, and a retained copy of an update already handled on the same connection
(the broker can send both the queued and the retained copy after a reconnect) is only cleared, not
merged twice, so an older retained update never overrides a newer one.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from agent.config import Settings
from agent.config.inforce import effective_settings, reread, settings_in_force
from agent.config.live import ApplyReport, diff
from agent.config.tree import Tree, flatten, same, unflatten
from agent.errors import StoreError
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage
from agent.shadow.desired import live_values, validate_desired
from agent.shadow.document import (
    Accepted,
    BadRequest,
    DesiredInvalid,
    Rejected,
    ShadowDocument,
    UpdateRequest,
    handle_update,
    parse_get,
    parse_update,
    set_reported,
)
from agent.shadow.messages import (
    FACT_KEYS,
    REPORTED_EXTRAS,
    ShadowDelta,
    ShadowRejected,
    ShadowUpdateAccepted,
    document_message,
)
from agent.shadow.reconcile import Action, Executor, Settled, plan, settle, tidy
from agent.shadow.store import ShadowStore
from agent.signing import Trust, desired_model_problem, needs_signature, running_version, verify_update
from agent.telemetry.events import Event, RateLimit, update_refused_event, updates_suppressed_event

log = logging.getLogger(__name__)

_KEY_ID = re.compile(r"^[0-9a-f]{16}$")  # a signing key's id, as agent.signing writes it
_EVENT_KEYS = 20  # keys named in a refused-update event, at most

# Retained copies remembered per connection, to merge an update once when the broker sends it twice.
_SEEN_MAX = 64


class Publish(Protocol):
    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> object: ...


class ShadowService:
    def __init__(
        self,
        *,
        topics: Topics,
        store: ShadowStore,
        file_settings: Settings,
        executor: Executor,
        publish: Publish,
        ack: Callable[[InboundMessage], object] | None = None,
        facts: Callable[[], Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        wake: Callable[[], None] | None = None,
        check_board: bool = True,
        send_event: Callable[[Event], object] | None = None,
        refusal_limit: RateLimit | None = None,
    ) -> None:
        """``file_settings``: the board's own configuration (file, environment, credentials), which
        desired is overlaid on; ``facts()`` returns reported's facts, {"board": ..., "serving": ...}
        (agent.shadow.facts.reported_facts); ``check_board`` False skips the model file checks
        (only for tests of the protocol)."""
        self.topics = topics
        self._store = store
        self._file_settings = file_settings
        self._executor = executor
        self._publish = publish
        self._ack = ack or (lambda msg: True)
        self._facts = facts or (lambda: {})
        self._clock = clock
        self._wake = wake or (lambda: None)
        self._check_board = check_board
        self._send_event = send_event
        self._refusals = refusal_limit or RateLimit()
        self._events: list[Event] = []  # refusals to tell, queued on the network thread (lock held)

        self._lock = threading.Lock()
        self._doc = ShadowDocument()
        self._settled = Settled()
        self._applied_version: int | None = None
        self._fact_values: dict[str, Any] = {}
        self._dirty = False
        self._facts_due = False  # a fact changed off the main loop (a model file's sha256 is known)
        self._started = False
        # Nothing is published before the first on_connect: the daemon publishes what must precede
        # the document there (Home Assistant's options), and a publish from the main thread could
        # otherwise overtake it.
        self._connected_once = False
        self._published_state: str | None = None
        self._published_delta: Tree | None = None
        self._seen_connection: int | None = None
        self._seen: deque[str] = deque(maxlen=_SEEN_MAX)

    # ------------------------------------------------------------------ wiring

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the daemon's transport must subscribe to (topic filter, QoS)."""
        return [(self.topics.shadow_update, 1), (self.topics.shadow_get, 1)]

    def handles(self, topic: str) -> bool:
        return topic in (self.topics.shadow_update, self.topics.shadow_get)

    @property
    def document(self) -> ShadowDocument:
        with self._lock:
            return self._doc

    # ------------------------------------------------------------------ main loop

    def start(self) -> None:
        """Main thread, before the transport connects: read the stored document, report what is in
        force, and mark a reconcile as due, so ``run_pending()`` applies the last accepted desired
        state even when the broker cannot be reached."""
        doc = self._store.load()
        in_force = live_values(self._executor.settings)
        stored_values = flatten({k: v for k, v in doc.reported.items() if k not in REPORTED_EXTRAS})
        # "Not applied yet" notes hold as long as the value they were made for is still in force.
        notes = doc.reported.get("pending") or {}
        pending = {k: str(n) for k, n in notes.items() if k in in_force and same(stored_values.get(k), in_force[k])}
        applied = doc.reported.get("applied_version")
        fact_values = self._read_facts()
        with self._lock:
            self._doc = doc
            self._settled = Settled(pending=pending)
            self._applied_version = applied if isinstance(applied, int) else None
            self._fact_values = fact_values
            self._update_reported(self._clock(), publish=False)
            self._dirty = True
            self._started = True
        log.info("shadow: version %d, %d desired key(s)", doc.version, len(flatten(doc.desired)))

    def pending_work(self) -> bool:
        """True when an accepted update (or a start, or a reload) has not been reconciled yet, or a
        fact changed (``refresh_facts_soon``)."""
        return self._dirty or self._facts_due or self._events_due()

    def run_pending(self, *, why: str = "shadow") -> list[tuple[Action, ApplyReport]]:
        """Main thread: bring the settings in force to the board's config overlaid by desired.

        Calls the executor once per action (pause intake, in-place settings, one model reload,
        resume intake), then updates reported, persists it and publishes the document and delta
        (with only ``refresh_facts_soon`` due: just that). Returns what was done, for the daemon's
        log. Never raises for a failed apply: the failure is reported under its key.
        """
        self._flush_events()
        if self._facts_due and not self._dirty:
            self.refresh_facts()
            return []
        with self._lock:
            if not self._dirty or not self._started:
                return []
            self._dirty = False
            self._facts_due = False  # the facts are read again below
            desired = copy.deepcopy(self._doc.desired)
            version = self._doc.version
            base = self._file_settings
            settled = self._settled
        target, conflicts = settings_in_force(base, desired)
        want = live_values(target)
        actions = plan(want, live_values(self._executor.settings), failed=settled.failed)
        done: list[tuple[Action, ApplyReport]] = []
        for action in actions:
            try:
                report = self._executor.apply(target, action.keys)
            except Exception as e:  # the executor's bug must not end the main loop or hide the key
                log.exception("shadow: applying %s failed", ", ".join(action.keys))
                report = ApplyReport(
                    failed={k: f"the daemon failed to apply it: {type(e).__name__}: {e}" for k in action.keys}
                )
            settled = settle(settled, action, report, want, live_values(self._executor.settings))
            done.append((action, report))
            log_report(report, why)
        settled = tidy(settled, want, live_values(self._executor.settings))
        if conflicts:
            settled = Settled(
                {**settled.failed, **{k: flatten(desired).get(k) for k in conflicts}},
                {**settled.errors, **conflicts},
                {k: v for k, v in settled.pending.items() if k not in conflicts},
            )
        fact_values = self._read_facts()
        with self._lock:
            self._settled = settled
            self._applied_version = version
            self._fact_values = fact_values
            self._update_reported(self._clock())
        return done

    def reload_file(self, path: Path | None) -> None:
        """Main thread, on SIGHUP: re-read the board's config file (``agent.config.inforce.reread``) and
        ``reload()`` it, logging what was applied and what needs a restart. A file that does not load is
        refused whole, with its error."""
        new = reread(path)
        if new is None:
            return
        report = self.reload(new)  # desired keys still win over the file; logs what it applied
        log_report(ApplyReport(restart=report.restart), "reload")

    def reload(self, file_settings: Settings) -> ApplyReport:
        """Main thread, on SIGHUP: the board's config file changed. Desired still wins over it; the
        rest is applied through the executor. Returns one report of the whole reload (keys that need
        a restart under ``restart``) for the daemon's log."""
        with self._lock:
            old_keys = self._file_settings.model.trusted_keys
            self._file_settings = file_settings
            self._dirty = True
            desired = copy.deepcopy(self._doc.desired)
        if file_settings.model.trusted_keys != old_keys:
            # One set of keys for both checks: updates (here, from _file_settings) and model loads (the
            # executor's settings in force), before anything this reload changes is loaded.
            self._executor.set_trusted_keys(file_settings.model.trusted_keys)
            self._tell_keys(old_keys, file_settings.model.trusted_keys)
        done = self.run_pending(why="reload")
        out = ApplyReport()
        for _action, report in done:
            out.applied.update(report.applied)
            out.failed.update(report.failed)
            out.pending.update(report.pending)
        target, _ = settings_in_force(file_settings, desired)
        out.restart = [c.key for c in diff(self._executor.settings, target) if c.kind is None]
        return out

    def _tell_keys(self, old: list[str], new: list[str]) -> None:
        before, after = Trust.from_texts(old), Trust.from_texts(new)
        added, retired = sorted(set(after.keys) - set(before.keys)), sorted(set(before.keys) - set(after.keys))
        log.warning(
            "reload: model.trusted_keys now %s (added %s, retired %s): updates and model loads are judged with them",
            ", ".join(sorted(after.keys)) or "empty: nothing is signature-checked",
            ", ".join(added) or "none",
            ", ".join(retired) or "none",
        )
        cur = self._executor.settings
        if after and running_version(cur.model, cur.device.models_dir / cur.model.path, after, self._clock()) is None:
            problem = desired_model_problem(cur, running=None, now=self._clock())
            log.error(
                "reload: the model in force, %s, is not signed by a key this board now trusts (%s); it keeps "
                "serving, but the next restart or reload of it refuses it: sign it with a trusted key",
                cur.model.path,
                problem or "no version",
            )

    def reconcile_soon(self) -> None:
        """Any thread: something the last reconcile waited for is there (a model download ended):
        run the reconcile again on the main loop."""
        self._dirty = True
        self._wake()

    @property
    def file_settings(self) -> Settings:
        """The board's own configuration (file, environment, credentials) in force."""
        return self._file_settings

    def protected_models(self) -> list[Path]:
        """Model files that must never be deleted: the config file's and the ones desired names."""
        out = [Path(self._file_settings.model.path)]
        with self._lock:
            wanted = (self._doc.desired.get("model") or {}).get("path")
        if isinstance(wanted, str):
            out.append(Path(wanted))
        return out

    def refresh_facts_soon(self) -> None:
        """Any thread: a fact changed (the model file's sha256 is known): ``run_pending()`` re-reads
        the facts on the main loop and republishes the document."""
        self._facts_due = True
        self._wake()

    def refresh_facts(self) -> None:
        """Main thread, at a slow pace (free disk, swap devices and cgroup limit change): re-read the
        facts and republish the document if they changed."""
        self._facts_due = False
        fact_values = self._read_facts()
        with self._lock:
            if not self._started:
                return
            self._fact_values = fact_values
            self._update_reported(self._clock())

    # ------------------------------------------------------------------ network thread

    def on_connect(self) -> None:
        """Network thread, after every (re)connect: publish the document and delta again (publishes
        made while disconnected were dropped by the transport)."""
        with self._lock:
            if not self._started:
                return
            self._connected_once = True
            self._published_state = None
            self._published_delta = None
            self._publish_state(self._clock())

    def on_message(self, msg: InboundMessage) -> None:
        """Network thread: an update or a get. Never raises. Every message is acknowledged once it
        is handled (an accepted update: once it is stored)."""
        if not self.handles(msg.topic):
            return
        if not self._started:
            # Before start() the stored document is not loaded: merging into an empty one would
            # lose it. Left unacknowledged, the broker delivers it again on the next connection.
            log.error("shadow: a message on %s arrived before ShadowService.start(); not handled", msg.topic)
            return
        try:
            if msg.topic == self.topics.shadow_update:
                self._on_update(msg)
            else:
                self._on_get(msg)
        except Exception:
            log.exception("shadow: handling a message on %s failed", msg.topic)
        finally:
            self._ack(msg)

    def _on_update(self, msg: InboundMessage) -> None:
        if not msg.payload:
            return  # the empty retained message that clears a handled update (ours, or an operator's)
        digest = hashlib.sha256(msg.payload).hexdigest()
        now = self._clock()
        with self._lock:
            if msg.retain and self._seen_before(msg.connection, digest):
                log.info(
                    "shadow: a retained copy of an update already handled on this connection: cleared, not merged again"
                )
                self._publish(self.topics.shadow_update, b"", 1, True)
                return
            try:
                result = handle_update(self._doc, msg.payload, self._validate, now, self._authorize)
            except Exception as e:  # a bug in a check must still get the operator an answer
                log.exception("shadow: checking an update failed")
                result = Rejected(
                    500,
                    f"the device failed to check the update ({type(e).__name__}: {e}); nothing changed",
                    self._doc.version,
                )
            stored = True
            if isinstance(result, Accepted):
                result, stored = self._persist(result, now)
            self._remember(msg.connection, digest)
            reply: ShadowUpdateAccepted | ShadowRejected
            if isinstance(result, Accepted):
                self._doc = result.document
                self._dirty = True
                reply = ShadowUpdateAccepted.build(
                    version=result.document.version,
                    state={"desired": result.document.desired},
                    ts=now,
                    **_token(result.client_token),
                )
                topic = self.topics.shadow_update_accepted
                log.info(
                    "shadow: update accepted, version %d: %s",
                    result.document.version,
                    ", ".join(sorted(result.changed)),
                )
            else:
                reply = _rejected(result, now)
                topic = self.topics.shadow_update_rejected
                # A flood of refusals about signatures is told (event and log) within the rate limit only.
                told = self._note_refusal(result, msg.payload, now)
                (log.warning if told else log.debug)("shadow: update rejected %d: %s", result.code, result.message)
            self._publish(topic, reply.to_payload(), 1, False)
            if isinstance(result, Accepted):
                self._publish_state(now)
            if stored:
                self._publish(self.topics.shadow_update, b"", 1, True)
        if isinstance(result, Accepted) or self._events:
            self._wake()

    # ------------------------------------------------------------------ refused updates as events

    def _note_refusal(self, result: Rejected, payload: bytes, now: float) -> bool:
        """Lock held: queue the event a refusal about signatures calls for, within the rate limit. False
        when the rate limit held it back (counted for the next event instead)."""
        try:
            update: UpdateRequest | None = parse_update(payload)
        except BadRequest:
            update = None
        signed = update is not None and update.signature is not None
        if result.code == 403:
            reason = result.message
        elif result.code == 400 and "model.signature" in result.errors:
            reason = result.errors["model.signature"]
        elif result.code == 409 and signed:
            reason = result.message + " (a signed update for a version that is gone: replayed, or raced)"
        else:
            return True  # a plain mistake (a bad value, a version race without a signature): the reply says it
        self._take_overflow(now)
        if not self._refusals.allow(now):
            return False
        keys = (
            sorted(flatten(update.desired))[:_EVENT_KEYS] if update is not None and update.desired is not None else []
        )
        sig = update.signature if update is not None else None
        kid = sig.get("key_id") if isinstance(sig, Mapping) else None
        self._events.append(
            update_refused_event(
                result.code,
                reason,
                keys,
                device_id=self.topics.device_id,
                ts=now,
                key_id=kid if isinstance(kid, str) and _KEY_ID.fullmatch(kid) else None,
            )
        )
        return True

    def _take_overflow(self, now: float) -> None:
        """Lock held: once a window with refusals held back is over, their count is queued as one event."""
        if n := self._refusals.overflow(now):
            self._events.append(
                updates_suppressed_event(n, self._refusals.window_s, device_id=self.topics.device_id, ts=now)
            )

    def _events_due(self) -> bool:
        with self._lock:
            self._take_overflow(self._clock())
            return bool(self._events)

    def _flush_events(self) -> None:
        """Main loop: send the queued events (and the count of the ones held back, once their window is over)."""
        with self._lock:
            self._take_overflow(self._clock())
            events, self._events = self._events, []
        if self._send_event is None:
            return
        for event in events:
            try:
                self._send_event(event)
            except Exception:  # telling must never stop the reconcile
                log.exception("shadow: sending a refused-update event failed")

    def _persist(self, result: Accepted, now: float) -> tuple[Accepted | Rejected, bool]:
        """Store an accepted update before anyone hears of it. (result, whether the update was
        handled: False only when it could not be stored, so a retained update is kept for later)."""
        try:
            won = self._store.save_desired(result.document, now)
        except StoreError as e:
            return (
                Rejected(
                    500,
                    f"the device could not store the update, nothing changed: {e}",
                    self._doc.version,
                    client_token=result.client_token,
                ),
                False,
            )
        if won:
            return result, True
        # Another writer stored this version or a newer one first: that document is the truth.
        try:
            latest = self._store.load()
            self._doc = replace(
                self._doc, version=latest.version, desired=latest.desired, desired_meta=latest.desired_meta
            )
        except StoreError as e:
            log.error("shadow: cannot re-read the stored document: %s", e)
        return (
            Rejected(
                409,
                f"version conflict: version {self._doc.version} was stored by another writer first; get "
                "the document and send the update again",
                self._doc.version,
                client_token=result.client_token,
            ),
            True,
        )

    def _on_get(self, msg: InboundMessage) -> None:
        now = self._clock()
        with self._lock:
            try:
                request = parse_get(msg.payload)
            except BadRequest as e:
                topic, payload = (
                    self.topics.shadow_get_rejected,
                    _rejected(e.rejected(self._doc.version), now).to_payload(),
                )
            else:
                topic = self.topics.shadow_get_accepted
                payload = document_message(self._doc, now, request.client_token).to_payload()
            self._publish(topic, payload, 1, False)

    def _validate(self, merged: Tree, touched: frozenset[str]) -> Tree:
        signed = bool(self._file_settings.model.trusted_keys)
        # With trusted keys no byte of a model file is parsed before its signature is judged for those
        # bytes: its GGUF header is read at load, after its sha256 and manifest (agent.engine.supervisor).
        normalised = validate_desired(
            merged, touched, self._file_settings, check_board=self._check_board, read_header=not signed
        )
        if signed and any(k.startswith("model.") for k in touched):
            # Signed models only: the manifest is judged before the board fetches or loads a byte.
            target = effective_settings(self._file_settings, normalised, touched=touched)
            now, cur = self._clock(), self._executor.settings
            trust = Trust.from_texts(target.model.trusted_keys)
            floor = running_version(cur.model, cur.device.models_dir / cur.model.path, trust, now)
            problem = desired_model_problem(target, running=floor, now=now)
            if problem is not None:
                raise DesiredInvalid({"model.signature": problem})
        return normalised

    def _authorize(self, update: UpdateRequest, touched: frozenset[str]) -> str | None:
        """With trusted operator keys, changes to what a board fetches or runs must be signed (403 else)."""
        keys = self._file_settings.model.trusted_keys
        if not keys:
            return None
        guarded = needs_signature(touched)
        if not guarded and update.signature is None:
            return None  # n_ctx, telemetry, intake ...: broker credentials suffice
        why = verify_update(
            update.signature,
            update.desired,
            device=self._file_settings.device.id,
            version=update.version,
            trust=Trust.from_texts(keys),
            now=self._clock(),
        )
        if why is None:
            return None
        if not guarded:
            return f"bad signature: {why}"
        return f"{', '.join(guarded)} may only be changed by an update signed with an operator key this board trusts: {why}"

    def _seen_before(self, connection: int, digest: str) -> bool:
        return self._seen_connection == connection and digest in self._seen

    def _remember(self, connection: int, digest: str) -> None:
        if self._seen_connection != connection:
            self._seen_connection = connection
            self._seen.clear()
        self._seen.append(digest)

    # ------------------------------------------------------------------ reported and publishing (lock held)

    def _read_facts(self) -> dict[str, Any]:
        try:
            values = dict(self._facts())
        except Exception:  # facts are informative: a failing reader must not stop the shadow
            log.exception("shadow: reading the board facts failed")
            return dict(self._fact_values)
        return {k: v for k, v in values.items() if k in FACT_KEYS}

    def _reported(self) -> Tree:
        reported = unflatten(live_values(self._executor.settings))
        s = self._settled
        if s.errors:
            reported["errors"] = dict(sorted(s.errors.items()))
        if s.pending:
            reported["pending"] = dict(sorted(s.pending.items()))
        if self._applied_version is not None:
            reported["applied_version"] = self._applied_version
        reported.update(copy.deepcopy(self._fact_values))
        return reported

    def _update_reported(self, now: float, *, publish: bool = True) -> None:
        reported = self._reported()
        if reported != self._doc.reported:
            self._doc = set_reported(self._doc, reported, now)
            try:
                self._store.save_reported(self._doc, now)
            except StoreError as e:  # reported is rebuilt at every start: losing a write loses nothing
                log.warning("shadow: %s", e)
        if publish:
            self._publish_state(now)

    def _publish_state(self, now: float) -> None:
        """Publish the retained document if it changed, and the delta if that set changed and is not empty."""
        if not self._connected_once:
            return  # on_connect publishes it
        doc = self._doc
        key = repr((doc.version, doc.desired, doc.reported))
        if key != self._published_state:
            self._publish(self.topics.shadow, document_message(doc, now).to_payload(), 1, True)
            self._published_state = key
        d = doc.delta()
        if d != self._published_delta:
            if d:
                self._publish(
                    self.topics.shadow_delta,
                    ShadowDelta.build(version=doc.version, state=d, ts=now).to_payload(),
                    1,
                    False,
                )
            self._published_delta = d


def _token(token: str | None) -> dict[str, str]:
    return {"client_token": token} if token is not None else {}


def _rejected(r: Rejected, now: float) -> ShadowRejected:
    extra: dict[str, Any] = _token(r.client_token)
    if r.errors:
        extra["errors"] = r.errors
    return ShadowRejected.build(code=r.code, message=r.message, version=r.version, ts=now, **extra)


def log_report(report: ApplyReport, why: str) -> None:
    """The log lines of an apply, one per key (one per reason for failed keys): ``why`` says what asked for it."""
    for key, value in report.applied.items():
        log.info("%s: %s = %r", why, key, value)
    # One line per reason: a failed model change fails model.path, model.sha256, model.url ... alike.
    by_reason: dict[str, list[str]] = {}
    for key, reason in report.failed.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        log.error("%s: %s not applied: %s", why, ", ".join(keys), reason)
    for key, reason in report.pending.items():
        log.warning("%s: %s: %s", why, key, reason)
    for key in report.restart:
        log.warning("%s: %s changed; it takes effect after a restart", why, key)


__all__ = ["Publish", "ShadowService"]
