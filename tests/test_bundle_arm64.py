"""The aarch64 bundle proven on an emulated board (opt-in: 4 min 40 s of qemu on 2 quiet x86 cores; 8 min 20 s
signed, with EDGE_AGENT_ARM64_TRUSTED_KEY, on 2 busy ones).

    sudo packaging/build-arm64-root.sh                   # once: the Debian bookworm arm64 root, no compiler
    .venv/bin/edge-agent bundle --demo-model --tests [--key KEY]   # the bundle (signed with --key)
    sudo EDGE_AGENT_ARM64_BUNDLE=/var/cache/edge-agent-arm64/bundles/edge-agent-...-tests.tar \\
        [EDGE_AGENT_ARM64_TRUSTED_KEY=KEY.pub] .venv/bin/python -m pytest -m arm64 tests/test_bundle_arm64.py

Without EDGE_AGENT_ARM64_BUNDLE (and root, and the arm64 root) it skips at collection: the default run does
not get slower. It runs packaging/prove-arm64.sh for a Cortex-A72 (Pi 4) and a Cortex-A76 (Pi 5, dotprod); with
EDGE_AGENT_ARM64_TRUSTED_KEY (the public key of the bundle's --key) the install checks the signature too, and
a forged bundle (a wheel changed, its manifest recomputed) must be refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLE = os.environ.get("EDGE_AGENT_ARM64_BUNDLE", "")
TRUSTED_KEY = os.environ.get("EDGE_AGENT_ARM64_TRUSTED_KEY", "")
ROOT = Path(os.environ.get("EDGE_AGENT_ARM64_ROOT", "/var/cache/edge-agent-arm64/root-bookworm"))

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(not BUNDLE, reason="opt-in: set EDGE_AGENT_ARM64_BUNDLE to a bundle .tar (packaging/bundle.py)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, mounts, unshare)"),
    pytest.mark.skipif(
        not (ROOT / "usr/bin/python3").exists(), reason=f"no arm64 root at {ROOT} (packaging/build-arm64-root.sh)"
    ),  # fmt: skip
]


def test_bundle_installs_offline_and_serves_on_a72_and_a76() -> None:
    env = dict(os.environ, CPUS="cortex-a72 cortex-a76",
               TESTS=os.environ.get("EDGE_AGENT_ARM64_TESTS", "tests/test_bundle.py tests/test_doctor.py"),
               TRUSTED_KEY=TRUSTED_KEY)  # fmt: skip
    p = subprocess.run(["bash", str(REPO / "packaging" / "prove-arm64.sh"), BUNDLE, str(ROOT)], env=env,
                       capture_output=True, text=True, timeout=4 * 3600, check=False)  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "FAIL:" not in out, out[-4000:]  # the proof's own failures (sha256sum's "FAILED" is step 1's)
    assert "refused; /opt/tampered was not created" in out
    if TRUSTED_KEY:
        assert "refused; /opt/forged was not created" in out and "is signed by trusted key" in out
    assert "CPU variant armv8.0_1" in out  # the Cortex-A72: plain NEON
    assert "CPU variant armv8.2_2" in out  # the Cortex-A76: dotprod and fp16
    assert out.count("SUCCEEDED") >= 2, out[-4000:]
