#!/usr/bin/env bash
# Installs what mcutrain needs on a fresh Debian machine: the pinned Rust toolchain (from
# rust-toolchain.toml, through rustup), the Fashion-MNIST data set package, and for the
# Cortex-M firmware the thumbv7em-none-eabihf target and QEMU (qemu-system-arm).
# If rustup cannot add the target, it falls back to Debian's Rust with its library source
# (rustc-web, cargo-web, rust-web-src) and the GNU Arm linker arm-none-eabi-ld (from
# binutils-arm-none-eabi, the part of gcc-arm-none-eabi that is needed); the firmware
# build (crates/mcutrain/src/device/firmware.rs) then builds `core` itself.
# Idempotent and quiet: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

apt_updated=""
apt_install() {
  echo "setup: installing $*" >&2
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
if [ ${#need_apt[@]} -gt 0 ]; then apt_install "${need_apt[@]}"; fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
# rustup reads rust-toolchain.toml; this installs the pinned toolchain and its components if missing.
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install

# The firmware target, for the pinned toolchain (RUSTUP_AUTO_INSTALL=0 may be set, so name it).
target=thumbv7em-none-eabihf
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup target list --installed --toolchain "$toolchain" 2>/dev/null | grep -qx "$target"; then
  if ! rustup target add "$target" --toolchain "$toolchain" >/dev/null 2>&1; then
    echo "setup: rustup could not add $target; using Debian's Rust with its library source" >&2
    fallback=()
    [ -d /usr/lib/rustlib/src/rust/library/core ] || fallback+=(rustc-web cargo-web rust-web-src)
    command -v arm-none-eabi-ld >/dev/null || fallback+=(binutils-arm-none-eabi)
    if [ ${#fallback[@]} -gt 0 ]; then apt_install "${fallback[@]}"; fi
  fi
fi
