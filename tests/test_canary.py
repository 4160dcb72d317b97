"""The canary: the pure judgement, the supervisor's rollback when a new model fails it (fake engines
kept honest by tests/test_contract_engine.py, then the real engine on two synthetic models), and
the check at start of a desired model that a restart would otherwise bring back unchecked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.config import Settings
from agent.config.sections import CanarySettings
from agent.engine.canary import judge, request
from agent.engine.supervisor import Applied, EngineConfig, Refused, Supervisor
from agent.engine.types import GenerationResult, GenerationStats
from agent.errors import ConfigError
from agent.models.synth import synth_model
from tests.test_supervisor import Factory, RunnerLog, settings


def result(text: str, tokens: int, finish: str = "length") -> GenerationResult:
    return GenerationResult(text, finish, GenerationStats(3, tokens, 1.0, 1.0, 10.0, 0))  # type: ignore[arg-type]


# ------------------------------------------------------------------ the judgement (pure)


def test_the_output_must_complete_in_time_and_have_enough_tokens() -> None:
    c = CanarySettings(prompt="hi", max_tokens=8, min_tokens=3)
    assert judge(c, result("a b c", 3), 5.0).passed
    late = judge(c, result("a b", 2, "timeout"), 5.0)
    assert not late.passed and "canary.timeout_s" in late.reason
    short = judge(c, result("a", 1, "stop"), 5.0)
    assert not short.passed and "fewer than canary.min_tokens = 3" in short.reason and short.output == "a"


def test_a_pattern_must_be_found_in_the_output() -> None:
    c = CanarySettings(prompt="2+2=", pattern=r"\b4\b")
    assert judge(c, result(" 4, of course", 4), 1.0).passed
    bad = judge(c, result(" five", 2), 1.0)
    assert not bad.passed and "does not match canary.pattern" in bad.reason


def test_a_json_schema_needs_json_that_satisfies_it() -> None:
    schema = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
    c = CanarySettings(prompt="status?", json_schema=schema)
    assert judge(c, result(' {"ok": true} ', 5), 1.0).passed
    assert "is not JSON" in judge(c, result("ok!", 2), 1.0).reason
    assert "does not satisfy canary.json_schema" in judge(c, result('{"ok": "yes"}', 5), 1.0).reason


def test_settings_are_checked_when_read() -> None:
    from pydantic import ValidationError

    for bad, why in (
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exclude each other"),
        ({"prompt": "a", "min_tokens": 9, "max_tokens": 4}, "must not exceed"),
        ({"prompt": "a", "pattern": "("}, "not a valid regular expression"),
        ({"prompt": "a", "json_schema": {"type": "nonsense"}}, "not a valid JSON Schema"),
    ):
        with pytest.raises(ValidationError, match=why):
            CanarySettings.model_validate(bad)
    assert not CanarySettings().enabled


def test_the_request_is_greedy_with_a_fixed_seed() -> None:
    r = request(CanarySettings(prompt="hi", max_tokens=5))
    assert (r.prompt, r.max_tokens, r.temperature, r.seed) == ("hi", 5, 0.0, 0)
    chat = request(CanarySettings(messages=[{"role": "user", "content": "hello"}]))
    assert chat.max_tokens == 16 and (getattr(chat, "messages", None) or "hello" in chat.prompt)


# ------------------------------------------------------------------ the supervisor (fake engines)


def test_a_model_that_fails_the_canary_is_rolled_back_by_the_supervisor(models: Path) -> None:
    f, runner = Factory(), RunnerLog()
    canary = CanarySettings(prompt="hello", max_tokens=4, pattern="^never$")
    sup = Supervisor(f, runner, grace_s=lambda: 1.0, canary=lambda: canary)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    out = sup.apply(EngineConfig.from_settings(settings(models, "b.gguf")))
    assert isinstance(out, Refused) and out.rolled_back and out.error.code == "canary_failed"
    assert out.canary is not None and out.canary.output == " w0 w1 w2 w3" and out.rollback_s is not None
    assert f.loaded() == ["a.gguf"] and sup.engine is f.made[0] and str(sup.config.model.path) == "a.gguf"
    assert "output: ' w0 w1 w2 w3'" in out.message and "previous model serves again" in out.message
    change = sup.last_change
    assert change.outcome == "canary_failed" and change.rollback_ms == pytest.approx(out.rollback_s * 1000)
    assert runner.calls[-1] == ("release", "model change")
    canary.pattern = r"w3$"  # settings are read at each swap
    ok = sup.apply(EngineConfig.from_settings(settings(models, "b.gguf")))
    assert isinstance(ok, Applied) and f.loaded() == ["b.gguf"]
    assert sup.last_change.outcome == "applied" and sup.last_change.canary.passed


def test_no_canary_configured_means_no_check(models: Path) -> None:
    f = Factory()
    sup = Supervisor(f, RunnerLog(), grace_s=lambda: 1.0, canary=lambda: CanarySettings())
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    assert isinstance(sup.apply(EngineConfig.from_settings(settings(models, "b.gguf"))), Applied)
    assert all(not e.runs for e in f.made)


def test_at_start_a_desired_model_that_fails_the_canary_gives_way_to_the_config_files(models: Path) -> None:
    f = Factory()
    sup = Supervisor(f, RunnerLog(), grace_s=lambda: 1.0,
                     canary=lambda: CanarySettings(prompt="x", pattern="^never$"))  # fmt: skip
    file_cfg = EngineConfig.from_settings(settings(models, "a.gguf"))
    got = sup.start(EngineConfig.from_settings(settings(models, "b.gguf")), fallback=file_cfg)
    assert got is file_cfg and f.loaded() == ["a.gguf"]


# ------------------------------------------------------------------ the real engine


def test_the_real_engine_rolls_back_by_itself_and_the_rollback_is_timed(tmp_path: Path, tiny_model: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_model, models / "a.gguf")
    synth_model("tiny", models / "b.gguf", seed=3, overrides={"n_layer": 3, "n_embd": 128})
    from agent.engine.supervisor import load_engine as default_engine_factory

    canary = CanarySettings(prompt="Say OK.", max_tokens=8, pattern="^OK$")
    sup = Supervisor(default_engine_factory, RunnerLog(), grace_s=lambda: 1.0, canary=lambda: canary)
    sup.start(EngineConfig.from_settings(settings(models, "a.gguf")))
    before = sup.engine.generate(request(CanarySettings(prompt="Say OK.", max_tokens=8)))
    out = sup.apply(EngineConfig.from_settings(settings(models, "b.gguf")))
    assert isinstance(out, Refused) and out.rolled_back and out.canary.tokens == 8
    assert sup.engine is not None and str(sup.config.model.path) == "a.gguf"
    after = sup.engine.generate(request(CanarySettings(prompt="Say OK.", max_tokens=8)))
    assert after.text == before.text  # the same model serves again (greedy: the same answer)
    print(
        f"\ncanary failed on b.gguf; back to a.gguf in {out.rollback_s * 1000:.1f} ms "
        f"(whole change {out.took_s * 1000:.1f} ms, canary {out.canary.took_ms:.1f} ms)"
    )


def test_canary_settings_errors_name_the_key(tmp_path: Path) -> None:
    from agent.config import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text('[canary]\nprompt = "x"\npattern = "(("\n')
    with pytest.raises(ConfigError, match="canary"):
        load_settings(cfg, environ={})
    assert Settings().canary.enabled is False


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("a.gguf", "b.gguf", "broken.gguf"):
        (d / name).write_bytes(name.encode())
    return d
