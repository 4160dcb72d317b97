"""agent.models.download against a real HTTP(S) server on the loopback address (tests/model_server.py)
serving real model files: resume after the server goes down mid-transfer, checksum, space, TLS, auth."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import pytest

from agent.models.download import DownloadError, HttpLink, Progress, RetryPolicy, Source, download, redact
from agent.models.synth import synth_model
from agent.system.files import file_sha256
from tests.model_server import ModelServer

FAST_RETRY = RetryPolicy(min_s=0.02, max_s=0.2, max_failures=1000)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GGUF of 2.3 MB (the tiny preset, wider)."""
    return synth_model("tiny", tmp_path_factory.mktemp("dl") / "wide.gguf", seed=7,
                       overrides={"n_embd": 256, "n_ff": 1024, "n_layer": 4})  # fmt: skip


@pytest.fixture
def served(tmp_path: Path, model_file: Path):
    root = tmp_path / "www"
    root.mkdir()
    with ModelServer(root) as server:
        server.add(model_file, "m.gguf")
        yield server


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d / "m.gguf"


def source(server: ModelServer, dest: Path, model_file: Path, **kw) -> Source:
    return Source(url=server.url("m.gguf"), sha256=file_sha256(model_file), dest=dest, **kw)


def test_a_download_cut_twice_resumes_and_fetches_each_byte_about_once(
    served: ModelServer, dest: Path, model_file: Path
) -> None:
    size = model_file.stat().st_size
    src = source(served, dest, model_file, size=size)
    seen: list[Progress] = []
    served.cut_after(size // 3)
    result: dict = {}

    def run() -> None:
        try:
            result["ok"] = download(src, HttpLink(), margin=0, retry=FAST_RETRY,
                                    on_progress=lambda p: seen.append(Progress(**vars(p))))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    for cut in range(2):
        assert served.cut.wait(30), "the server was not cut"
        assert src.partial.exists() and not dest.exists()
        if cut == 0:
            served.cut_after(size // 3)  # the second cut comes a third of the file later
        served.start()  # same port: the downloader's retries reach it again
    t.join(60)
    assert "error" not in result, result
    r = result["ok"]
    assert dest.is_file() and file_sha256(dest) == src.sha256 and not src.partial.exists()
    sent = served.sent("m.gguf")
    assert sent <= 1.1 * size, f"the server sent {sent} bytes for a file of {size}"
    assert r.fetched == size and r.attempts >= 3
    ranges = [q.range for q in served.requests("m.gguf") if q.status == 206]
    assert len(ranges) >= 2 and all(rg.startswith("bytes=") for rg in ranges)
    assert any(p.state == "retrying" for p in seen) and seen[-1].state == "done"
    print(
        f"\ndownload cut twice: file {size} bytes, server sent {sent} ({sent / size:.3f}x), "
        f"{r.attempts} attempts, {len(ranges)} resumed with Range"
    )


def test_a_partial_file_left_by_a_stopped_daemon_is_resumed_with_range(
    served: ModelServer, dest: Path, model_file: Path
) -> None:
    size = model_file.stat().st_size
    src = source(served, dest, model_file)
    served.cut_after(size // 2)
    with pytest.raises(DownloadError) as e:
        download(src, HttpLink(), margin=0, retry=RetryPolicy(min_s=0.01, max_s=0.01, max_failures=1))
    assert e.value.code != "download_checksum_mismatch"
    kept = src.partial.stat().st_size
    assert 0 < kept < size and not dest.exists()
    served.start()
    before = served.sent("m.gguf")
    r = download(src, HttpLink(), margin=0, retry=FAST_RETRY)  # a new run, as after a restart
    assert r.resumed_from == kept and r.fetched == size - kept
    assert served.sent("m.gguf") - before == size - kept
    assert served.requests("m.gguf")[-1].range == f"bytes={kept}-"
    assert file_sha256(dest) == src.sha256


def test_a_wrong_checksum_deletes_the_partial_file(served: ModelServer, dest: Path, model_file: Path) -> None:
    src = Source(url=served.url("m.gguf"), sha256="0" * 64, dest=dest)
    with pytest.raises(DownloadError) as e:
        download(src, HttpLink(), margin=0, retry=FAST_RETRY)
    assert e.value.code == "download_checksum_mismatch" and not e.value.retryable
    assert not src.partial.exists() and not dest.exists()
    assert file_sha256(model_file) in str(e.value)


def test_too_little_space_is_refused_before_any_request(served: ModelServer, dest: Path, model_file: Path) -> None:
    src = source(served, dest, model_file, size=2**40)  # a TiB: more than this disk has
    with pytest.raises(DownloadError) as e:
        download(src, HttpLink(), retry=FAST_RETRY)
    assert e.value.code == "download_no_space"
    assert served.requests() == [] and not src.partial.exists()


def test_the_server_size_must_match_the_announced_size(served: ModelServer, dest: Path, model_file: Path) -> None:
    src = source(served, dest, model_file, size=model_file.stat().st_size + 1)
    with pytest.raises(DownloadError) as e:
        download(src, HttpLink(), margin=0, retry=FAST_RETRY)
    assert e.value.code == "download_size_mismatch"
    assert not src.partial.exists() and not dest.exists()  # nothing was written


def test_not_found_fails_at_once(served: ModelServer, dest: Path, model_file: Path) -> None:
    src = Source(url=served.url("nope.gguf"), sha256=file_sha256(model_file), dest=dest)
    with pytest.raises(DownloadError) as e:
        download(src, HttpLink(), margin=0, retry=FAST_RETRY)
    assert e.value.code == "download_http" and "404" in str(e.value) and "model.url" in str(e.value)
    assert len(served.requests()) == 1


def test_a_file_already_in_place_is_not_fetched_again(served: ModelServer, dest: Path, model_file: Path) -> None:
    dest.write_bytes(model_file.read_bytes())
    r = download(source(served, dest, model_file), HttpLink(), margin=0)
    assert r.already_there and r.fetched == 0 and served.requests() == []


def test_https_with_a_configured_ca_and_a_bearer_token_that_is_never_logged(
    tmp_path: Path, dest: Path, model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    root = tmp_path / "www"
    root.mkdir()
    secret = "s3cr3t-token-for-the-test"
    caplog.set_level(logging.DEBUG)
    with ModelServer(root, tls=ca, token=secret) as server:
        server.add(model_file, "m.gguf")
        src = source(server, dest, model_file)
        # The system CAs do not know the throwaway CA.
        with pytest.raises(DownloadError) as e:
            download(src, HttpLink(token=secret), margin=0, retry=FAST_RETRY)
        assert e.value.code == "download_tls" and "download.ca_file" in str(e.value)
        # Without the token: 401 at once.
        with pytest.raises(DownloadError) as e:
            download(src, HttpLink(ca_file=ca_file), margin=0, retry=FAST_RETRY)
        assert "401" in str(e.value)
        server.cut_after(model_file.stat().st_size // 2)
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault("r", download(
            src, HttpLink(ca_file=ca_file, token=secret), margin=0, retry=FAST_RETRY)))  # fmt: skip
        t.start()
        assert server.cut.wait(30)
        server.start()
        t.join(60)
        assert file_sha256(dest) == src.sha256
        auth = {q.authorization for q in server.requests("m.gguf") if q.status in (200, 206)}
        assert auth == {f"Bearer {secret}"}
    assert secret not in caplog.text


def test_credentials_are_not_sent_over_plain_http(served: ModelServer, dest: Path, model_file: Path) -> None:
    download(source(served, dest, model_file), HttpLink(token="t0k3n", basic=None), margin=0)
    assert {q.authorization for q in served.requests()} == {None}


def test_a_server_that_ignores_range_starts_over_and_still_verifies(
    tmp_path: Path, dest: Path, model_file: Path
) -> None:
    root = tmp_path / "www"
    root.mkdir()
    size = model_file.stat().st_size
    with ModelServer(root) as server:
        server.add(model_file, "m.gguf")
        src = source(server, dest, model_file)
        src.partial.write_bytes(b"\0" * 1000)  # bytes a range-less server cannot continue
        server.ignore_range = True
        r = download(src, HttpLink(), margin=0, retry=FAST_RETRY)
    assert r.fetched == size and file_sha256(dest) == hashlib.sha256(model_file.read_bytes()).hexdigest()


def test_urls_are_reported_without_user_info_or_query() -> None:
    assert redact("https://u:p@host:8443/a/m.gguf?X-Sig=abc#f") == "https://host:8443/a/m.gguf"


def test_credentials_come_from_systemd_credentials_and_are_masked(tmp_path: Path) -> None:
    from agent.config import load_settings, masked_dump

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "model_download_token").write_text("tok-123\n")
    s = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert s.download.token is not None and s.download.token.get_secret_value() == "tok-123"
    assert masked_dump(s)["download"]["token"] == "********"
    assert "tok-123" not in repr(s) and "tok-123" not in str(masked_dump(s))
    link = HttpLink.from_settings(s.download)
    assert link._auth == {"Authorization": "Bearer tok-123"}
