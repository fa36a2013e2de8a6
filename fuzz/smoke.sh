#!/usr/bin/env bash
# Fuzz smoke test: builds every fuzz target and runs each one for a few seconds against its
# committed corpus (and its regressions), failing on any crash, hang or leak the targets
# check. Stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags.
#
#   bash fuzz/smoke.sh              # 5 s per target
#   FUZZ_SMOKE_SECONDS=60 bash fuzz/smoke.sh
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SMOKE_SECONDS:-5}"
targets=(target_parse frames hostile_server resolver_answers)
# No sanitizer: the crate is safe Rust (unsafe_code = "forbid"), and ASan would double the
# build and run time. Debug assertions stay on, so overflows panic. Must match the flags of
# the recorded runs in README.md.
flags=(--sanitizer none --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# The fuzz build has its own flags: never share the main crate's target directory.
unset CARGO_TARGET_DIR

start=$(date +%s)
cargo fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
  # New inputs go to a scratch directory (git-ignored): the committed corpus stays as it is.
  scratch="target/smoke-corpus/$target"
  rm -rf "$scratch"
  mkdir -p "$scratch"
  inputs=("corpus/$target")
  if [ -d "regressions/$target" ]; then
    inputs+=("regressions/$target")
  fi
  echo "fuzz smoke: $target for ${seconds}s"
  cargo fuzz run "${flags[@]}" "$target" "$scratch" "${inputs[@]}" -- \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1
done
echo "fuzz smoke: ${#targets[@]} targets passed in $(($(date +%s) - start))s"
