#!/bin/sh
# Installs edge-agent @VERSION@ on a 64-bit ARM board from this offline bundle (written by
# packaging/bundle.py): no network, no compiler.
#
#   sudo ./install.sh [--prefix DIR] [--trusted-key KEY]... [--tests] [--no-service] [EDGE-AGENT INSTALL ARGUMENTS ...]
#   sudo ./install.sh --trusted-key ed25519:... --profile pi-4-2gb --model ~/model.gguf --device-id pi-kitchen \
#        --mqtt-host broker.lan --mqtt-username pi-kitchen --mqtt-password-file ./pw --now
#
# 0. With --trusted-key (the operator's public key 'ed25519:<base64>', or a file holding it such as KEY.pub;
#    repeat it while keys rotate): MANIFEST.sha256.sig must be a valid signature of the manifest by one of
#    them (openssl), else refuse before anything is written. 1. Checks every file of the bundle against
#    MANIFEST.sha256 (changed, missing or extra: refuse, before anything is written). 2. Creates the virtual
#    environment DIR/.venv (default DIR /opt/edge-agent) and installs the wheels with `pip install
#    --no-index`. 3. Lays DIR out like a checkout: DIR/agent (from edge-agent's wheel; its metadata goes into
#    the venv), DIR/firmware-config, DIR/systemd, and the command DIR/.venv/bin/edge-agent. 4. With arguments
#    left, runs `edge-agent install` with them (the service); without, prints the command to run. Run again
#    with a newer bundle to upgrade.
set -eu

BUNDLE_PYTHON=@PYTHON@
VERSION=@VERSION@
here=$(cd "$(dirname "$0")" && pwd)
prefix=/opt/edge-agent
tests=0
service=1
keys=""
fail() { echo "install.sh: $*" >&2; exit 1; }
add_key() {
  case "$1" in
    ed25519:*) keys="$keys $1" ;;
    *) [ -f "$1" ] || fail "--trusted-key $1: neither a public key 'ed25519:<base64>' nor a file holding one"
       k=$(grep -o 'ed25519:[A-Za-z0-9+/=]*' "$1" | tr '\n' ' ') || true
       [ -n "$k" ] || fail "--trusted-key $1: the file holds no public key 'ed25519:<base64>'"
       keys="$keys $k" ;;
  esac
}
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --trusted-key) [ $# -ge 2 ] || fail "--trusted-key needs a key"; add_key "$2"; shift 2 ;;
    --trusted-key=*) add_key "${1#--trusted-key=}"; shift ;;
    --tests) tests=1; shift ;;
    --no-service) service=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) break ;;
  esac
done

cd "$here"
[ -f MANIFEST.sha256 ] || fail "no MANIFEST.sha256 in $here: not a complete bundle"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- 0. the signature, before anything else: Ed25519 over a domain line and the manifest's bytes, one line
# "FORMAT KEY_ID BASE64" (packaging/bundle.py --key). openssl wants the public key as DER: a fixed 12-byte
# SubjectPublicKeyInfo header for Ed25519 (RFC 8410), then the 32 raw bytes.
if [ -n "$keys" ]; then
  [ -f MANIFEST.sha256.sig ] || fail "--trusted-key was given but the bundle has no MANIFEST.sha256.sig: it is not signed. Nothing was installed."
  read -r format kid sig rest < MANIFEST.sha256.sig || true
  [ "${format:-}" = edge-agent/bundle-signature/v1 ] && [ -n "${sig:-}" ] && [ -z "${rest:-}" ] \
    || fail "MANIFEST.sha256.sig is not one line 'edge-agent/bundle-signature/v1 KEY_ID SIGNATURE'. Nothing was installed."
  command -v openssl >/dev/null \
    || fail "checking the signature needs openssl 3 (Raspberry Pi OS has it; else apt-get install openssl). Nothing was installed."
  found="" ids=""
  for k in $keys; do
    printf '%s' "${k#ed25519:}" | base64 -d > "$tmp/raw" 2>/dev/null && [ "$(wc -c < "$tmp/raw")" -eq 32 ] \
      || fail "--trusted-key $k: not an Ed25519 public key ('ed25519:' and the base64 of 32 bytes)"
    id=$(sha256sum < "$tmp/raw" | cut -c1-16)
    ids="$ids $id"
    if [ "$id" = "$kid" ]; then found=${k#ed25519:}; fi
  done
  [ -n "$found" ] || fail "the bundle is signed by key $kid, which is not a trusted key (given:$ids). Nothing was installed."
  printf '\060\052\060\005\006\003\053\145\160\003\041\000' > "$tmp/key.der"
  printf '%s' "$found" | base64 -d >> "$tmp/key.der"
  if ! printf '%s' "$sig" | base64 -d > "$tmp/sig" 2>/dev/null || [ "$(wc -c < "$tmp/sig")" -ne 64 ]; then
    fail "MANIFEST.sha256.sig: the signature is not the base64 of 64 bytes (truncated or altered). Nothing was installed."
  fi
  { printf 'edge-agent bundle manifest v1\n'; cat MANIFEST.sha256; } > "$tmp/signed"
  if ! openssl pkeyutl -verify -pubin -keyform DER -inkey "$tmp/key.der" -rawin -in "$tmp/signed" \
       -sigfile "$tmp/sig" > "$tmp/openssl.log" 2>&1; then
    grep -q 'Signature Verification Failure' "$tmp/openssl.log" \
      || { cat "$tmp/openssl.log" >&2; fail "openssl could not check the signature (OpenSSL 3 is needed). Nothing was installed."; }
    fail "the signature of MANIFEST.sha256 by key $kid does not verify: the manifest was altered or the signature is not its own. Nothing was installed."
  fi
  echo "==> MANIFEST.sha256 is signed by trusted key $kid"
elif [ -f MANIFEST.sha256.sig ]; then
  echo "==> the bundle is signed (key $(cut -d' ' -f2 MANIFEST.sha256.sig)); not checked: no --trusted-key given"
fi

# ---- 1. the manifest, before anything else is written
echo "==> checking $(wc -l < MANIFEST.sha256) files against MANIFEST.sha256 (sha256 $(sha256sum MANIFEST.sha256 | cut -c1-64))"
if ! bad=$(sha256sum --strict -c MANIFEST.sha256 2>&1); then
  echo "$bad" | grep -v ': OK$' >&2
  fail "the bundle does not match its manifest: nothing was installed. Copy the bundle again."
fi
listed="$tmp/listed"
sed 's/^[0-9a-f]\{64\}  //' MANIFEST.sha256 | LC_ALL=C sort > "$listed"
extra=$(find . -type f ! -path ./MANIFEST.sha256 ! -path ./MANIFEST.sha256.sig | sed 's|^\./||' | LC_ALL=C sort | LC_ALL=C comm -23 - "$listed")
if [ -n "$extra" ]; then
  echo "$extra" | sed 's/^/not in the manifest: /' >&2
  fail "the bundle holds files its manifest does not list: nothing was installed. Copy the bundle again."
fi
echo "    all files match"

# ---- 2. the board
bits=$(python3 -c 'import struct; print(struct.calcsize("P") * 8)' 2>/dev/null) || fail "no python3: apt-get install python3 python3-venv"
if [ "$bits" != 64 ] || [ "$(python3 -c 'import platform; print(platform.machine())')" != aarch64 ]; then
  fail "this bundle is for 64-bit ARM (aarch64) with a 64-bit system; this one is $(uname -m) with a $bits-bit userland.
  32-bit Raspberry Pi OS (armhf) is not supported: numpy and pydantic-core have no armhf wheels on the package
  index. Install Raspberry Pi OS (64-bit): every Pi 3, 4, 5 and Zero 2 W runs it."
fi
py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$py" = "$BUNDLE_PYTHON" ] || fail "this bundle is for Python $BUNDLE_PYTHON; this board has Python $py: build one with \`packaging/bundle.py --python $py\`"
python3 -c 'import ensurepip, venv' 2>/dev/null || fail "python3-venv is missing: apt-get install python3-venv"

# ---- 3. the virtual environment and the wheels, offline
mkdir -p "$prefix"
venv="$prefix/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  python3 -m venv "$venv"
fi
echo "==> installing $(wc -l < requirements.txt) packages from wheels/ (pip install --no-index)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links "$here/wheels" -r requirements.txt
if [ "$tests" = 1 ]; then
  [ -f requirements-test.txt ] || fail "--tests: this bundle was built without --tests"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links "$here/wheels" -r requirements-test.txt
fi

# A wheel holds copies, not symlinks: libggml.so, libggml.so.0 and libggml.so.0.25.3 are three files, and
# opening one by another name than libllama's dependency loads a second libggml with a backend registry of its
# own, empty in this build (the memory plan's repack probe asks it). One file, two links, as a build installs it.
lib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/llama_cpp/lib
for real in "$lib"/lib*.so.*.*.*; do
  [ -f "$real" ] && [ ! -L "$real" ] || continue
  stem=${real%%.so.*}.so
  major=${real#"$stem".}
  major=${major%%.*}
  for alias in "$stem" "$stem.$major"; do
    if [ -f "$alias" ] && [ ! -L "$alias" ] && cmp -s "$alias" "$real"; then
      ln -sf "$(basename "$real")" "$alias"
    fi
  done
done

# ---- 4. edge-agent itself, laid out like a checkout: its profiles, units and the demo's folders next to agent/
echo "==> installing edge-agent $VERSION into $prefix"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stage="$prefix/.install.$$"
rm -rf "$stage" && mkdir -p "$stage"
"$venv/bin/python" -m zipfile -e "$(ls "$here"/wheels/edge_agent-*.whl)" "$stage"
rm -rf "$prefix/.agent.old"
[ ! -d "$prefix/agent" ] || mv "$prefix/agent" "$prefix/.agent.old"
mv "$stage/agent" "$prefix/agent"
rm -rf "$prefix/.agent.old" "$site"/edge_agent-*.dist-info
mv "$stage"/edge_agent-*.dist-info "$site/"
rm -rf "$stage"
# What an editable install does: the code stays in $prefix (where it finds firmware-config/ and systemd/),
# its metadata (the version) is in the venv, and the venv imports it from $prefix.
echo "$prefix" > "$site/edge_agent_prefix.pth"
for folder in firmware-config systemd; do
  rm -rf "${prefix:?}/$folder" && cp -r "$here/$folder" "$prefix/$folder"
done
printf '#!%s\nimport sys\n\nfrom agent.cli import main\n\nsys.exit(main())\n' "$venv/bin/python" > "$venv/bin/edge-agent"
chmod 755 "$venv/bin/edge-agent"
"$venv/bin/python" -m compileall -q "$prefix/agent" >/dev/null || true
if [ "$tests" = 1 ]; then
  tar -xf "$here/tests.tar" -C "$prefix"
fi
echo "==> $("$venv/bin/edge-agent" --version) in $prefix"

# ---- 5. the service
if [ "$service" = 1 ] && [ $# -gt 0 ]; then
  exec "$venv/bin/edge-agent" install "$@"
fi
echo "next: sudo $venv/bin/edge-agent install --profile BOARD --model FILE.gguf --device-id ID --mqtt-host HOST ... --now"
echo "      boards: $(ls "$prefix/firmware-config" | sed 's/\.toml$//' | tr '\n' ' ')(docs/operations.md)"
