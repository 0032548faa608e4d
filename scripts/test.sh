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
