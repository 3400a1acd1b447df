#!/usr/bin/env bash
# ARM gateway CI (issue 7): cross-build the agent for aarch64 and armv7 (rustup targets + Debian
# cross gcc, see .ci/arm-env.sh), run its unit tests and `check` under qemu-user, run a short real
# pipeline (host Mosquitto, simulator and receiver; the agent emulated) under
# qemu-aarch64 and qemu-arm with sd_notify, SIGHUP reload and SIGTERM checks, print the budgets
# (stripped size with/without the embedded broker, RSS, start-up time to READY=1), build and
# check the .deb files, and exercise agent/deploy/flash.sh against a gateway in a network
# namespace (sshd, systemd-less install, health wait, failed-binary refusal, rollback).
#
# ARM builds use their own persistent target dir, ${EDGEWISE_ARM_TARGET_DIR:-/var/tmp/edgewise-arm-target};
# host tools (simulator, receiver) use the caller's CARGO_TARGET_DIR. Run as root (apt, netns).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgewise-target}"
HOST_TD=$CARGO_TARGET_DIR
ARM_TD=${EDGEWISE_ARM_TARGET_DIR:-/var/tmp/edgewise-arm-target}
TOOLS=${EDGEWISE_TOOLS:-/var/tmp/edgewise-tools}
W=$(mktemp -d /tmp/edgewise-arm.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns del ew-gw 2>/dev/null || true
  ip link del ew-host 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
started=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
BUDGETS=()
budget() { BUDGETS+=("$(printf '%-62s %s' "$1" "$2")"); }

step "toolchain: rustup targets, cross gcc, qemu-user, sshd, cargo-deb"
need=()
for c in aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu arm-linux-gnueabihf-gcc:gcc-arm-linux-gnueabihf \
         qemu-aarch64:qemu-user /usr/sbin/sshd:openssh-server ssh:openssh-client ip:iproute2; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || need+=(libc6-dev-arm64-cross)
[ -e /usr/arm-linux-gnueabihf/lib/libc.so.6 ] || need+=(libc6-dev-armhf-cross)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3 update
  apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3 install -y --no-install-recommends "${need[@]}"
fi
rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
if [ ! -x "$TOOLS/bin/cargo-deb" ]; then
  cargo install --locked --root "$TOOLS" cargo-deb
fi
export PATH="$TOOLS/bin:$PATH"
. .ci/arm-env.sh
SYSROOT_aarch64=/usr/aarch64-linux-gnu
SYSROOT_armv7=/usr/arm-linux-gnueabihf
QEMU_aarch64=qemu-aarch64
QEMU_armv7=qemu-arm
TRIPLE_aarch64=aarch64-unknown-linux-gnu
TRIPLE_armv7=armv7-unknown-linux-gnueabihf

# Symbols are kept in the target dir (for .ci/size-breakdown.py) and stripped from the copies
# this script runs and packages; the profile's own `strip` setting is for `cargo build --profile
# gateway` by hand. (Changing `strip` changes every dependency's hash: one setting for all steps.)
arm() { CARGO_TARGET_DIR="$ARM_TD" CARGO_PROFILE_GATEWAY_STRIP=none nice -n 5 cargo "$@"; }
STRIP_aarch64=aarch64-linux-gnu-strip
STRIP_armv7=arm-linux-gnueabihf-strip
out() { echo "$ARM_TD/$1/gateway/edgewise-agent"; }
LEAN=(--no-default-features)
ARCHES=${EDGEWISE_ARM_ARCHES:-aarch64 armv7}   # a subset for local runs
BROKER=(--no-default-features --features embedded-broker)

# The `gateway` profile (Cargo.toml: opt-level "z", fat LTO, one codegen unit) for everything,
# tests too, so they share the binary's dependencies. The lean agent (no embedded broker, no
# demo) is what the packages ship and what the budgets are for; the aarch64 build with the
# embedded broker is made for its size. Both architectures build in one cargo run: each final
# link (fat LTO, one codegen unit) is single-threaded, so the two run side by side on 2 cores.
# EDGEWISE_ARM_PREBUILT=DIR skips the builds and tests and checks the binaries in DIR
# (edgewise-agent-aarch64, edgewise-agent-armv7, optionally edgewise-agent-aarch64-broker),
# e.g. ones built with `cross`.
TARGETS=()
for a in $ARCHES; do t=TRIPLE_$a; TARGETS+=(--target "${!t}"); done
if [ -n "${EDGEWISE_ARM_PREBUILT:-}" ]; then
  for a in $ARCHES; do cp "$EDGEWISE_ARM_PREBUILT"/edgewise-agent-"$a"* "$W/"; done
else
  step "unit tests under qemu ($ARCHES)"
  arm test --profile gateway --locked "${TARGETS[@]}" -p edgewise-agent "${LEAN[@]}" --lib
  if [[ " $ARCHES " == *" aarch64 "* ]]; then
    step "aarch64: build the agent with the embedded broker (for its size)"
    arm build --profile gateway --locked --target "$TRIPLE_aarch64" -p edgewise-agent "${BROKER[@]}"
    "$STRIP_aarch64" -o "$W/edgewise-agent-aarch64-broker" "$(out "$TRIPLE_aarch64")"
  fi
  step "build the agent ($ARCHES)"
  arm build --profile gateway --locked "${TARGETS[@]}" -p edgewise-agent "${LEAN[@]}"
  for a in $ARCHES; do
    t=TRIPLE_$a; st=STRIP_$a
    "${!st}" -o "$W/edgewise-agent-$a" "$(out "${!t}")"
    if [ "$a" = aarch64 ]; then cp "$(out "${!t}")" "$W/edgewise-agent-$a.unstripped"; fi
    file "$W/edgewise-agent-$a" | grep -q "ARM" || fail "$a binary is not an ARM executable"
  done
fi

step "host tools for the pipeline: receiver and simulator"
# The same build as `cargo test --workspace` (same feature unification: a no-op after .ci/run's
# first step); it makes edgewise-cloud, edgewise-sim and the host edgewise-agent (flash test).
nice -n 5 cargo test --workspace --locked --no-run
CLOUD=$HOST_TD/debug/edgewise-cloud
SIM=$HOST_TD/debug/edgewise-sim

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@"; do [ "$(date +%s)" -lt "$deadline" ] || fail "timed out waiting for $what"; sleep 0.2; done
}
kb() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }

# The agent's own memory under qemu-user: .ci/qemu-guest-rss.py sums the resident pages of the
# guest's mappings (from qemu's `-d page` log) and leaves out qemu's (translated code, its heap).
RSS_BUDGET_KIB=$((16 * 1024))

CLOUD_PORT=$(free_port)
step "receiver on 127.0.0.1:$CLOUD_PORT"
"$CLOUD" serve --listen "127.0.0.1:$CLOUD_PORT" --db "$W/cloud.db" >"$W/cloud.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the receiver" http_ok "http://127.0.0.1:$CLOUD_PORT/healthz"

# A python listener stands in for systemd's NOTIFY_SOCKET: it timestamps every datagram.
notify_listener() {
  python3 - "$1" "$2" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as f:
    while True:
        msg = s.recv(4096).decode(errors="replace").replace("\n", " | ")
        f.write(f"{time.monotonic():.3f} {msg}\n")
PY
  PIDS+=($!)
}

MQTT=${EDGEWISE_ARM_MQTT:-127.0.0.1:1883}   # the CI machine's Mosquitto
pipeline() {  # pipeline ARCH: agent under qemu; broker, simulator and receiver on the host
  local a=$1 q=QEMU_$1 s=SYSROOT_$1 bin="$W/edgewise-agent-$1" d="$W/run-$1"
  local http token cfg pid t0 ready_s hwm rss_peak summaries topic="edgewise-arm-$1-$$"
  mkdir -p "$d"
  http=$(free_port)
  token=$("$CLOUD" device add "gw-$a" --db "$W/cloud.db" | tail -n 1)
  cfg="$d/agent.toml"
  cat >"$cfg" <<EOF
agent_id = "gw-$a"
[mqtt]
url = "mqtt://$MQTT"
client_id = "edgewise-arm-$a-$$"
topics = ["$topic/#"]
[store]
path = "$d/agent.db"
[window]
window_seconds = 1
allowed_lateness_ms = 200
idle_timeout_ms = 2000
[sync]
url = "http://127.0.0.1:$CLOUD_PORT"
token = "$token"
interval_ms = 200
[http]
listen = "127.0.0.1:$http"
EOF
  step "$a: edgewise-agent check under ${!q}"
  ${!q} -L "${!s}" "$bin" check --config "$ROOT/agent/agent.example.toml" | tee "$d/check.txt"
  grep -q ": ok" "$d/check.txt" || fail "$a: check rejected the example config"
  ${!q} -L "${!s}" "$bin" check --config "$cfg" | grep -q ": ok" || fail "$a: check rejected $cfg"

  step "$a: pipeline (agent under ${!q}; Mosquitto at $MQTT, simulator and receiver on the host)"
  notify_listener "$d/notify.sock" "$d/notify.log"
  wait_for 10 "the notify listener" test -S "$d/notify.sock"
  t0=$(python3 -c 'import time; print(f"{time.monotonic():.3f}")')
  NOTIFY_SOCKET="$d/notify.sock" WATCHDOG_USEC=2000000 RUST_LOG=info \
    ${!q} -d page -D "$d/qemu-pages.log" -L "${!s}" "$bin" run --config "$cfg" >"$d/agent.log" 2>&1 &
  pid=$!; PIDS+=($pid)
  python3 .ci/qemu-guest-rss.py "$pid" "$d/qemu-pages.log" --watch 0.2 --out "$d/rss.txt" \
    2>"$d/rss.err" &
  PIDS+=($!)
  wait_for 60 "READY=1 from the $a agent" grep -q "READY=1" "$d/notify.log"
  ready_s=$(awk -v t0="$t0" '/READY=1/{printf "%.2f", $1 - t0; exit}' "$d/notify.log")
  http_ok "http://127.0.0.1:$http/healthz" || fail "$a: /healthz does not answer after READY=1"
  "$SIM" --broker "$MQTT" --topic-prefix "$topic" --nodes 20 --interval-ms 200 --seconds 8 --qos 1 \
    >"$d/sim.log" 2>&1 || { tail "$d/sim.log"; fail "$a: simulator failed"; }
  summaries_at_receiver() {
    summaries=$("$CLOUD" device list --db "$W/cloud.db" | awk -F"\t" -v id="gw-$a" '$1==id{print $4}')
    [ "${summaries:-0}" -gt 0 ] 2>/dev/null
  }
  wait_for 60 "summaries from gw-$a at the receiver" summaries_at_receiver
  grep -q "WATCHDOG=1" "$d/notify.log" || fail "$a: no WATCHDOG=1 (WATCHDOG_USEC=2 s)"
  hwm=$(kb "$pid" VmHWM)

  # SIGHUP: a live key is applied, a restart-only key is reported and kept, a broken file refused.
  sed -i 's/^interval_ms = 200/interval_ms = 300/; s/^agent_id = .*/agent_id = "renamed"/' "$cfg"
  kill -HUP "$pid"
  wait_for 30 "the reload" grep -q "reload: applied" "$d/agent.log"
  grep -q "need a restart.*agent_id" "$d/agent.log" || fail "$a: agent_id not reported as restart-only"
  wait_for 20 "READY=1 after the reload" test "$(grep -c 'READY=1' "$d/notify.log")" -ge 2
  echo 'window_seconds = "x"' >>"$cfg"
  kill -HUP "$pid"
  wait_for 20 "the refused reload" grep -q "reload refused" "$d/agent.log"
  http_ok "http://127.0.0.1:$http/healthz" || fail "$a: /healthz down after a refused reload"

  # SIGTERM: flushes and exits 0.
  kill -TERM "$pid"
  local rc=0; wait "$pid" || rc=$?
  [ "$rc" = 0 ] || { tail -n 30 "$d/agent.log"; fail "$a: agent exited $rc after SIGTERM"; }
  grep -q "STOPPING=1" "$d/notify.log" || fail "$a: no STOPPING=1"
  grep -q "stopped" "$d/agent.log" || fail "$a: no clean stop in the log"
  summaries_at_receiver
  [ -s "$d/rss.txt" ] || { cat "$d/rss.err"; fail "$a: no guest memory sample"; }
  rss_peak=$(cut -d" " -f1 "$d/rss.txt")
  echo "$a: $summaries summaries at the receiver; sim: $(tail -n 1 "$d/sim.log")"
  budget "$a start-up to READY=1 under ${!q} (includes emulation)" "${ready_s} s"
  budget "$a agent RSS peak (guest pages, sampled every 0.2 s)" \
    "$(awk -v k="$rss_peak" 'BEGIN{printf "%.1f MiB", k/1024}') (qemu process in all: VmHWM $((hwm / 1024)) MiB)"
  if [ "$rss_peak" -gt "$RSS_BUDGET_KIB" ]; then
    echo "WARNING: $a agent RSS peak is above the 16 MiB budget" >&2
  fi
}

for a in $ARCHES; do pipeline "$a"; done

step "budgets: stripped binary sizes"
for a in $ARCHES; do
  for v in "" -broker; do
    f="$W/edgewise-agent-$a$v"
    [ -f "$f" ] || continue
    bytes=$(stat -c %s "$f")
    what="without the embedded broker"; [ -z "$v" ] || what="with the embedded broker"
    budget "$a stripped size $what" \
      "$(awk -v b="$bytes" 'BEGIN{printf "%.2f MiB (%d bytes)", b/1048576, b}')"
    if [ "$a$v" = aarch64 ] && [ "$bytes" -gt $((10 * 1024 * 1024)) ]; then
      echo "WARNING: aarch64 without the broker is above the 10 MiB budget" >&2
    fi
  done
done

if [ -f "$W/edgewise-agent-aarch64.unstripped" ]; then
  step "aarch64 size breakdown (unstripped build; approximate after LTO inlining)"
  python3 .ci/size-breakdown.py "$W/edgewise-agent-aarch64.unstripped" \
    --nm aarch64-linux-gnu-nm --objdump aarch64-linux-gnu-objdump --top 20
fi

step ".deb packages (cargo-deb from the cross-built binaries) and their checks"
deb_for() {  # deb_for ARCH DEBARCH
  local a=$1 da=$2 t=TRIPLE_$1 q=QEMU_$1 s=SYSROOT_$1 deb r
  # The package's profile is `gateway` (agent/Cargo.toml): cargo-deb reads the asset
  # `target/release/edgewise-agent` as <target dir>/<triple>/gateway/edgewise-agent. A target dir
  # of its own holds the stripped lean binary, which is what the package ships.
  mkdir -p "$W/deb-td/${!t}/gateway"
  cp "$W/edgewise-agent-$a" "$W/deb-td/${!t}/gateway/edgewise-agent"
  CARGO_TARGET_DIR="$W/deb-td" cargo deb -p edgewise-agent --target "${!t}" --no-build --no-strip \
    --output "$W/deb/" >/dev/null
  deb=$(ls "$W"/deb/edgewise-agent_*_"$da".deb)
  dpkg-deb --info "$deb" | tee "$W/deb-info-$a.txt"
  dpkg-deb --contents "$deb" | tee "$W/deb-contents-$a.txt"
  grep -q "Architecture: $da" "$W/deb-info-$a.txt" || fail "$deb: architecture is not $da"
  for f in ./usr/bin/edgewise-agent ./etc/edgewise/agent.toml '\./(usr/)?lib/systemd/system/edgewise-agent\.service'; do
    grep -Eq " $f\$" "$W/deb-contents-$a.txt" || fail "$deb: $f missing"
  done
  mkdir -p "$W/ctl-$a" && dpkg-deb -e "$deb" "$W/ctl-$a"
  grep -qx "/etc/edgewise/agent.toml" "$W/ctl-$a/conffiles" || fail "$deb: config is not a conffile"
  grep -q "deb-systemd-helper enable edgewise-agent.service" "$W/ctl-$a/postinst" \
    || fail "$deb: postinst does not enable the unit"
  grep -q "adduser --system" "$W/ctl-$a/postinst" || fail "$deb: postinst does not create the user"
  sh -n "$W/ctl-$a/postinst" && sh -n "$W/ctl-$a/postrm"
  # Install into a scratch root: unpack through dpkg's own database (maintainer scripts would run
  # chrooted into a root without a shell; their content is checked above).
  r="$W/root-$a"; mkdir -p "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates"; touch "$r/var/lib/dpkg/status"
  dpkg --root="$r" --force-architecture --force-depends --unpack "$deb"
  dpkg-query --root="$r" -W -f '${Package} ${Version} ${Architecture} ${Status}\n' edgewise-agent \
    | tee "$W/dpkg-$a.txt"
  grep -q "unpacked" "$W/dpkg-$a.txt" || fail "$deb: not unpacked in the scratch root"
  # Unpacked but not configured, dpkg leaves a conffile under its .dpkg-new name.
  local conf="$r/etc/edgewise/agent.toml"
  [ -f "$conf" ] || conf="$conf.dpkg-new"
  [ -f "$conf" ] || fail "$deb: /etc/edgewise/agent.toml not unpacked"
  ${!q} -L "${!s}" "$r/usr/bin/edgewise-agent" check --config "$conf" \
    | grep -q ": ok" || fail "$deb: the packaged binary rejects the packaged config"
  budget "$a .deb size" "$(du -k "$deb" | cut -f1) KiB ($(basename "$deb"))"
}
mkdir -p "$W/deb"
for a in $ARCHES; do deb_for "$a" "$([ "$a" = aarch64 ] && echo arm64 || echo armhf)"; done
systemd-analyze verify "$ROOT/agent/deploy/edgewise-agent.service" 2>&1 \
  | grep -v "edgewise-agent: No such file\|is not executable\|Command /usr/bin/edgewise-agent" || true
systemd-analyze security --offline=true "$ROOT/agent/deploy/edgewise-agent.service" 2>/dev/null | tail -n 1 || true

step "flash.sh against a gateway in a network namespace (sshd, systemd-less install)"
for a in aarch64 armv7 armv6l x86_64; do printf '%s -> %s\n' "$a" "$(agent/deploy/flash.sh --print-target "$a")"; done
[ "$(agent/deploy/flash.sh --print-target aarch64)" = aarch64-unknown-linux-gnu ] || fail "arch mapping"
ip netns add ew-gw
ip link add ew-host type veth peer name ew-gw0
ip link set ew-gw0 netns ew-gw
ip addr add 10.231.0.1/30 dev ew-host && ip link set ew-host up
ip -n ew-gw addr add 10.231.0.2/30 dev ew-gw0
ip -n ew-gw link set ew-gw0 up && ip -n ew-gw link set lo up
ssh-keygen -q -t ed25519 -N '' -f "$W/id" && ssh-keygen -q -t ed25519 -N '' -f "$W/hostkey"
mkdir -p "$W/ssh" && cp "$W/id.pub" "$W/ssh/authorized_keys" && chmod 700 "$W/ssh" && chmod 600 "$W/ssh/authorized_keys"
cat >"$W/sshd_config" <<EOF
ListenAddress 10.231.0.2:22
HostKey $W/hostkey
AuthorizedKeysFile $W/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
PidFile $W/sshd.pid
UsePAM no
EOF
mkdir -p /run/sshd
ip netns exec ew-gw /usr/sbin/sshd -f "$W/sshd_config" -E "$W/sshd.log"
GWROOT="$W/gateway"
mkdir -p "$GWROOT"
gwtoken=$("$CLOUD" device add gw-flash --db "$W/cloud.db" | tail -n 1)
echo "$gwtoken" >"$W/gw-token"
gwcfg() {  # the gateway's config: the receiver is on the host side of the veth
  cat <<EOF
agent_id = "gw-flash"
[mqtt]
url = "mqtt://10.231.0.1:1883"
[store]
path = "$GWROOT/var/lib/edgewise/agent.db"
[sync]
url = "http://10.231.0.1:$CLOUD_PORT"
token_file = "$GWROOT/etc/edgewise/token"
[http]
listen = "127.0.0.1:$1"
EOF
}
gwcfg 9108 >"$W/gw.toml"
FLASH=(agent/deploy/flash.sh --prefix "$GWROOT" --health-timeout 90
       --ssh-opt "IdentityFile=$W/id" --ssh-opt StrictHostKeyChecking=no
       --ssh-opt "UserKnownHostsFile=$W/known_hosts")
wait_for 10 "sshd in the namespace" ssh -o BatchMode=yes -o StrictHostKeyChecking=no \
  -o "UserKnownHostsFile=$W/known_hosts" -i "$W/id" root@10.231.0.2 true
gw_healthz() { ip netns exec ew-gw curl -fsS --max-time 2 "http://127.0.0.1:$1/healthz"; }
# 1. First install: binary for the detected architecture (x86_64 here), config, token.
"${FLASH[@]}" --binary "$HOST_TD/debug/edgewise-agent" --config "$W/gw.toml" --token "$W/gw-token" root@10.231.0.2
gw_healthz 9108 | grep -q '"status":"ok"' || fail "flash: the gateway's /healthz is not ok"
first_pid=$(cat "$GWROOT/run/edgewise-agent.pid")
# 2. A binary for another architecture is refused before anything changes.
if "${FLASH[@]}" --binary "$W/edgewise-agent-aarch64" root@10.231.0.2 2>"$W/flash-wrong.txt"; then
  fail "flash accepted an aarch64 binary for an x86_64 gateway"
fi
grep -q "does not run here" "$W/flash-wrong.txt" || { cat "$W/flash-wrong.txt"; fail "flash: unclear refusal"; }
kill -0 "$first_pid" || fail "flash: the running agent was disturbed by a refused update"
# 3. An update (new config: port 9109) replaces the running agent; 4. rollback restores 9108.
gwcfg 9109 >"$W/gw2.toml"
"${FLASH[@]}" --binary "$HOST_TD/debug/edgewise-agent" --config "$W/gw2.toml" root@10.231.0.2
gw_healthz 9109 >/dev/null || fail "flash: update not serving on 9109"
kill -0 "$first_pid" 2>/dev/null && fail "flash: the old agent still runs after the update"
[ -f "$GWROOT/usr/local/bin/edgewise-agent.prev" ] || fail "flash: no previous binary kept"
"${FLASH[@]}" --rollback root@10.231.0.2
gw_healthz 9108 >/dev/null || fail "flash: rollback not serving on 9108"
# 5. A config that does not start the agent (port taken) is rolled back automatically.
ip netns exec ew-gw python3 -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1",9110)); s.listen(); time.sleep(60)' &
PIDS+=($!)
wait_for 20 "the port squatter" ip netns exec ew-gw bash -c 'exec 3<>/dev/tcp/127.0.0.1/9110' 2>/dev/null
gwcfg 9110 >"$W/gw3.toml"
if "${FLASH[@]}" --binary "$HOST_TD/debug/edgewise-agent" --config "$W/gw3.toml" root@10.231.0.2 2>"$W/flash-bad.txt"; then
  fail "flash reported success for an agent that cannot start"
fi
grep -q "gateway: rolled back" "$W/flash-bad.txt" || { cat "$W/flash-bad.txt"; fail "flash: no automatic rollback"; }
gw_healthz 9108 >/dev/null || fail "flash: automatic rollback not serving on 9108"
kill "$(cat "$GWROOT/run/edgewise-agent.pid")"
kill "$(cat "$W/sshd.pid")"

step "budgets (aarch64 is the reference gateway; RSS and start-up are measured under qemu-user)"
printf '%s\n' "${BUDGETS[@]}"
step "arm CI steps passed"
