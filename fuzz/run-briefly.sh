#!/usr/bin/env bash
# Runs every fuzz target of this crate for a short time and fails on a crash.
#
#   fuzz/run-briefly.sh [SECONDS]      (default 20, or $FUZZ_SECONDS)
#
# Uses `--sanitizer none`, the only mode that builds on stable Rust (see
# docs/fuzzing.md). Each target starts from its checked-in seeds
# (fuzz/seeds/TARGET) plus whatever corpus earlier runs left in
# fuzz/corpus/TARGET. Exit codes: 0 no crash, 1 a target crashed or failed to
# build (the reproducer is in fuzz/artifacts/TARGET/), 2 cargo-fuzz missing.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-${FUZZ_SECONDS:-20}}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
  echo "run-briefly.sh: SECONDS must be a positive integer, got '$secs'" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "run-briefly.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
  exit 2
fi

if ! cargo fuzz build --sanitizer none; then
  echo "run-briefly.sh: building the fuzz targets failed" >&2
  exit 1
fi

status=0
summary=()
logdir="$(mktemp -d)"
trap 'rm -rf "$logdir"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  log="$logdir/$target.log"
  echo "== fuzz $target for ${secs}s"
  # -timeout: an input that takes more than 10 s counts as a crash (a hang).
  if cargo fuzz run --sanitizer none "$target" "corpus/$target" "${seeds[@]}" -- \
      -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)"
    runs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)"
    rate="$(sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$done_line")"
    summary+=("$target: ok, ${runs:-?} runs, ${rate:-?} exec/s")
  else
    status=1
    echo "---- $target failed; the panic and the reproducer:" >&2
    grep -E 'panicked at|ERROR: |SUMMARY: |Test unit written to|^Base64: ' "$log" >&2 || tail -n 40 "$log" >&2
    summary+=("$target: CRASH or error (see fuzz/artifacts/$target/)")
  fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit "$status"
