"""The model supervisor: the only code that loads, swaps or unloads the model.

``apply(EngineConfig)`` replaces the model in force by the one a new configuration describes: it
quiesces the run gate (agent.jobs.gate: running jobs finish within the grace period, or are
preempted), unloads the old model (never two models in memory at once: a board has room for one), loads the new one, runs
the canary on it (agent/engine/canary.py) while no job can reach it yet and, when the load or the
canary fails (a corrupt or unknown file, a sha256 that does not match, a model that does not fit, a
model that answers wrongly), loads the previous one again and measures how long that took. The
engine in force is read by the runner through ``engine``; ``last_change`` says how the last model
change ended, for reported state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.config import Settings
from agent.config.sections import CanarySettings, EngineSettings, MemorySettings, ModelSettings
from agent.engine.canary import CanaryFailed, CanaryResult, run_canary
from agent.engine.types import EngineLike, LoadReport, RequestLimits
from agent.errors import EdgeAgentError, EngineError, ModelError
from agent.models.paths import resolve_model_path
from agent.system.files import file_sha256

log = logging.getLogger(__name__)

# The gate holds a model change and a memory unload take.
HOLD = "model change"
PARK = "model unloaded for memory"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the model owner needs to load a model: what changes here means a reload."""

    model: ModelSettings
    engine: EngineSettings
    memory: MemorySettings
    models_dir: Path
    state_dir: Path

    @classmethod
    def from_settings(cls, s: Settings) -> EngineConfig:
        return cls(
            model=s.model.model_copy(),
            engine=s.engine.model_copy(),
            memory=s.memory.model_copy(),
            models_dir=s.device.models_dir,
            state_dir=s.device.state_dir,
        )

    def model_file(self) -> Path:
        """model.path resolved, inside models_dir (ModelError otherwise)."""

        return resolve_model_path(self.model.path, self.models_dir)

    def same_model(self, other: EngineConfig | None) -> bool:
        """Whether ``other`` loads the same model the same way (only request limits may differ)."""
        if other is None:
            return False
        limits = {"context_overflow", "max_tokens_limit", "max_prompt_bytes"}
        # Where a file came from (url, size) and how many old ones are kept do not change what is loaded.
        loaded = {"path", "sha256", "allow_non_4bit"}
        return (
            self.model.model_dump(include=loaded) == other.model.model_dump(include=loaded)
            and self.memory == other.memory
            and self.models_dir == other.models_dir
            and self.engine.model_dump(exclude=limits) == other.engine.model_dump(exclude=limits)
        )


class RunGate(Protocol):
    def quiesce(self, grace_s: float, reason: str) -> list[str]: ...

    def release(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Applied:
    report: LoadReport | None  # None when nothing needed loading
    preempted: list[str] = field(default_factory=list)
    took_s: float = 0.0


@dataclass(frozen=True)
class Refused:
    error: EdgeAgentError
    rolled_back: bool  # the previous model serves again
    preempted: list[str] = field(default_factory=list)
    took_s: float = 0.0
    canary: CanaryResult | None = None  # when the new model loaded and failed the canary
    rollback_s: float | None = None  # from the failure to the previous model serving again

    @property
    def message(self) -> str:
        back = "the previous model serves again" if self.rolled_back else "no model is loaded"
        return f"{self.error} ({back})"


@dataclass(frozen=True)
class ModelChange:
    """How the last model change ended (reported under ``model_change`` in the shadow)."""

    path: str
    sha256: str | None  # asked for (model.sha256)
    outcome: str  # applied | canary_failed | load_failed
    message: str | None
    at: float  # epoch seconds
    took_ms: float  # quiesce + unload + load + canary (+ rollback)
    preempted: int
    canary: CanaryResult | None = None
    rollback_ms: float | None = None  # failure -> the previous model serving again
    rolled_back: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "outcome": self.outcome,
            "message": self.message,
            "at": self.at,
            "took_ms": round(self.took_ms, 1),
            "preempted": self.preempted,
            "canary": self.canary.as_dict() if self.canary else None,
            "rollback_ms": None if self.rollback_ms is None else round(self.rollback_ms, 1),
            "rolled_back": self.rolled_back,
        }


class Supervisor:
    def __init__(
        self,
        factory: Callable[[EngineConfig], EngineLike],
        gate: RunGate,
        *,
        grace_s: Callable[[], float],
        canary: Callable[[], CanarySettings | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``factory`` makes an unloaded engine for a configuration; ``grace_s()`` is how long
        running jobs may take to finish before a swap preempts them (read at each swap); ``canary()``
        is the check a new model must pass (read at each swap; None or not enabled: no check)."""
        self._factory = factory
        self._gate = gate
        self._grace_s = grace_s
        self._canary = canary
        self._clock = clock
        self._lock = threading.Lock()  # one load at a time
        self._engine: EngineLike | None = None
        self._config: EngineConfig | None = None
        self._parked = False  # unloaded under memory pressure; resume() loads it again
        self._parked_need: tuple[int, int] | None = None
        self.sha256: str | None = None  # of the file in force, when it was checked
        self.loaded_at: float | None = None  # when the model in force was loaded, epoch seconds
        self.last_swap_ms: float | None = None  # the last model change: quiesce + unload + load
        self.last_swap_preempted: int | None = None  # jobs the last model change preempted
        self.last_change: ModelChange | None = None
        self._last_canary: CanaryResult | None = None

    @property
    def engine(self) -> EngineLike | None:
        """The loaded engine, or None (nothing loaded, or a swap in progress)."""
        e = self._engine
        return e if e is not None and e.loaded else None

    @property
    def report(self) -> Any:
        """The loaded engine's ``LoadReport`` (its memory plan and slots), or None."""
        e = self.engine
        return e.report if e is not None else None

    @property
    def slots(self) -> int:
        """Jobs the loaded engine can run at once (1 when nothing is loaded)."""
        e = self.engine
        return e.slots if e is not None else 1

    @property
    def config(self) -> EngineConfig | None:
        return self._config

    def start(self, config: EngineConfig, *, fallback: EngineConfig | None = None) -> EngineConfig:
        """The first load; returns the configuration in force. When ``config``'s model does not load
        and ``fallback`` names another one, that is loaded instead (the daemon's config file, when the
        shadow's desired model fails: a remote change must never keep a board from starting).
        Errors propagate: the daemon cannot start without a model."""
        with self._lock:
            engine: EngineLike | None = None
            try:
                engine, _ = self._load(config)
                if fallback is not None and not fallback.same_model(config):
                    # A remote change that failed its canary before a restart must not come back unchecked.
                    self._check(engine, config)
            except EdgeAgentError as e:
                if fallback is None or fallback.same_model(config):
                    raise
                if engine is not None:
                    engine.unload()
                log.error("the desired model did not load at start (%s); starting with the config file's", e)
                engine, _ = self._load(fallback)
                config = fallback
            self._engine, self._config = engine, config
            return config

    def set_limits(self, engine_settings: EngineSettings) -> None:
        """Per-request limits change in place, without a reload."""
        with self._lock:
            if self._engine is not None:
                self._engine.limits = RequestLimits.from_settings(engine_settings)
            if self._config is not None:
                self._config = EngineConfig(
                    self._config.model,
                    engine_settings.model_copy(),
                    self._config.memory,
                    self._config.models_dir,
                    self._config.state_dir,
                )

    @property
    def parked(self) -> bool:
        return self._parked

    def apply(self, config: EngineConfig) -> Applied | Refused:
        """Serve ``config``'s model. On failure (load or canary) the previous model is loaded again.
        While the model is unloaded for memory, the change is only recorded: resume() loads it."""
        with self._lock:
            if config.same_model(self._config):
                return Applied(None)
            if self._parked:
                log.info("model change to %s recorded: it loads when memory recovers", config.model.path)
                self._config, self._engine = config, None
                return Applied(None)
            t0 = self._clock()
            preempted = self._gate.quiesce(self._grace_s(), HOLD)
            try:
                old_engine, old_config, old_sha, old_loaded_at = self._engine, self._config, self.sha256, self.loaded_at
                if old_engine is not None:
                    old_engine.unload()
                self._engine = None
                engine: EngineLike | None = None
                try:
                    engine, report = self._load(config)
                    self._check(engine, config)
                except Exception as e:  # noqa: BLE001  every failure rolls back; the error says why
                    err = e if isinstance(e, EdgeAgentError) else EngineError(f"{type(e).__name__}: {e}")
                    t_fail = self._clock()
                    log.error(
                        "model change to %s failed: %s; going back to %s",
                        config.model.path,
                        err,
                        old_config.model.path if old_config else "nothing",
                    )
                    if engine is not None:
                        engine.unload()  # loaded, but failed the canary: never two models at once
                    rolled_back = self._roll_back(old_engine)
                    back = self._clock()
                    self.sha256, self.loaded_at = old_sha, old_loaded_at
                    canary = err.result if isinstance(err, _CanaryError) else None
                    refused = Refused(
                        err.error if isinstance(err, _CanaryError) else err,
                        rolled_back,
                        preempted,
                        back - t0,
                        canary,
                        back - t_fail,
                    )
                    log.warning(
                        "model change to %s refused; %s in %.0f ms",
                        config.model.path,
                        "the previous model serves again" if rolled_back else "no model is loaded",
                        (back - t_fail) * 1000,
                    )
                    self.last_change = ModelChange(
                        str(config.model.path),
                        config.model.sha256,
                        "canary_failed" if canary is not None else "load_failed",
                        refused.message,
                        time.time(),
                        (back - t0) * 1000,
                        len(preempted),
                        canary,
                        (back - t_fail) * 1000,
                        rolled_back,
                    )
                    return refused
                self._engine, self._config = engine, config
                took = self._clock() - t0
                self.last_swap_ms, self.last_swap_preempted = took * 1000, len(preempted)
                self.last_change = ModelChange(
                    str(config.model.path),
                    config.model.sha256,
                    "applied",
                    None,
                    time.time(),
                    took * 1000,
                    len(preempted),
                    self._last_canary,
                )
                log.info(
                    "model change to %s done in %.1fs (%d job(s) preempted)", config.model.path, took, len(preempted)
                )
                return Applied(report, preempted, took)
            finally:
                self._gate.release(HOLD)

    def unload(self) -> None:
        """Free the model (shutdown). The runner must have stopped using it."""
        with self._lock:
            if self._engine is not None:
                self._engine.unload()

    def park(self) -> list[str]:
        """Unload the model under memory pressure: running jobs are preempted first (requeued), no
        job starts until resume(). Returns the preempted ids."""
        with self._lock:
            if self._parked:
                return []
            preempted = self._gate.quiesce(0, PARK)
            if self._engine is not None:
                report = self._engine.report
                self._engine.unload()
                if report is not None:
                    self._parked_need = (report.estimate.anon_bytes, report.estimate.file_bytes)
            self._parked = True
            log.warning("model unloaded under memory pressure (%d job(s) preempted)", len(preempted))
            return preempted

    def parked_need(self) -> tuple[int, int] | None:
        """While parked: the anonymous bytes and the weights (file pages kept in RAM) the model in
        force needs when it is loaded again, from its last plan; None while it is loaded."""
        return self._parked_need if self._parked else None

    def resume(self) -> Applied | Refused:
        """Load the model in force again after park(): the configuration recorded last (a model
        change may have arrived meanwhile), else the previous model, else nothing."""
        with self._lock:
            if not self._parked:
                return Applied(None)
            t0 = self._clock()
            try:
                assert self._config is not None
                engine = self._engine if self._engine is not None else None
                if engine is not None:
                    report = engine.load()
                else:
                    engine, report = self._load(self._config)
                self._engine, self._parked = engine, False
                log.info("model reloaded after memory pressure in %.1fs", self._clock() - t0)
                return Applied(report, [], self._clock() - t0)
            except Exception as e:  # noqa: BLE001
                err = e if isinstance(e, EdgeAgentError) else EngineError(f"{type(e).__name__}: {e}")
                log.error("reloading the model after memory pressure failed: %s", err)
                return Refused(err, False, [], self._clock() - t0)
            finally:
                if not self._parked:
                    self._gate.release(PARK)

    def _load(self, config: EngineConfig) -> tuple[EngineLike, LoadReport]:
        path = config.model_file()
        sha = None
        if config.model.sha256 is not None:
            sha = file_sha256(path)
            if sha != config.model.sha256:
                raise ModelError(
                    f"{path.name}: sha256 {sha} does not match model.sha256 {config.model.sha256}",
                    code="model_sha256_mismatch",
                )
        if config.model.trusted_keys:  # signed models only: checked before llama.cpp reads a byte of the file
            # costly: cryptography (OpenSSL), loaded only on a board with trusted keys
            from agent.signing import running_version, verify_model_file

            sha, now, old = sha or file_sha256(path), time.time(), self._config
            floor = running_version(old.model, old.models_dir / old.model.path, _trust(config), now) if old else None
            verify_model_file(config.model, path, sha, running=floor, now=now)
        engine = self._factory(config)
        report = engine.load()
        self.sha256, self.loaded_at = sha, time.time()
        return engine, report

    def _check(self, engine: EngineLike, config: EngineConfig) -> None:
        """Run the canary on a freshly loaded engine; raise _CanaryError when it fails."""
        self._last_canary = None
        c = self._canary()
        if c is None or not c.enabled:
            return
        result = run_canary(engine, c)
        self._last_canary = result
        if result.passed:
            log.info("canary passed on %s: %d token(s) in %.0f ms", config.model.path, result.tokens, result.took_ms)
            return
        error = CanaryFailed(f"canary_failed: {config.model.path}: {result.reason}; output: {result.output!r}")
        raise _CanaryError(error, result)

    def _roll_back(self, old: EngineLike | None) -> bool:
        if old is None:
            return False
        try:
            old.load()
        except Exception:  # noqa: BLE001
            log.exception("the previous model did not load again either: no model is loaded")
            return False
        self._engine = old
        return True


def _trust(config: EngineConfig) -> Any:
    from agent.signing import Trust  # costly: see above

    return Trust.from_texts(config.model.trusted_keys)


class _CanaryError(EdgeAgentError):
    """Carries a canary failure through the rollback path (the error reported is ``error``)."""

    code = "canary_failed"

    def __init__(self, error: CanaryFailed, result: CanaryResult) -> None:
        super().__init__(str(error))
        self.error = error
        self.result = result


def load_engine(config: EngineConfig) -> EngineLike:
    """The daemon's engine factory: the real llama.cpp engine for ``config`` (constructed unloaded)."""
    from agent.engine import Engine  # costly (loads llama.cpp): not for the CLI's other commands

    return Engine(
        config.model_file(),
        engine=config.engine,
        memory=config.memory,
        allow_non_4bit=config.model.allow_non_4bit,
        state_dir=config.state_dir,
    )


__all__ = ["Applied", "EngineConfig", "ModelChange", "Refused", "Supervisor", "load_engine"]
