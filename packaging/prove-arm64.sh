#!/usr/bin/env bash
# Proves an aarch64 bundle on an emulated board: the Debian bookworm arm64 root of build-arm64-root.sh (no
# compiler), run through qemu-user with the CPU model of a real board (QEMU_CPU), networking off
# (`unshare -n`: only a loopback, for the demo's private broker).
#
#   sudo packaging/prove-arm64.sh BUNDLE.tar [ROOT]
#
# In order, each timed: (1) a bundle with one byte changed is refused before anything is written; with
# TRUSTED_KEY (the operator's public key 'ed25519:...' or its .pub file) and a signed bundle (bundle.py --key),
# (1b) one with a wheel changed and its manifest written again to match (what someone without the key can
# do) is refused by `install.sh --trusted-key`, nothing written; (2) the bundle installs offline (install.sh
# --tests [--trusted-key], then `edge-agent install --root` with a board profile);
# then for each CPU in CPUS (default: cortex-a53 cortex-a72 cortex-a76): (3) `edge-agent doctor`'s cpu line:
# the HWCAP features and the ggml CPU variant llama.cpp chose; (4) `edge-agent run --demo` and one job on the
# real Gemma file, submitted with `edge-agent submit --wait`; (5) `generate` on the synthetic tiny model
# (greedy); (6) the light tests in TESTS (default: a subset, below; TESTS=all for every light test).
# SKIP_INSTALL=1 keeps the install of an earlier run (steps 3-6 only). Emulation is slow: the times are wall times of qemu on this host, never a board's speed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUNDLE=${1:?usage: prove-arm64.sh BUNDLE.tar [ROOT]}
ROOT=${2:-/var/cache/edge-agent-arm64/root-bookworm}
CPUS=${CPUS-cortex-a53 cortex-a72 cortex-a76}   # CPUS="": the install steps only
# The default subset: the checks and CLIs this work touches, the store, protocol and config, and the engine
# and the daemon on the tiny model with a private broker (about what a board exercises).
TESTS=${TESTS:-tests/test_bundle.py tests/test_doctor.py tests/test_store.py tests/test_config.py tests/test_ops_units.py tests/test_engine.py tests/test_runner.py tests/test_daemon.py}
TEST_CPUS=${TEST_CPUS:-cortex-a72 cortex-a76}   # the tests take minutes per CPU under qemu: these CPUs only
PREFIX=/opt/edge-agent
TRUSTED_KEY=${TRUSTED_KEY:-}
if [ -n "$TRUSTED_KEY" ] && [ -f "$TRUSTED_KEY" ]; then TRUSTED_KEY=$(grep -o 'ed25519:[A-Za-z0-9+/=]*' "$TRUSTED_KEY" | head -1); fi
[ "$(id -u)" -eq 0 ] || { echo "prove-arm64.sh: run as root (chroot, mounts, unshare)" >&2; exit 1; }
[ -x "$ROOT/usr/bin/python3" ] || { echo "no arm64 root at $ROOT: run packaging/build-arm64-root.sh first" >&2; exit 1; }
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc

mounts=()
cleanup() { for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc sys dev dev/pts; do
  mountpoint -q "$ROOT/$m" || { mount --bind "/$m" "$ROOT/$m"; mounts+=("$ROOT/$m"); }
done
mountpoint -q "$ROOT/tmp" || { mount -t tmpfs tmpfs "$ROOT/tmp"; mounts+=("$ROOT/tmp"); }
mountpoint -q "$ROOT/dev/shm" || { mount -t tmpfs tmpfs "$ROOT/dev/shm"; mounts+=("$ROOT/dev/shm"); }

# Runs a shell command in the emulated board with the given CPU, no network but a loopback.
board() {
  local cpu=$1; shift
  unshare -n sh -c "ip link set lo up 2>/dev/null || true; exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 QEMU_CPU=$cpu chroot '$ROOT' /bin/sh -c \"\$0\"" "$*"
}
timed() { local t0; t0=$(date +%s.%N); "$@"; echo "    ($(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s)"; }

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
name=$(tar -tf "$BUNDLE" | awk -F/ 'NR == 1 {print $1}')
rm -rf "$ROOT/root/bundle" "$ROOT/root/tampered" "$ROOT/root/forged" "$ROOT$PREFIX" "$ROOT/srv/board"
mkdir -p "$ROOT/root/bundle" "$ROOT/root/tampered" "$ROOT/root/forged"
for copy in bundle tampered forged; do tar -xf "$BUNDLE" -C "$ROOT/root/$copy"; done
for cc in gcc cc g++ c++ clang; do
  ! board cortex-a72 "command -v $cc" >/dev/null || { echo "the root has a compiler ($cc)" >&2; exit 1; }
done
echo "==> the board: $(board cortex-a72 'uname -m; python3 --version' | tr '\n' ' ')no compiler, no network"

echo "==> (1) a tampered bundle is refused before anything is written"
victim=$(ls "$ROOT/root/tampered/$name"/wheels/numpy-*.whl | head -1)
printf 'X' | dd of="$victim" bs=1 seek=1000 count=1 conv=notrunc status=none
if board cortex-a72 "sh /root/tampered/$name/install.sh --prefix /opt/tampered --no-service"; then
  echo "FAIL: the tampered bundle installed" >&2; exit 1
fi
[ ! -e "$ROOT/opt/tampered" ] || { echo "FAIL: the tampered install wrote /opt/tampered" >&2; exit 1; }
echo "    refused; /opt/tampered was not created"

trusted=""
if [ -n "$TRUSTED_KEY" ]; then
  [ -f "$ROOT/root/bundle/$name/MANIFEST.sha256.sig" ] || { echo "FAIL: TRUSTED_KEY given but the bundle is not signed (bundle.py --key)" >&2; exit 1; }
  trusted="--trusted-key '$TRUSTED_KEY'"
  echo "==> (1b) a forged bundle (a wheel changed, the manifest written again to match) is refused by its signature"
  victim=$(ls "$ROOT/root/forged/$name"/wheels/numpy-*.whl | head -1)
  printf 'X' | dd of="$victim" bs=1 seek=1000 count=1 conv=notrunc status=none
  board cortex-a72 "cd /root/forged/$name && sed 's/^[0-9a-f]*  //' MANIFEST.sha256 | xargs sha256sum > M && mv M MANIFEST.sha256 && sha256sum --quiet -c MANIFEST.sha256"
  if board cortex-a72 "sh /root/forged/$name/install.sh --trusted-key '$TRUSTED_KEY' --prefix /opt/forged --no-service"; then
    echo "FAIL: the forged bundle installed" >&2; exit 1
  fi
  [ ! -e "$ROOT/opt/forged" ] || { echo "FAIL: the forged install wrote /opt/forged" >&2; exit 1; }
  echo "    refused; /opt/forged was not created (its manifest matched every file: only the signature caught it)"
fi

echo "==> (2) offline install from the bundle (QEMU_CPU=cortex-a72)"
timed board cortex-a72 "sh /root/bundle/$name/install.sh $trusted --prefix $PREFIX --tests --profile pi-4-2gb --root /srv/board \
  --device-id pi-test --mqtt-host broker.lan"
ls "$ROOT/srv/board/etc/edge-agent/config.toml" "$ROOT/srv/board/etc/systemd/system/edge-agent.service" >/dev/null
echo "    edge-agent install --root /srv/board wrote the config and the units; $(du -sh "$ROOT$PREFIX" | cut -f1) in $PREFIX"

fi

ea="$PREFIX/.venv/bin/edge-agent"
for cpu in $CPUS; do
  echo "==> QEMU_CPU=$cpu"
  echo "--> (3) doctor"
  timed board "$cpu" "$ea doctor 2>&1 | grep -A1 '^[A-Z]* *cpu '" || true
  echo "--> (4) run --demo and one job on Gemma 3 270M"
  t0=$(date +%s)
  # The demo is this shell's child: stopped by its pid and waited for (its record's folder is its own business).
  board "$cpu" "cd /root && XDG_STATE_HOME=/tmp/state-$cpu; export XDG_STATE_HOME; $ea run --demo > /tmp/demo-$cpu.log 2>&1 & demo=\$!;
    for i in \$(seq 1 600); do $ea status 2>/dev/null | grep -q '; ready;' && break; sleep 1; done;
    $ea submit 'The capital of France is' --max-tokens 24 --wait --wait-timeout 1200 --timeout 1200; rc=\$?;
    kill \$demo; wait \$demo; tail -3 /tmp/demo-$cpu.log; exit \$rc" || echo "FAIL: the demo job on $cpu"
  echo "    ($(( $(date +%s) - t0 )) s, start to stop)"
  echo "--> (5) generate on the synthetic tiny model (greedy)"
  board "$cpu" "cd /tmp && [ -f tiny.gguf ] || $ea model synth --preset tiny tiny.gguf >/dev/null 2>&1; sha256sum tiny.gguf;
    $ea generate --model tiny.gguf --prompt 'The capital of France is' --max-tokens 16 --temperature 0 --seed 1 --json 2>/dev/null |
    python3 -c 'import json,sys; print(repr(json.load(sys.stdin)[\"text\"]))'" || echo "    generate failed"
  if [ -n "$TESTS" ] && [[ " $TEST_CPUS " == *" $cpu "* ]]; then
    echo "--> (6) light tests: $TESTS"
    sel=$TESTS; [ "$TESTS" = all ] && sel=tests
    t0=$(date +%s)
    board "$cpu" "cd $PREFIX && .venv/bin/python -m pytest -q -p no:cacheprovider -m 'not slow and not root and not arm64' $sel > /root/pytest-$cpu.log 2>&1; rc=\$?; grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed' /root/pytest-$cpu.log; exit \$rc" \
      || echo "FAIL: tests on $cpu"
    echo "    ($(( $(date +%s) - t0 )) s)"
  fi
done
