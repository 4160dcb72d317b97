#!/usr/bin/env bash
# Builds, from nothing, the emulated board the aarch64 bundle is proven on: a Debian bookworm arm64 root
# file system (what Raspberry Pi OS 64-bit is based on) with python3 and python3-venv and NO compiler,
# run on an x86-64 Debian host through qemu-user-static and binfmt_misc.
#
#   sudo packaging/build-arm64-root.sh [ROOT]        default ROOT: /var/cache/edge-agent-arm64/root-bookworm
#
# Environment: SUITE (bookworm; trixie for Python 3.13), MIRROR (default: the host's own Debian mirror from
# its apt sources, else debootstrap's default), EXTRA_PACKAGES (default: mosquitto, which the light tests
# start as their private broker; it is a broker, not a build tool).
# Measured on 2 x86 cores: docs/operations.md, "The offline aarch64 bundle".
set -euo pipefail

ROOT=${1:-/var/cache/edge-agent-arm64/root-bookworm}
SUITE=${SUITE:-bookworm}
EXTRA_PACKAGES=${EXTRA_PACKAGES-mosquitto}
[ "$(id -u)" -eq 0 ] || { echo "build-arm64-root.sh: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 1; }

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# binfmt_misc lets the kernel hand arm64 executables to qemu-aarch64-static. Debian registers it with the
# F (fix binary) flag, so the interpreter needs no copy inside the root.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "qemu-aarch64 binfmt is not enabled" >&2; exit 1; }

if [ -z "${MIRROR:-}" ]; then
  # The host's Debian mirror (deb822 first, then the one-line format); empty = debootstrap's default.
  MIRROR=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb / && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi

if [ -x "$ROOT/usr/bin/python3" ]; then
  echo "==> $ROOT already holds a root with python3: kept (remove it to build again)"
else
  start=$(date +%s)
  mkdir -p "$ROOT"
  echo "==> debootstrap $SUITE arm64 into $ROOT (python3 python3-venv ${EXTRA_PACKAGES})"
  include="python3,python3-venv${EXTRA_PACKAGES:+,${EXTRA_PACKAGES// /,}}"
  debootstrap --arch=arm64 --variant=minbase --include="$include" "$SUITE" "$ROOT" ${MIRROR:+"$MIRROR"}
  echo "==> root built in $(( $(date +%s) - start )) s"
fi

# The proof's promise: no compiler on the board.
for cc in gcc cc g++ c++ clang; do
  if chroot "$ROOT" /bin/sh -c "command -v $cc" >/dev/null 2>&1; then
    echo "the root has a compiler ($cc): the bundle proof needs a board without one" >&2
    exit 1
  fi
done
echo "==> $ROOT: $(chroot "$ROOT" uname -m), $(chroot "$ROOT" python3 --version), no compiler; $(du -sh --exclude=proc "$ROOT" | cut -f1)"
