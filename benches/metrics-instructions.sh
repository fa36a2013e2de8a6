#!/usr/bin/env bash
# What the `metrics` feature costs per call in instructions: S2's load generator alone, under
# callgrind, with the feature off, on without a recorder, and on with a Prometheus recorder.
#
# `benches/metrics-cost.sh` measures the bar itself (client CPU time per call), but CPU time on
# a shared two-core machine moves by points from run to run. Instructions do not: this
# script's figures repeat within ~0.1 %, and on this code they track the CPU ratios (section
# 28 of `benches/RESULTS.md`). Use it to see what a change does, and the CPU script to judge
# the bar.
#
# Method: the load bench's servers run in their own processes (it re-executes itself), so
# `valgrind --trace-children=no` counts the client only. Each mode runs S2 with one client
# thread twice, for 2 s and for 8 s after the same warm-up; instructions per call are the
# difference in instructions over the difference in calls, so start-up, connecting and the
# bench's own set-up cancel out. Calls are counted exactly: callgrind's count of calls to
# `Pool::call` (the load bench calls it once per RPC). A closed loop under callgrind runs
# ~50× slower, so the windows hold a few thousand calls each.
#
#   bash benches/metrics-instructions.sh                    # ~3 minutes plus two builds
#   CODEGEN_UNITS=1 bash benches/metrics-instructions.sh    # both builds in one codegen unit
#
# Settings (environment): RECORDER (metrics-prometheus; or summary, a66: see
# benches/metrics-cost.sh), CODEGEN_UNITS (unset: the bench profile's own, 16; a number
# builds every crate of both binaries with that many codegen units, in a target directory of
# its own under the default one unless CARGO_TARGET_DIR is set), OUT_DIR (callgrind's output
# and the runs' logs; default <cargo target dir>/metrics-instructions/<UTC time>).
# Needs valgrind. Exit status: non-zero if a build or a run fails.
set -euo pipefail
# A failure inside `$(...)` stops the script too.
shopt -s inherit_errexit

RECORDER=${RECORDER:-metrics-prometheus}
[[ $RECORDER == summary || $RECORDER == a66 || $RECORDER == metrics-prometheus ]] || {
    echo "metrics-instructions: RECORDER=$RECORDER: expected summary, a66 or metrics-prometheus" >&2
    exit 1
}
command -v valgrind >/dev/null || {
    echo "metrics-instructions: needs valgrind (e.g. apt-get install valgrind)" >&2
    exit 1
}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/load-exe.sh
source benches/load-exe.sh
if [[ -n ${CODEGEN_UNITS:-} ]]; then
    [[ $CODEGEN_UNITS =~ ^[1-9][0-9]{0,2}$ ]] || {
        echo "metrics-instructions: CODEGEN_UNITS=$CODEGEN_UNITS: expected 1 to 999" >&2
        exit 1
    }
    export CARGO_PROFILE_BENCH_CODEGEN_UNITS=$CODEGEN_UNITS
    # Its own target directory: switching back and forth would rebuild every dependency.
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/codegen-units-$CODEGEN_UNITS}
fi
out=${OUT_DIR:-${CARGO_TARGET_DIR:-target}/metrics-instructions/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
unset LOAD_POOL_SIZES LOAD_SCENARIOS LOAD_MODES LOAD_METRICS LOAD_ROUNDS LOAD_FIRST_ROUND LOAD_CSV LOAD_RECORDER

# Builds the load bench with the given cargo arguments into $bin/$1 (as metrics-cost.sh does).
build() {
    local name=$1 json exe
    shift
    echo "building the load bench ($name)${CODEGEN_UNITS:+, $CODEGEN_UNITS codegen unit(s)}" >&2
    json=$(cargo bench --bench load "$@" --no-run --message-format=json)
    exe=$(printf '%s\n' "$json" | load_exe) || true
    [[ -n $exe && -x $exe ]] || {
        echo "metrics-instructions: no executable for the bench target load" >&2
        exit 1
    }
    cp "$exe" "$bin/$name"
}
build off
build on --features metrics

# Instructions and calls to `Pool::call` in one callgrind output file, as "instructions calls".
# The format names a function once, `cfn=(id) name`, and by its id after that.
count() {
    awk '
        /^(c?fn)=\([0-9]+\) / {
            id = substr($1, index($1, "(") + 1); id = substr(id, 1, length(id) - 1)
            name[id] = substr($0, index($0, ") ") + 2)
        }
        /^cfn=\(/ {
            id = substr($1, 6); id = substr(id, 1, index(id, ")") - 1)
            target = (name[id] ~ /^<tonic_pool::pool::Pool as tower_service::Service<.*>>::call$/)
        }
        /^calls=/ && target { split($1, c, "="); calls += c[2] }
        /^(summary|totals):/ { total = $2 }
        END { printf "%d %d\n", total, calls }
    ' "$1"
}

# Runs mode $3 of binary $2 for $1 s under callgrind (the rest: the bench's settings); prints
# "instructions calls".
measure() {
    local secs=$1 name=$2 mode=$3 tag=$2-$3-$1
    shift 3
    if ! env "$@" LOAD_SCENARIOS=S2 LOAD_MODES="$mode" LOAD_ROUNDS=1 LOAD_CLIENT_THREADS=1 \
        LOAD_WARMUP_SECS=0.5 LOAD_SECS="$secs" \
        timeout 600 valgrind --tool=callgrind --trace-children=no \
        --callgrind-out-file="$out/$tag.callgrind" "$bin/$name" --bench >"$out/$tag.log" 2>&1; then
        tail -n 20 "$out/$tag.log" >&2
        echo "metrics-instructions: $tag failed; log: $out/$tag.log" >&2
        exit 1
    fi
    count "$out/$tag.callgrind"
}

# Instructions per call of one mode: (I8 - I2) / (N8 - N2).
per_call() {
    local a b
    a=$(measure 2 "$@")
    b=$(measure 8 "$@")
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        if (y[2] <= x[2] || x[2] == 0) { print "no calls to Pool::call counted (inlined?)" > "/dev/stderr"; exit 1 }
        printf "%.0f %d\n", (y[1] - x[1]) / (y[2] - x[2]), y[2] - x[2]
    }'
}

off=$(per_call off pool1 LOAD_METRICS=0)
on=$(per_call on pool1 LOAD_METRICS=0)
rec=$(per_call on metrics1 LOAD_METRICS=1 LOAD_RECORDER="$RECORDER")
echo
echo "S2's client alone, one thread, instructions per call (callgrind; $out):"
echo
echo "| build | mode | instructions per call | calls counted | ratio to off |"
echo "|---|---|---|---|---|"
for row in "off|pool ×1|$off" "metrics|pool ×1 (no recorder)|$on" "metrics|pool+metrics ×1 ($RECORDER)|$rec"; do
    IFS='|' read -r build mode figures <<<"$row"
    read -r instr calls <<<"$figures"
    awk -v b="$build" -v m="$mode" -v i="$instr" -v c="$calls" -v o="${off%% *}" \
        'BEGIN { printf "| %s | %s | %d | %d | %.4f |\n", b, m, i, c, i / o }'
done
echo
echo "codegen units: ${CODEGEN_UNITS:-default (16)}; recorder: $RECORDER"
