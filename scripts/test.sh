#!/usr/bin/env bash
# Runs Spillway's whole test suite on a fresh machine. It installs what the
# tests need when it is missing, then runs formatting, lints and every test.
#
#   scripts/test.sh            # everything (what CI runs via .ci/run)
#   scripts/test.sh -E 'test(openai)'   # extra args go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need -------------------------------------------------
# The official OpenAI Python SDK, which tests/openai_sdk.rs drives against
# the gateway. Pinned in tests/python/requirements.txt; kept in target/.
VENV="$PWD/target/test-venv"
if ! "$VENV/bin/python" -c 'import openai' >/dev/null 2>&1; then
    log "installing the OpenAI Python SDK into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
export SPILLWAY_TEST_PYTHON="$VENV/bin/python"

# PostgreSQL: the store tests run against SQLite and a real PostgreSQL, and
# the fault tests start throwaway clusters with initdb/pg_ctl. Use the one
# on 127.0.0.1:5432 (trust auth) when it answers; start the machine's cluster
# if it is installed but down; install it if it is missing.
export SPILLWAY_TEST_POSTGRES_URL="${SPILLWAY_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if ! pg_up; then
    log "starting PostgreSQL"
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if pg_up; then
    # Trust auth on loopback is how this machine kind is set up; make sure
    # the test database exists.
    psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null
else
    echo "PostgreSQL is not reachable on 127.0.0.1:5432; the PostgreSQL tests will fail" >&2
fi

# Redis: the cluster tests (tests/cluster*.rs) start throwaway redis-server
# processes of their own on free ports (never the machine's 6379), so only
# the binary is needed.
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing Redis"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# Browser tests (tests/browser.rs): Debian's Chromium, never a browser a
# test tool downloads, with a font so text renders in screenshots; Node.js
# and the packages pinned in tests/browser/package-lock.json (playwright-core
# drives Chromium). npm ci runs again when the lock file is newer than the
# install.
if [ ! -x /usr/bin/chromium ] || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    log "installing Chromium"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
export SPILLWAY_TEST_CHROMIUM=/usr/bin/chromium
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "installing Node.js"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "Node.js $(node --version) is older than playwright-core needs (20); the browser tests will fail" >&2
fi
if [ ! -d tests/browser/node_modules ] || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
    log "installing the browser tests' node packages (npm ci in tests/browser)"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# --- checks --------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
