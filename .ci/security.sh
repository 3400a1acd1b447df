#!/usr/bin/env bash
# CI steps of the security area (issue #10):
#   1. cargo deny: licenses, bans (banned and duplicate crates) and sources, against deny.toml;
#   2. cargo deny advisories, when the RustSec advisory database can be fetched (it lives on
#      github.com). When it cannot, this says so loudly: the advisories check is then NOT run,
#      which is not a pass. EDGEWISE_REQUIRE_ADVISORIES=1 turns that into a failure.
#   3. the TLS and authentication tests (real handshakes on loopback, certificates made in the
#      tests), plus a Mosquitto with TLS, client certificates and passwords started by the test,
#      and the receiver's keyed-hash migration on PostgreSQL too when it is reachable.
# Installs cargo-deny into /var/tmp/edgewise-tools when missing. Honours $CARGO_TARGET_DIR.
# Run from anywhere: bash .ci/security.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tools=/var/tmp/edgewise-tools
export PATH="$tools/bin:$PATH"

if ! command -v cargo-deny >/dev/null; then
    echo "== installing cargo-deny into $tools (takes a while, once per machine)"
    cargo install --locked --root "$tools" cargo-deny
fi

echo "== cargo deny: licenses, bans, sources"
cargo deny check licenses bans sources

echo "== cargo deny: advisories"
if timeout 120 cargo deny fetch db >/tmp/edgewise-deny-fetch.log 2>&1; then
    cargo deny check advisories
else
    echo "!! ADVISORIES CHECK NOT RUN: the RustSec advisory database could not be fetched"
    echo "!! (https://github.com/rustsec/advisory-db). Output of 'cargo deny fetch db':"
    sed 's/^/!!   /' /tmp/edgewise-deny-fetch.log | tail -5
    echo "!! licenses, bans and sources were checked above; advisories were NOT."
    if [ "${EDGEWISE_REQUIRE_ADVISORIES:-0}" = 1 ]; then
        exit 1
    fi
fi

echo "== TLS and authentication tests (with a TLS Mosquitto and PostgreSQL)"
pg="${EDGEWISE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
if (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    export EDGEWISE_TEST_PG_URL="$pg"
fi
# The test starts its own Mosquitto (TLS, client certificates, passwords) on a free port.
mosquitto_bin="$(command -v mosquitto || true)"
[ -z "$mosquitto_bin" ] && [ -x /usr/sbin/mosquitto ] && mosquitto_bin=/usr/sbin/mosquitto
if [ -z "$mosquitto_bin" ] || ! command -v mosquitto_passwd >/dev/null; then
    echo "== installing mosquitto"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
fi
export EDGEWISE_TEST_MOSQUITTO="$mosquitto_bin"
export EDGEWISE_TEST_MOSQUITTO_PASSWD="$(command -v mosquitto_passwd)"
cargo test -p edgewise-agent --test tls
cargo test -p edgewise-cloud --test security
