"""The model supervisor with fake engines (tests/test_contract_engine.py keeps them honest) and a
recording runner: one model at a time, the runner quiesced around a swap, rollback to the previous
model when the new one fails (load error, sha256 mismatch), and real loads of two synthetic models."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Settings
from agent.engine.supervisor import Applied, EngineConfig, Refused, Supervisor
from agent.errors import EngineError, ModelError
from agent.system.files import file_sha256
from tests.fakes import FakeEngine


class RunnerLog:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.preempt: list[str] = []

    def quiesce(self, grace_s: float, reason: str) -> list[str]:
        self.calls.append(("quiesce", grace_s))
        return list(self.preempt)

    def release(self, reason: str) -> None:
        self.calls.append(("release", reason))


def settings(models: Path, name: str, **engine) -> Settings:
    return Settings.model_validate({
        "device": {"id": "t", "state_dir": str(models.parent / "state"), "models_dir": str(models)},
        "model": {"path": name}, "engine": {"n_ctx": 256, "n_threads": 1, "load_mode": "fit", **engine},
        "memory": {"budget_mb": 1024},
    })  # fmt: skip


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("a.gguf", "b.gguf", "broken.gguf"):
        (d / name).write_bytes(name.encode())
    return d


class Factory:
    """Makes fake engines; ``broken`` names fail to load."""

    def __init__(self, broken: set[str] = frozenset({"broken.gguf"})) -> None:
        self.made: list[FakeEngine] = []
        self.broken = broken

    def __call__(self, cfg: EngineConfig) -> FakeEngine:
        e = FakeEngine(name=str(cfg.model.path))
        if str(cfg.model.path) in self.broken:
            e.load_error = EngineError("llama.cpp could not load it")
        self.made.append(e)
        return e

    def loaded(self) -> list[str]:
        return [e.name for e in self.made if e.loaded]


def test_a_swap_quiesces_the_runner_unloads_first_and_loads_the_new_model(models: Path) -> None:
    f, runner = Factory(), RunnerLog()
    sup = Supervisor(f, runner, grace_s=lambda: 7.0)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    assert f.loaded() == ["a.gguf"] and runner.calls == []
    runner.preempt = ["job-1"]
    out = sup.apply(EngineConfig.from_settings(settings(models, "b.gguf")))
    assert isinstance(out, Applied) and out.preempted == ["job-1"]
    assert f.loaded() == ["b.gguf"] and sup.engine is f.made[-1]
    assert runner.calls == [("quiesce", 7.0), ("release", "model change")]


def test_the_same_model_with_other_request_limits_needs_no_reload(models: Path) -> None:
    f, runner = Factory(), RunnerLog()
    sup = Supervisor(f, runner, grace_s=lambda: 1.0)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    out = sup.apply(EngineConfig.from_settings(settings(models, "a.gguf", max_tokens_limit=5)))
    assert isinstance(out, Applied) and out.report is None and len(f.made) == 1 and runner.calls == []


def test_at_start_a_failing_model_falls_back_to_the_config_files(models: Path) -> None:
    f = Factory()
    sup = Supervisor(f, RunnerLog(), grace_s=lambda: 1.0)
    desired = EngineConfig.from_settings(settings(models, "broken.gguf"))
    fallback = EngineConfig.from_settings(settings(models, "a.gguf"))
    assert sup.start(desired, fallback=fallback) is fallback and f.loaded() == ["a.gguf"]
    with pytest.raises(EngineError):  # without a different fallback the start fails
        Supervisor(Factory(), RunnerLog(), grace_s=lambda: 1.0).start(desired, fallback=desired)


def test_a_model_that_does_not_load_is_rolled_back(models: Path) -> None:
    f, runner = Factory(), RunnerLog()
    sup = Supervisor(f, runner, grace_s=lambda: 1.0)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    out = sup.apply(EngineConfig.from_settings(settings(models, "broken.gguf")))
    assert isinstance(out, Refused) and out.rolled_back and "could not load" in out.message
    assert "previous model serves again" in out.message
    assert f.loaded() == ["a.gguf"] and sup.engine is f.made[0] and str(sup.config.model.path) == "a.gguf"
    assert runner.calls[-1] == ("release", "model change")


def test_a_sha256_mismatch_is_refused_before_anything_loads(models: Path) -> None:
    f, runner = Factory(), RunnerLog()
    sup = Supervisor(f, runner, grace_s=lambda: 1.0)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    s = settings(models, "b.gguf")
    s.model.sha256 = "0" * 64
    out = sup.apply(EngineConfig.from_settings(s))
    assert isinstance(out, Refused) and isinstance(out.error, ModelError) and out.error.code == "model_sha256_mismatch"
    assert [e.name for e in f.made] == ["a.gguf"] and f.loaded() == ["a.gguf"]
    s.model.sha256 = file_sha256(models / "b.gguf")
    assert isinstance(sup.apply(EngineConfig.from_settings(s)), Applied) and sup.sha256 == s.model.sha256


def test_a_path_outside_the_models_folder_is_refused_and_rolled_back(models: Path, tmp_path: Path) -> None:
    f, runner = Factory(), RunnerLog()
    sup = Supervisor(f, runner, grace_s=lambda: 1.0)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    (tmp_path / "outside.gguf").write_bytes(b"x")
    out = sup.apply(EngineConfig.from_settings(settings(models, "../outside.gguf")))
    assert isinstance(out, Refused) and out.rolled_back and isinstance(out.error, ModelError)
    assert f.loaded() == ["a.gguf"]


def test_real_models_of_two_shapes_swap_and_roll_back(tmp_path: Path, tiny_model: Path) -> None:
    """The real engine: tiny (2 layers) to a second, differently shaped synthetic model, then to a
    file llama.cpp cannot load although its header reads fine, and back."""
    from agent.engine.supervisor import load_engine as default_engine_factory
    from agent.models.synth import synth_model

    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_model.read_bytes())
    synth_model("tiny", models / "other.gguf", seed=3, overrides={"n_layer": 3, "n_embd": 128})
    runner = RunnerLog()
    sup = Supervisor(default_engine_factory, runner, grace_s=lambda: 1.0)
    sup.start(EngineConfig.from_settings(settings(models, "tiny.gguf")))
    first = sup.engine.report
    out = sup.apply(EngineConfig.from_settings(settings(models, "other.gguf")))
    assert isinstance(out, Applied) and out.report.model.endswith("other.gguf")
    assert out.report.estimate.n_ctx == first.estimate.n_ctx
    data = bytearray((models / "other.gguf").read_bytes())
    arch = data.find(b"llama")
    data[arch : arch + 5] = b"zzzzz"  # an architecture this build does not know
    (models / "unknown-arch.gguf").write_bytes(bytes(data))
    out = sup.apply(EngineConfig.from_settings(settings(models, "unknown-arch.gguf")))
    assert isinstance(out, Refused) and out.rolled_back
    assert sup.engine is not None and sup.engine.report.model.endswith("other.gguf")
    sup.unload()
