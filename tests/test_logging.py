"""Log formats, journald, and the secret filter (agent.ops.logs); progress of long operations
(agent.system.progress)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.ops.logs import MASK, AgentFormatter, Masker, configure_from_settings, configure_logging, journald_stream
from agent.system.progress import LogProgress, choose_mode, progress

EDGE_AGENT = [sys.executable, "-m", "agent"]


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _capture(fmt: str = "text", environ: dict | None = None, secrets=()) -> io.StringIO:
    buf = io.StringIO()
    configure_logging(logging.DEBUG, fmt, stream=buf, environ=environ or {}, secrets=secrets)  # type: ignore[arg-type]
    return buf


# ------------------------------------------------------------------------------------ secrets

LEAKS = [
    ("password=hunter2 and more", "hunter2"),
    ("mqtt_password: s3cr3t!", "s3cr3t!"),
    ('{"password": "p\\"w"}', 'p\\"w'),
    ("{'password': 'pw-in-repr'}", "pw-in-repr"),
    ("Authorization: Bearer eyJhbGciOi.x.y", "eyJhbGciOi.x.y"),
    ("headers={'Authorization': 'Basic dXNlcjpwdw=='}", "dXNlcjpwdw=="),
    ("token bearer abc.DEF-ghi_123", "abc.DEF-ghi_123"),
    ("connecting to mqtts://dev:pa55word@broker:8883", "pa55word"),
    ("access_token=ya29.a0Af", "ya29.a0Af"),
]


@pytest.mark.parametrize("text,secret", LEAKS)
def test_masker_patterns(text: str, secret: str):
    out = Masker()(text)
    assert secret not in out and MASK in out


def test_masker_leaves_ordinary_text_alone():
    m = Masker(["ab"])  # too short to mask everywhere
    for text in ("max_tokens=64 prompt_tokens: 5", "password is required", "labels ab cd", "tokens: 12"):
        assert m(text) == text


def test_a_registered_secret_is_masked_in_message_args_extra_fields_and_tracebacks():
    buf = _capture("kv", secrets=["correct horse battery"])
    log = logging.getLogger("agent.test")
    log.info("connecting with %s", "correct horse battery", extra={"note": "pw correct horse battery"})
    try:
        raise RuntimeError("auth failed for correct horse battery")
    except RuntimeError:
        log.exception("boom")
    out = buf.getvalue()
    assert "correct horse" not in out and out.count(MASK) >= 3


def test_configure_from_settings_masks_the_mqtt_password(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[mqtt]\nusername = "dev"\npassword = "broker-pw-123"\n[service]\nlog_format = "json"\n')
    buf = _capture()
    handler = logging.getLogger().handlers[0]
    configure_from_settings(load_settings(cfg, environ={}), environ={})
    handler = logging.getLogger().handlers[0]
    handler.setStream(buf)  # type: ignore[attr-defined]
    logging.getLogger("agent.mqtt.transport").warning("paho said: bad credentials broker-pw-123")
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert line["msg"] == f"paho said: bad credentials {MASK}" and line["level"] == "warning"


# ------------------------------------------------------------------------------------ formats


def test_kv_and_json_lines_carry_level_logger_message_and_fields():
    buf = _capture("kv")
    logging.getLogger("agent.jobs.runner").info("job done", extra={"job_id": "abc", "tokens": 12, "text": "two words"})
    line = buf.getvalue().strip()
    assert line.startswith("ts=") and ' level=info logger=agent.jobs.runner msg="job done"' in line
    assert line.endswith('job_id=abc tokens=12 text="two words"')
    buf = _capture("json")
    logging.getLogger("agent.x").error("failed: %d", 3, extra={"job_id": "abc"})
    doc = json.loads(buf.getvalue())
    assert doc["level"] == "error" and doc["msg"] == "failed: 3" and doc["job_id"] == "abc" and doc["ts"].endswith("Z")


def test_journald_gets_no_timestamp_and_a_priority_per_line(tmp_path: Path):
    f = open(tmp_path / "journal", "w+")
    st = os.fstat(f.fileno())
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert journald_stream(env, f) and not journald_stream({}, f)
    assert not journald_stream({"JOURNAL_STREAM": "1:2"}, f)  # our stderr is not the journal (redirected)
    configure_logging(logging.INFO, "text", stream=f, environ=env)
    log = logging.getLogger("agent.app.daemon")
    log.warning("store unwritable")
    try:
        raise ValueError("x")
    except ValueError:
        log.exception("main loop error")
    f.flush()
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines[0] == "<4>WARNING agent.app.daemon: store unwritable"
    assert lines[1] == "<3>ERROR agent.app.daemon: main loop error"
    assert all(line.startswith("<3>") for line in lines[1:])  # the traceback stays at the error's level
    fmt = AgentFormatter("json", journald=True)
    rec = logging.LogRecord("a", logging.INFO, "f", 1, "m", None, None)
    assert fmt.format(rec) == '<6>{"level": "info", "logger": "a", "msg": "m"}'


def test_a_second_configure_replaces_the_handler_and_keeps_secrets():
    _capture("text", secrets=["first-secret"])
    buf = _capture("kv")
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("x").warning("first-secret")
    assert "first-secret" not in buf.getvalue()


# ------------------------------------------------------------------------------------ progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_mode_follows_the_terminal_and_systemd():
    assert choose_mode(_Tty(), {}) == "bar"
    assert choose_mode(_Tty(), {"JOURNAL_STREAM": "8:123"}) == "log"  # systemd: no bar in the journal
    assert choose_mode(io.StringIO(), {}) == "log"  # a pipe
    assert choose_mode(_Tty(), {}, enabled=False) == "off"


def test_log_progress_lines_are_periodic_and_end_with_done(caplog: pytest.LogCaptureFixture):
    t = [0.0]
    p = LogProgress(
        400 * 2**20, "warm-up", interval_s=5, clock=lambda: t[0], logger=logging.getLogger("agent.progress")
    )
    with caplog.at_level(logging.INFO, logger="agent.progress"):
        for _ in range(40):  # 10 MiB per second of fake time, a 1 s step
            t[0] += 1
            p.update(10 * 2**20)
        p.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 40 // 5 + 1
    assert msgs[0] == "warm-up: 12 % (50.0 MiB of 400.0 MiB), 5.0 s"
    assert msgs[-1] == "warm-up: done, 100 % (400.0 MiB of 400.0 MiB), 40.0 s"


def test_progress_off_and_bar():
    off = progress(10, "x", enabled=False)
    with off as p:
        p.update(5)
    bar_stream = _Tty()
    with progress(10, "bar", stream=bar_stream, mode="bar", unit="it") as p:
        p.update(10)
    assert "bar" in bar_stream.getvalue()


def test_model_synth_piped_prints_progress_lines_not_a_bar(tmp_path: Path):
    p = subprocess.run([*EDGE_AGENT, "model", "synth", "--preset", "tiny", str(tmp_path / "t.gguf")],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "INFO agent.progress: synth tiny: done, 100 %" in p.stderr
