#!/usr/bin/env bash
# Builds Spillway's cargo-fuzz targets and fuzzes each for SECONDS (default
# 30), then prints what every target executed. See fuzz/README.md.
#
#   scripts/fuzz.sh [SECONDS]
#
# Environment:
#   FUZZ_TARGETS   space-separated targets to run (default: all of them)
#   FUZZ_PARALLEL  how many targets fuzz at once (default 1; the machines
#                  have 2 cores, so 2 at most makes sense)
#   FUZZ_ARGS      extra libFuzzer flags for every target
#   FUZZ_NO_BUILD  set to 1 to fuzz the binaries already built (skips
#                  `cargo fuzz build`, e.g. while src/ is mid-edit)
#
# Works on the stable toolchain: the targets are built without a sanitizer
# (`-s none`), which is the only mode cargo-fuzz supports without nightly;
# libFuzzer's coverage instrumentation (`-Cpasses=sancov-module`) is stable.
# Panics, overflow checks and debug assertions are what finds bugs here.
#
# Exits non-zero if a target crashes (panic, timeout, out of memory) or a
# saved regression input fails again. New crash inputs land in
# fuzz/artifacts/<target>/ (ignored by git); keep one as a regression test
# by minimizing it (`cargo fuzz tmin -s none <target> <file>`) and copying it
# to fuzz/regressions/<target>/.
set -euo pipefail

SECONDS_PER_TARGET="${1:-30}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS]   (a positive whole number)" >&2
    exit 2
fi
PARALLEL="${FUZZ_PARALLEL:-1}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FUZZ="$ROOT/fuzz"

# --- tools -----------------------------------------------------------------
# libfuzzer-sys compiles libFuzzer (C++) from source.
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz.sh: installing a C++ compiler (g++)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    # Outside the repo, so rust-toolchain.toml does not apply to the install.
    (cd / && cargo install cargo-fuzz --locked --version '^0.13')
fi

# --- build -----------------------------------------------------------------
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
    echo "fuzz.sh: building the fuzz targets (first build: several minutes)" >&2
    cargo fuzz build -s none
fi
mapfile -t ALL_TARGETS < <(cargo fuzz list)
read -r -a TARGETS <<<"${FUZZ_TARGETS:-${ALL_TARGETS[*]}}"
BIN_DIR="$FUZZ/target/x86_64-unknown-linux-gnu/release"

dict_for() {
    case "$1" in
        sse_decoder | provider_stream) echo "$FUZZ/dicts/sse.dict" ;;
        ws_frame | request_json) echo "$FUZZ/dicts/json.dict" ;;
        config) echo "$FUZZ/dicts/toml.dict" ;;
    esac
}

LOG_DIR="$FUZZ/artifacts/logs"
mkdir -p "$LOG_DIR"
failed=()

# --- regressions: inputs that once crashed must pass -----------------------
for target in "${TARGETS[@]}"; do
    dir="$FUZZ/regressions/$target"
    [ -d "$dir" ] || continue
    mapfile -t inputs < <(find "$dir" -type f ! -name '*.md' | sort)
    [ "${#inputs[@]}" -gt 0 ] || continue
    if "$BIN_DIR/$target" "${inputs[@]}" >"$LOG_DIR/$target.regressions.log" 2>&1; then
        echo "fuzz.sh: $target: ${#inputs[@]} regression input(s) pass" >&2
    else
        echo "fuzz.sh: $target: a regression input fails again; see $LOG_DIR/$target.regressions.log" >&2
        failed+=("$target(regression)")
    fi
done

# --- fuzz ------------------------------------------------------------------
run_target() {
    local target="$1" dict work log
    dict="$(dict_for "$target")"
    work="$FUZZ/corpus-work/$target"
    log="$LOG_DIR/$target.log"
    mkdir -p "$work" "$FUZZ/artifacts/$target" "$FUZZ/corpus/$target"
    # New inputs go to the first corpus directory (corpus-work, ignored by
    # git); the committed seeds in fuzz/corpus/<target> are only read.
    local rc=0 started
    started="$(date +%s)"
    # The binaries built above are run directly (what `cargo fuzz run`
    # does, minus its rebuild): edits to src/ during a run change nothing.
    # shellcheck disable=SC2086
    "$BIN_DIR/$target" "$work" "$FUZZ/corpus/$target" \
        -artifact_prefix="$FUZZ/artifacts/$target/" \
        -max_total_time="$SECONDS_PER_TARGET" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -max_len=16384 \
        -print_final_stats=1 \
        ${dict:+-dict="$dict"} \
        ${FUZZ_ARGS:-} \
        >"$log" 2>&1 || rc=$?
    echo "$rc" >"$LOG_DIR/$target.rc"
    echo "$(($(date +%s) - started))" >"$LOG_DIR/$target.secs"
}

for target in "${TARGETS[@]}"; do
    rm -f "$LOG_DIR/$target.rc" "$LOG_DIR/$target.secs"
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do
        wait -n || true
    done
    echo "fuzz.sh: fuzzing $target for ${SECONDS_PER_TARGET}s" >&2
    run_target "$target" &
done
wait

# --- report ----------------------------------------------------------------
printf '\n%-16s %8s %12s %10s %8s  %s\n' target seconds execs execs/s corpus result
for target in "${TARGETS[@]}"; do
    log="$LOG_DIR/$target.log"
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)"
    # libFuzzer's own count of seconds when it finished the run; the wall
    # time when it stopped early on a crash.
    secs="$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1 || true)"
    [ -n "$secs" ] || secs="$(cat "$LOG_DIR/$target.secs" 2>/dev/null || echo "$SECONDS_PER_TARGET")"
    corpus="$(find "$FUZZ/corpus-work/$target" -type f | wc -l)"
    if [ -n "$execs" ] && [ "$secs" -gt 0 ]; then rate=$((execs / secs)); else rate="-"; fi
    status="$(cat "$LOG_DIR/$target.rc" 2>/dev/null || echo '?')"
    if [ "$status" = 0 ]; then
        result="ok"
    else
        result="CRASH (exit $status; $log)"
        failed+=("$target")
        grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" >&2 || true
        grep -o 'Test unit written to .*' "$log" >&2 || true
    fi
    printf '%-16s %8s %12s %10s %8s  %s\n' "$target" "$secs" "${execs:--}" "$rate" "$corpus" "$result"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crashes" >&2
