"""Operator signatures (agent/signing.py), pure: keys, model manifests, signed updates, and the
supervisor refusing an unsigned or wrongly signed model before llama.cpp reads it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config.sections import ModelSettings
from agent.engine.supervisor import file_sha256
from agent.signing import (
    SignatureError,
    Trust,
    check_claims,
    generate_key,
    load_private_key,
    needs_signature,
    parse_public_key,
    sign_model,
    sign_update,
    verify_manifest,
    verify_model_file,
    verify_update,
)

NOW = 1_800_000_000.0


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[object, str]]:
    out = {}
    for name in ("a", "b"):
        _, public = generate_key(tmp_path / f"{name}.key")
        out[name] = (load_private_key(tmp_path / f"{name}.key"), public)
    return out


def _file(tmp_path: Path, name: str = "m.gguf", data: bytes = b"GGUF model bytes") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _manifest(path: Path, key: object, **kw: object) -> str:
    return json.dumps(sign_model(path, key, sha256=file_sha256(path), **kw))  # type: ignore[arg-type]


def test_a_generated_key_is_private_and_never_overwritten(tmp_path: Path) -> None:
    pub, text = generate_key(tmp_path / "op.key")
    assert os.stat(tmp_path / "op.key").st_mode & 0o777 == 0o600
    assert pub.read_text().strip() == text and text.startswith("ed25519:")
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "op.key")
    with pytest.raises(ValueError, match="32"):
        parse_public_key("ed25519:AAAA")
    with pytest.raises(ValueError, match="ed25519:"):
        ModelSettings(trusted_keys=["rsa:xyz"])


def test_a_manifest_verifies_and_says_what_it_signs(tmp_path: Path, keys: dict) -> None:
    f = _file(tmp_path)
    trust = Trust.from_texts([keys["a"][1]])
    claims = verify_manifest(_manifest(f, keys["a"][0], version=3, expires="2030-01-01T00:00:00Z"), trust, NOW)
    assert (claims.file, claims.sha256, claims.size, claims.version) == ("m.gguf", file_sha256(f), 16, 3)
    check_claims(claims, name="m.gguf", sha256=file_sha256(f), size=16, running_version=3)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("unknown key", "does not trust"),
        ("tampered", "does not verify"),
        ("truncated signature", "bytes, an Ed25519 signature has 64"),
        ("truncated manifest", "not valid JSON"),
        ("expired", "expired at 2020-01-01T00:00:00Z"),
        ("bad base64", "not valid base64"),
    ],
)
def test_a_bad_manifest_is_refused_with_its_reason(tmp_path: Path, keys: dict, attack: str, reason: str) -> None:
    f = _file(tmp_path)
    trust = Trust.from_texts([keys["a"][1]])
    signer = keys["b"][0] if attack == "unknown key" else keys["a"][0]
    data = json.loads(_manifest(f, signer, version=2, expires="2020-01-01T00:00:00Z" if attack == "expired" else None))
    if attack == "tampered":
        data["signed"]["version"] = 99
    if attack == "truncated signature":
        data["signature"] = data["signature"][:40]
    if attack == "bad base64":
        data["signature"] = data["signature"][:-3]
    text = json.dumps(data)[:-30] if attack == "truncated manifest" else json.dumps(data)
    with pytest.raises(SignatureError, match=reason):
        verify_manifest(text, trust, NOW)


def test_other_bytes_another_name_and_a_rollback_are_refused(tmp_path: Path, keys: dict) -> None:
    f = _file(tmp_path)
    trust = Trust.from_texts([keys["a"][1]])
    claims = verify_manifest(_manifest(f, keys["a"][0], version=2), trust, NOW)
    with pytest.raises(SignatureError, match="for other bytes"):
        check_claims(claims, name="m.gguf", sha256="0" * 64, size=None, running_version=None)
    with pytest.raises(SignatureError, match="for other bytes"):
        check_claims(claims, name="m.gguf", sha256=None, size=17, running_version=None)
    with pytest.raises(SignatureError, match="for the file 'm.gguf', not 'x.gguf'"):
        check_claims(claims, name="x.gguf", sha256=None, size=None, running_version=None)
    with pytest.raises(SignatureError, match="rollback refused: m.gguf is signed as version 2, the running model as"):
        check_claims(claims, name="m.gguf", sha256=None, size=None, running_version=3)
    # An explicit, expiring downgrade permit by the operator is the way back.
    down = verify_manifest(_manifest(f, keys["a"][0], version=2, downgrade=True, expires="2030-01-01T00:00:00Z"),
                           trust, NOW)  # fmt: skip
    check_claims(down, name="m.gguf", sha256=None, size=None, running_version=3)


def test_rotation_two_keys_then_the_old_one_retired(tmp_path: Path, keys: dict) -> None:
    f = _file(tmp_path)
    old = _manifest(f, keys["a"][0])
    both = Trust.from_texts([keys["a"][1], keys["b"][1]])
    verify_manifest(old, both, NOW)
    verify_manifest(_manifest(f, keys["b"][0]), both, NOW)
    with pytest.raises(SignatureError, match="does not trust"):
        verify_manifest(old, Trust.from_texts([keys["b"][1]]), NOW)


def test_a_signed_update_holds_for_one_device_version_patch_and_time(keys: dict) -> None:
    key, public = keys["a"]
    trust = Trust.from_texts([public])
    patch = {"model": {"path": "n.gguf"}}
    sig = sign_update(patch, device="d1", version=4, key=key, expires="2030-01-01T00:00:00Z")
    ok = {"device": "d1", "version": 4, "trust": trust, "now": NOW}
    assert verify_update(sig, patch, **ok) is None  # type: ignore[arg-type]
    assert "unsigned" in str(verify_update(None, patch, **ok))  # type: ignore[arg-type]
    assert "does not verify" in str(verify_update(sig, {"model": {"path": "evil.gguf"}}, **ok))  # type: ignore[arg-type]
    assert "does not verify" in str(verify_update(sig, patch, **{**ok, "version": 5}))  # type: ignore[arg-type]
    assert "does not verify" in str(verify_update(sig, patch, **{**ok, "device": "d2"}))  # type: ignore[arg-type]
    assert "expired" in str(verify_update(sig, patch, **{**ok, "now": 2e9}))  # type: ignore[arg-type]
    assert "must name the document version" in str(verify_update(sig, patch, **{**ok, "version": None}))  # type: ignore[arg-type]
    assert "does not trust" in str(verify_update(sig, patch, **{**ok, "trust": Trust.from_texts([keys["b"][1]])}))  # type: ignore[arg-type]
    assert needs_signature(["engine.n_ctx", "model.path", "canary.json_schema", "model", "intake.paused"]) == [
        "canary.json_schema", "model", "model.path"
    ]  # fmt: skip


def test_the_supervisor_check_refuses_before_loading(tmp_path: Path, keys: dict) -> None:
    f = _file(tmp_path)
    good = ModelSettings(path=Path("m.gguf"), trusted_keys=[keys["a"][1]])
    with pytest.raises(SignatureError, match="is not signed: no model.signature and no m.gguf.sig"):
        verify_model_file(good, f, file_sha256(f), running=None, now=NOW)
    (tmp_path / "m.gguf.sig").write_text(_manifest(f, keys["a"][0], version=1))
    assert verify_model_file(good, f, file_sha256(f), running=None, now=NOW).version == 1
    f.write_bytes(b"GGUF other bytes")  # the same size, other bytes
    with pytest.raises(SignatureError, match="for other bytes"):
        verify_model_file(good, f, file_sha256(f), running=None, now=NOW)


def test_cli_generate_and_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _file(tmp_path)
    assert main(["keys", "generate", str(tmp_path / "op.key")]) == 0
    assert "trusted_keys" in capsys.readouterr().out
    assert main(["model", "sign", str(f), "--key", str(tmp_path / "op.key"), "--version", "7"]) == 0
    assert main(["model", "sign", str(f), "--key", str(tmp_path / "op.key"), "--downgrade"]) == 2
    public = (tmp_path / "op.key.pub").read_text().strip()
    claims = verify_manifest((tmp_path / "m.gguf.sig").read_text(), Trust.from_texts([public]), time.time())
    assert claims.version == 7 and claims.sha256 == file_sha256(f)


def test_doctor_shows_the_trusted_keys_and_whether_the_model_signature_holds(tmp_path: Path, keys: dict) -> None:
    from agent.config import Settings
    from agent.ops.doctor import check_signature

    f = _file(tmp_path)
    plain = Settings(device={"models_dir": tmp_path, "state_dir": tmp_path / "s"}, model={"path": "m.gguf"})
    assert check_signature(plain).status == "OK" and "not required" in check_signature(plain).summary
    s = Settings(device={"models_dir": tmp_path, "state_dir": tmp_path / "s"},
                 model={"path": "m.gguf", "trusted_keys": [keys["a"][1], keys["b"][1]]})  # fmt: skip
    c = check_signature(s)
    assert c.status == "FAIL" and "trusts 2 key(s)" in c.summary and "is not signed" in c.summary
    assert "edge-agent model sign m.gguf" in str(c.fix)
    (tmp_path / "m.gguf.sig").write_text(_manifest(f, keys["b"][0], version=5))
    c = check_signature(s)
    assert c.status == "OK" and "version 5" in c.summary and "name, size and sha256 match" in c.summary, c
    f.write_bytes(b"GGUF other bytes")
    assert "for other bytes" in check_signature(s).summary
    assert check_signature(s, None).status == "OK"  # --no-sha256: the name and size still match


# ------------------------------------------------------------------------------- refused updates as events


def test_the_rate_limit_lets_a_burst_through_then_counts_and_tells_the_count_once() -> None:
    from agent.telemetry.events import RateLimit

    limit = RateLimit(burst=3, window_s=60.0)
    assert [limit.allow(100.0 + i) for i in range(10)] == [True] * 3 + [False] * 7
    assert limit.overflow(159.0) == 0  # the window is not over yet
    assert limit.overflow(160.0) == 7 and limit.overflow(160.0) == 0  # told once
    assert [limit.allow(161.0 + i) for i in range(3)] == [True, True, False]  # the count was this window's first
    assert limit.overflow(300.0) == 1
    assert limit.allow(400.0) and limit.overflow(500.0) == 0  # a quiet window tells nothing


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _service(tmp_path: Path, public: str, clock: _Clock, sent: list) -> object:
    from agent.config import Settings
    from agent.mqtt.topics import Topics
    from agent.shadow.service import ShadowService
    from agent.shadow.store import ShadowStore
    from tests.shadow_harness import FakeExecutor

    settings = Settings.model_validate(
        {"device": {"id": "dev-e", "models_dir": str(tmp_path), "state_dir": str(tmp_path / "state")},
         "model": {"path": "m.gguf", "trusted_keys": [public]}}
    )  # fmt: skip
    (tmp_path / "state").mkdir()
    service = ShadowService(
        topics=Topics("edge", "dev-e"), store=ShadowStore.from_settings(settings), file_settings=settings,
        executor=FakeExecutor(settings), publish=lambda *a: None, clock=clock, check_board=False,
        send_event=sent.append,
    )  # fmt: skip
    service.start()
    return service


def _update(service: object, body: dict) -> None:
    from agent.mqtt.transport import InboundMessage

    service.on_message(InboundMessage("edge/dev-e/shadow/update", json.dumps(body).encode(), 1, False, 1))  # type: ignore[attr-defined]


def test_refused_updates_are_events_with_their_reason_and_no_values_at_most_three_a_minute(
    tmp_path: Path, keys: dict, caplog: pytest.LogCaptureFixture
) -> None:
    key, public = keys["a"]
    clock, sent = _Clock(NOW), []
    service: Any = _service(tmp_path, public, clock, sent)
    url = "https://models.example/evil.gguf?token=s3cret"
    evil = {"model": {"path": "evil.gguf", "url": url, "sha256": "e" * 64}}
    _update(service, {"state": {"desired": evil}})  # unsigned
    _update(service, {"state": {"desired": {"engine": {"max_tokens_limit": 2}}}})  # not guarded: accepted
    _update(service, {"state": {"desired": {"engine": {"max_tokens_limit": "x"}}}})  # a plain mistake: 400, no event
    assert service.pending_work()
    service.run_pending()
    (e,) = sent
    assert e.kind == "update_refused" and e.details["code"] == 403 and e.device_id == "dev-e"
    assert e.details["keys"] == ["model.path", "model.sha256", "model.url"]
    assert "the update is unsigned" in e.message and "may only be changed by an update signed" in e.details["reason"]
    assert "s3cret" not in e.to_payload().decode() and "evil.gguf" not in e.to_payload().decode()

    # Signed by a key the board does not trust: its id is named (it is the operator's lead).
    other = keys["b"][0]
    sig = sign_update(evil, device="dev-e", version=1, key=other, expires="2030-01-01T00:00:00Z")
    _update(service, {"state": {"desired": evil}, "version": 1, "signature": sig})
    # A signed update replayed at a version that is gone: 409, told too.
    good = sign_update(
        {"model": {"keep_previous": 2}}, device="dev-e", version=0, key=key, expires="2030-01-01T00:00:00Z"
    )
    _update(service, {"state": {"desired": {"model": {"keep_previous": 2}}}, "version": 0, "signature": good})
    service.run_pending()
    assert [x.details["code"] for x in sent[1:]] == [403, 409]
    assert sent[1].details["key_id"] == sig["key_id"] and "does not trust" in sent[1].message
    assert "replayed, or raced" in sent[2].message

    # A flood: 20 more within the minute, none told one by one (3 a minute), then their count once; the
    # log does not repeat them either.
    sent.clear()
    caplog.clear()
    for _ in range(20):
        clock.t += 1
        _update(service, {"state": {"desired": evil}})
    service.run_pending()
    assert sent == []
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "update rejected" in r.getMessage()]
    clock.t = NOW + 60
    assert service.pending_work()  # the window is over: the count is due without a new refusal
    service.run_pending()
    (summary,) = sent
    assert summary.kind == "update_refused" and summary.details["suppressed"] == 20
    service.run_pending()
    assert len(sent) == 1 and not service.pending_work()


def test_doctor_judges_the_signature_before_it_reads_the_models_header(
    tmp_path: Path, keys: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.engine.plan
    import agent.models.gguf_info
    import agent.ops.doctor
    from agent.ops.doctor import run_doctor
    from tests.daemon_harness import to_toml

    real, read = agent.models.gguf_info.read_model_info, []

    def recording(path: Any) -> Any:
        read.append(Path(path).name)
        return real(path)

    for module in (agent.models.gguf_info, agent.engine.plan, agent.ops.doctor):  # every module that reads headers
        monkeypatch.setattr(module, "read_model_info", recording)
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.gguf").write_bytes(b"\x00not a gguf file" * 64)
    cfg = tmp_path / "config.toml"
    cfg.write_text(to_toml({"device": {"models_dir": str(models), "state_dir": str(tmp_path / "state")},
                            "mqtt": {"host": "127.0.0.1", "port": 9}, "model": {"path": "m.gguf",
                            "trusted_keys": [keys["a"][1]]}}))  # fmt: skip
    checks = {c.name: c for c in run_doctor(cfg, broker_timeout=0.5).checks}
    assert checks["model signature"].status == "FAIL" and "is not signed" in checks["model signature"].summary
    assert checks["model"].status == "SKIP" and checks["memory plan"].status == "SKIP"
    assert read == []  # the header reader never touched the unsigned file
    # Signed, its header is read: the model check says what the file is.
    (models / "m.gguf.sig").write_text(_manifest(models / "m.gguf", keys["a"][0]))
    checks = {c.name: c for c in run_doctor(cfg, broker_timeout=0.5).checks}
    assert checks["model signature"].status == "OK", checks["model signature"]
    assert checks["model"].status == "FAIL" and "GGUF" in checks["model"].summary and read == ["m.gguf"]
