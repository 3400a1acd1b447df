#!/usr/bin/env bash
# Firmware CI: build the ESP32-C3 board binary and the Cortex-M4F self-test, run the self-test
# under qemu-system-arm (mps2-an386, semihosting) and require exit 0, print `size` of both.
# Installs what it needs (rustup targets, qemu-system-arm) on a fresh machine. Run as root for
# the apt step, from anywhere: `bash .ci/firmware.sh`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELFTEST="$ROOT/firmware/boards/mps2-an386"
BOARD="$ROOT/firmware/boards/esp32c3"
started=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

step "rustup targets"
rustup target add thumbv7em-none-eabihf riscv32imc-unknown-none-elf

install_qemu_system_arm() {
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
  local norec=(-y --no-install-recommends)
  "${apt[@]}" update
  if "${apt[@]}" -s install "${norec[@]}" qemu-system-arm | grep -q '^Remv'; then
    # Debian 12's qemu-system-arm 7.2 would remove the image's qemu-utils from
    # bookworm-backports (it Breaks qemu-system-common << 8). Install the matching backports
    # build through a throw-away apt config; nothing is written under /etc/apt.
    local b k main secu
    b=$(mktemp -d /tmp/apt-bpo.XXXXXX); chmod 0755 "$b"; mkdir -p "$b/lists" "$b/archives"
    k=/usr/share/keyrings/debian-archive-keyring.gpg
    main=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources)
    secu=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources | grep -m1 security)
    {
      echo "deb [signed-by=$k] $main bookworm main"
      echo "deb [signed-by=$k] $main bookworm-updates main"
      echo "deb [signed-by=$k] $secu bookworm-security main"
      echo "deb [signed-by=$k] $main bookworm-backports main"
    } > "$b/sources.list"
    local bo=(-o Dir::Etc::sourcelist="$b/sources.list" -o Dir::Etc::sourceparts=-
              -o Dir::State::lists="$b/lists" -o Dir::Cache::archives="$b/archives")
    "${apt[@]}" "${bo[@]}" update
    "${apt[@]}" "${bo[@]}" install "${norec[@]}" qemu-system-arm/bookworm-backports \
      qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports
    rm -rf "$b"
  else
    "${apt[@]}" install "${norec[@]}" qemu-system-arm
  fi
}

step "qemu-system-arm"
command -v qemu-system-arm >/dev/null || install_qemu_system_arm
qemu-system-arm --version | head -1

# Each board folder has its own lockfile and target; a shared target dir would mix them. The
# targets live outside the clone so repeated CI runs on one machine build incrementally.
BOARDS_TARGET=${EDGEWISE_BOARDS_TARGET:-/var/tmp/edgewise-boards}
SELFTEST_TARGET="$BOARDS_TARGET/mps2-an386"
BOARD_TARGET="$BOARDS_TARGET/esp32c3"
unset CARGO_TARGET_DIR

step "self-test: build (thumbv7em-none-eabihf, Cortex-M4F)"
(cd "$SELFTEST" && CARGO_TARGET_DIR="$SELFTEST_TARGET" cargo build --release --locked)

step "self-test: run under qemu-system-arm -machine mps2-an386 (semihosting)"
log=$(mktemp)
# The runner in .cargo/config.toml is qemu; the exit status is the self-test's verdict.
(cd "$SELFTEST" && CARGO_TARGET_DIR="$SELFTEST_TARGET" cargo run --release --locked) | tee "$log"
grep -q '^selftest: PASS$' "$log"
rm -f "$log"

step "board: build the ESP32-C3 node (riscv32imc-unknown-none-elf)"
# Wi-Fi and gateway settings are compiled in; CI builds with placeholders.
(cd "$BOARD" && EDGEWISE_WIFI_SSID=ci EDGEWISE_WIFI_PASSWORD=ci-password \
  EDGEWISE_GATEWAY=192.168.4.1 CARGO_TARGET_DIR="$BOARD_TARGET" cargo build --release --locked)

step "sizes"
SELFTEST_ELF="$SELFTEST_TARGET/thumbv7em-none-eabihf/release/edgewise-selftest-mps2-an386"
BOARD_ELF="$BOARD_TARGET/riscv32imc-unknown-none-elf/release/edgewise-node-esp32c3"
size "$SELFTEST_ELF" "$BOARD_ELF"
# Flash = everything loaded from flash (code, read-only data, and the initial values of RAM
# code/data); static RAM = data + bss + code copied to IRAM. Linker padding (*_dummy), the stack
# reservation and debug sections are not counted.
size -A "$BOARD_ELF" | awk '
  $1 ~ /^\.(text|rodata|rodata\.wifi|flash\.appdesc)$/ { flash += $2 }
  $1 ~ /^\.(trap|rwtext|rwtext\.wifi|data|data\.wifi)$/ { flash += $2; ram += $2 }
  $1 ~ /^\.bss$/                                        { ram += $2 }
  END { printf "ESP32-C3 node: flash %d bytes (%.1f KiB), static RAM %d bytes (%.1f KiB of 400 KiB)\n",
               flash, flash / 1024, ram, ram / 1024, ram / 1024 }'
size -A "$SELFTEST_ELF" | awk '
  $1 ~ /^\.(vector_table|text|rodata)$/ { flash += $2 }
  $1 ~ /^\.data$/                       { flash += $2; ram += $2 }
  $1 ~ /^\.(bss|uninit)$/               { ram += $2 }
  END { printf "Cortex-M4F self-test: flash %d bytes (%.1f KiB), static RAM %d bytes\n",
               flash, flash / 1024, ram }'

step "done: firmware CI passed in $(( $(date +%s) - started )) s"
