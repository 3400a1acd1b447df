#!/usr/bin/env bash
# flash.sh: install or update the Edgewise agent on a gateway over ssh, restart it, and wait until
# its /healthz answers; roll back automatically if it does not.
#
#   agent/deploy/flash.sh [options] user@gateway
#   agent/deploy/flash.sh --rollback user@gateway      # previous binary + config back, restart
#
# The gateway's architecture is read over ssh (`uname -m`): aarch64 -> aarch64-unknown-linux-gnu,
# armv7l/armv6l -> armv7-unknown-linux-gnueabihf, x86_64 -> x86_64-unknown-linux-gnu. Without
# --binary the script takes $CARGO_TARGET_DIR/<target>/gateway/edgewise-agent (Cargo.toml's
# small-binary `gateway` profile), building it first (`cross build`, or `cargo build` with the
# cross linkers of .ci/arm.sh) when it is missing.
#
# On the gateway (paths under --prefix, default /):
#   /usr/local/bin/edgewise-agent (+ .prev)      the binary; the previous one is kept for rollback
#   /etc/edgewise/agent.toml (+ .prev)           --config FILE, else kept; first install: the example
#   /etc/edgewise/token                          --token FILE (0600, the service user's)
#   /etc/systemd/system/edgewise-agent.service   systemd mode: unit installed, enabled, restarted
#   /run/edgewise-agent.pid, /var/log/edgewise-agent.log   --no-systemd mode (auto without systemd)
# The new binary must run on the gateway and accept the config (`edgewise-agent check`) before
# anything is replaced.
#
# Options: --binary FILE, --config FILE, --token FILE, --port N, --ssh-opt OPT (repeatable),
# --no-systemd, --prefix DIR (install root on the gateway; implies --no-systemd unless /),
# --health-timeout SECONDS (default 60), --rollback, --print-target UNAME_M.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

die() { echo "flash: $*" >&2; exit 1; }
say() { echo "flash: $*" >&2; }

target_for() {
  case "$1" in
    aarch64|arm64) echo aarch64-unknown-linux-gnu ;;
    armv7l|armv7|armv6l|armhf) echo armv7-unknown-linux-gnueabihf ;;
    x86_64|amd64) echo x86_64-unknown-linux-gnu ;;
    *) return 1 ;;
  esac
}

BINARY="" CONFIG="" TOKEN="" PORT="" PREFIX="/" HEALTH_TIMEOUT=60 ROLLBACK=0 NO_SYSTEMD=0
SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=10)
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --token) TOKEN=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --ssh-opt) SSH_OPTS+=(-o "$2"); shift 2 ;;
    --no-systemd) NO_SYSTEMD=1; shift ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --health-timeout) HEALTH_TIMEOUT=$2; shift 2 ;;
    --rollback) ROLLBACK=1; shift ;;
    --print-target) target_for "$2" || die "unsupported architecture '$2'"; exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || die "usage: flash.sh [options] user@gateway (see --help)"
GATEWAY=$1
[ -n "$PORT" ] && SSH_OPTS+=(-p "$PORT")
case "$PREFIX" in /) ;; /?*) NO_SYSTEMD=1 ;; *) die "--prefix must be an absolute path" ;; esac
for f in "$CONFIG" "$TOKEN"; do [ -z "$f" ] || [ -r "$f" ] || die "cannot read $f"; done

gw() { ssh "${SSH_OPTS[@]}" "$GATEWAY" "$@"; }

# The part that runs on the gateway (bash), fed on stdin; arguments after `bash -s --`.
REMOTE=$(cat <<'REMOTE_EOF'
set -euo pipefail
action=$1 P=${2%/} no_systemd=$3 timeout=$4
BIN=$P/usr/local/bin/edgewise-agent CFG=$P/etc/edgewise/agent.toml TOK=$P/etc/edgewise/token
UNIT=$P/etc/systemd/system/edgewise-agent.service PID=$P/run/edgewise-agent.pid
LOG=$P/var/log/edgewise-agent.log STAGE=$P/var/lib/edgewise/.flash
log() { echo "gateway: $*" >&2; }
if [ "$no_systemd" = 0 ] && ! [ -d /run/systemd/system ]; then
  log "no systemd running: systemd-less install"; no_systemd=1
fi

health_addr() {  # [http] listen from the config, default 127.0.0.1:9108; 0.0.0.0 -> 127.0.0.1
  local a
  a=$(awk '/^\[/{s=($0=="[http]")} s && /^[ \t]*listen[ \t]*=/{gsub(/.*=[ \t]*"|".*/,""); print; exit}' "$CFG")
  a=${a:-127.0.0.1:9108}; a=${a/0.0.0.0:/127.0.0.1:}; a=${a/\[::\]:/127.0.0.1:}; echo "$a"
}
healthy() {
  local addr host port line
  addr=$(health_addr); host=${addr%:*}; port=${addr##*:}; host=${host#[}; host=${host%]}
  { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
  printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
  IFS= read -r -t 5 line <&3 || line=""
  exec 3<&- 3>&-
  case "$line" in "HTTP/1."?" 200"*) return 0 ;; esac
  return 1
}
stop_plain() {
  [ -f "$PID" ] || return 0
  local pid; pid=$(cat "$PID")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "agent $pid ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "$pid"; fi
  fi
  rm -f "$PID"
}
restart() {
  if [ "$no_systemd" = 1 ]; then
    stop_plain
    mkdir -p "$(dirname "$PID")" "$(dirname "$LOG")"
    nohup setsid "$BIN" run --config "$CFG" >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PID"
    log "started pid $(cat "$PID") (log: $LOG)"
  else
    systemctl daemon-reload
    systemctl enable --quiet edgewise-agent.service
    systemctl restart edgewise-agent.service
    log "systemctl restart edgewise-agent: done"
  fi
}
wait_healthy() {
  local deadline=$((SECONDS + timeout))
  while [ $SECONDS -lt $deadline ]; do
    if healthy; then log "/healthz on $(health_addr) answers 200"; return 0; fi
    if [ "$no_systemd" = 1 ] && ! kill -0 "$(cat "$PID" 2>/dev/null || echo 0)" 2>/dev/null; then
      log "the agent exited; last log lines:"; tail -n 20 "$LOG" >&2 || true; return 1
    fi
    sleep 0.5
  done
  log "/healthz did not answer within ${timeout} s"
  if [ "$no_systemd" = 1 ]; then tail -n 20 "$LOG" >&2 || true
  else journalctl -u edgewise-agent -n 20 --no-pager >&2 || true; fi
  return 1
}
swap_back() {  # previous binary and config back in place
  [ -f "$BIN.prev" ] || { log "no previous binary to roll back to"; return 1; }
  mv -f "$BIN.prev" "$BIN"
  if [ -f "$CFG.prev" ]; then mv -f "$CFG.prev" "$CFG"; fi
  log "previous binary and config restored"
}

case "$action" in
  arch) uname -m ;;
  prepare) mkdir -p "$STAGE" && rm -f "$STAGE"/* ;;
  install)
    chmod 0755 "$STAGE/edgewise-agent"
    "$STAGE/edgewise-agent" --version >/dev/null 2>&1 \
      || { log "the new binary does not run here ($(uname -m)); nothing changed"; exit 1; }
    mkdir -p "$(dirname "$BIN")" "$(dirname "$CFG")"
    if [ -f "$STAGE/agent.toml" ]; then newcfg=$STAGE/agent.toml
    elif [ -f "$CFG" ]; then newcfg=$CFG
    else "$STAGE/edgewise-agent" example-config >"$STAGE/agent.toml"; newcfg=$STAGE/agent.toml; fi
    "$STAGE/edgewise-agent" check --config "$newcfg" >&2 \
      || { log "the config does not pass 'edgewise-agent check'; nothing changed"; exit 1; }
    if [ "$no_systemd" = 0 ]; then
      getent passwd edgewise >/dev/null || useradd --system --user-group --home-dir /var/lib/edgewise \
        --no-create-home --shell /usr/sbin/nologin edgewise
      sed 's#/usr/bin/edgewise-agent#/usr/local/bin/edgewise-agent#g' "$STAGE/edgewise-agent.service" >"$UNIT.new"
      mv -f "$UNIT.new" "$UNIT"
    fi
    if [ -f "$STAGE/token" ]; then   # private to the user the agent runs as (it checks)
      install -m 0600 "$STAGE/token" "$TOK"
      if [ "$no_systemd" = 0 ] && getent passwd edgewise >/dev/null; then chown edgewise:edgewise "$TOK"; fi
    fi
    if [ -f "$BIN" ]; then cp -p "$BIN" "$BIN.prev"; fi
    if [ "$newcfg" != "$CFG" ]; then
      if [ -f "$CFG" ]; then cp -p "$CFG" "$CFG.prev"; fi
      install -m 0640 "$newcfg" "$CFG.new" && mv -f "$CFG.new" "$CFG"
      getent group edgewise >/dev/null && chgrp edgewise "$CFG" "$(dirname "$CFG")"
    fi
    mv -f "$STAGE/edgewise-agent" "$BIN"
    log "installed $("$BIN" --version)"
    restart
    if wait_healthy; then rm -rf "$STAGE"; exit 0; fi
    log "the new agent is not healthy: rolling back"
    swap_back && restart && wait_healthy && log "rolled back"
    exit 1
    ;;
  rollback)
    swap_back
    restart
    wait_healthy
    ;;
  *) log "unknown action $action"; exit 2 ;;
esac
REMOTE_EOF
)
remote() { gw bash -s -- "$@" <<<"$REMOTE"; }

if [ "$ROLLBACK" = 1 ]; then
  remote rollback "$PREFIX" "$NO_SYSTEMD" "$HEALTH_TIMEOUT"
  say "rolled back on $GATEWAY"
  exit 0
fi

ARCH=$(remote arch "$PREFIX" "$NO_SYSTEMD" "$HEALTH_TIMEOUT") || die "cannot reach $GATEWAY over ssh"
TARGET=$(target_for "$ARCH") || die "unsupported gateway architecture '$ARCH'"
say "$GATEWAY is $ARCH: $TARGET"

if [ -z "$BINARY" ]; then
  TD=${CARGO_TARGET_DIR:-$ROOT/target}
  BINARY=$TD/$TARGET/gateway/edgewise-agent
  if [ ! -x "$BINARY" ]; then
    say "building $BINARY"
    if command -v cross >/dev/null; then
      (cd "$ROOT" && cross build --profile gateway --target "$TARGET" -p edgewise-agent --no-default-features)
    else
      (cd "$ROOT" && . .ci/arm-env.sh && cargo build --profile gateway --target "$TARGET" -p edgewise-agent --no-default-features)
    fi
  fi
fi
[ -r "$BINARY" ] || die "no binary at $BINARY"

remote prepare "$PREFIX" "$NO_SYSTEMD" "$HEALTH_TIMEOUT"
STAGE=${PREFIX%/}/var/lib/edgewise/.flash
gw "cat > '$STAGE/edgewise-agent'" <"$BINARY"
gw "cat > '$STAGE/edgewise-agent.service'" <"$HERE/edgewise-agent.service"
[ -z "$CONFIG" ] || gw "cat > '$STAGE/agent.toml'" <"$CONFIG"
[ -z "$TOKEN" ] || gw "umask 077; cat > '$STAGE/token'" <"$TOKEN"
say "uploaded $(du -h "$BINARY" | cut -f1) binary; installing"
remote install "$PREFIX" "$NO_SYSTEMD" "$HEALTH_TIMEOUT"
say "$GATEWAY runs the new agent; rollback: flash.sh --rollback $GATEWAY"
