#!/usr/bin/env bash
# The one test command (README, CI): installs what is missing, then runs everything.
# Usage: tests/run.sh            (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

need_apt() {
  # Install Debian packages when a command is missing; loud failure with the fix otherwise.
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $pkg (for $cmd)"
    (apt-get update -qq || true) >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  fi
  command -v "$cmd" >/dev/null 2>&1 || {
    echo "FATAL: '$cmd' is required; install the '$pkg' package (e.g. sudo apt-get install $pkg)" >&2
    exit 1
  }
}

command -v cargo >/dev/null 2>&1 || {
  echo "FATAL: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
}
need_apt curl curl
# The Redis tests start their own redis-server processes (tests/common/redis.rs).
need_apt redis-server redis-server
need_apt redis-cli redis-tools
# tests/redis_tls.rs makes its CA and certificate with openssl.
need_apt openssl openssl
# The browser tests (tests/ops_page.rs, tests/common/browser.rs) drive the system headless
# Chromium over the DevTools protocol; the JavaScript client's tests (clients/js) run under
# Node's test runner.
need_apt chromium chromium
need_apt node nodejs
# tests/operations.rs: promtool checks /metrics, a real Prometheus evaluates the Grafana
# dashboard's queries, systemd-analyze verifies dist/ringgate.service, prlimit starts the
# gateway under a memlock limit that breaks it.
need_apt promtool prometheus
need_apt prometheus prometheus
need_apt systemd-analyze systemd
need_apt prlimit util-linux

# A clean CI build is not helped by incremental caches (they doubled the target folder).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# The build needs ~2 GiB and the tests write logs and Redis data: fail loudly, not with a
# linker crash, when the disk is nearly full.
free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${free_kib:-0}" -lt 4194304 ]; then
  echo "FATAL: only $((free_kib / 1024)) MiB free under $PWD; the build and tests need 4 GiB" \
    "(free space, e.g. 'cargo clean' in other checkouts)" >&2
  exit 1
fi

say "format check"
cargo fmt --all -- --check

say "build (workspace, all targets)"
cargo build --workspace --all-targets --quiet

say "unit and integration tests"
cargo test --workspace --quiet 2>&1 | tee target/test-output.txt

say "the gateway suite again on the glommio socket driver (the default is uring where the kernel has it)"
RINGGATE_IO_DRIVER=glommio cargo test --quiet --test gateway 2>&1 | tee -a target/test-output.txt

say "JavaScript client (clients/js): unit tests, and integration tests against the gateway just built"
# Node 20 has a WebSocket global only behind a flag; without it the tests use their own.
ws_flag=$(node --experimental-websocket -e '' 2>/dev/null && echo --experimental-websocket || true)
(cd clients/js && RINGGATE_BIN="$PWD/../../target/debug/ringgate" node $ws_flag --test test/)

say "load generator smoke run against a real gateway (bounded)"
bash tests/bench_smoke.sh

say "all tests passed"
