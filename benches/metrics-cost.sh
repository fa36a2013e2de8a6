#!/usr/bin/env bash
# What the `metrics` feature costs per call: S2's client CPU per request with the feature off,
# on without a recorder, and on with a Prometheus recorder, in one run (issue 13's bar:
# on + recorder ≤ 1.03× off, median of the per-round ratios).
#
# The feature is a compile-time switch, so "off" and "on" are two binaries of the load bench:
# this script builds both, then runs them round by round, one S2 round per invocation, in
# alternating order (round 1: off, on; round 2: on, off; …; the on binary itself runs its two
# modes forward on odd rounds and reversed on even ones, so within a round the order is
# off, on, on+recorder, then on+recorder, on, off). Every run appends to one CSV
# (`LOAD_CSV`), from which the summary at the end is computed: per mode the median (min–max)
# of client CPU per request and req/s, and the paired per-round ratios.
#
# Two binaries differ in more than the feature: their code lands at other addresses, and on
# this kind of machine that alone moves CPU per call by a few per cent either way (a fixed
# bias per pair of binaries, which more rounds cannot average out). LAYOUTS=K builds each
# binary K times, its functions in a different order each time (LLD's --shuffle-sections,
# seeds 1..K), and round r runs layout ((r - 1) mod K) + 1 of both: the ratios then sample
# the layouts too, and the summary shows each layout's ratio beside the whole's.
#
#   bash benches/metrics-cost.sh                       # 30 rounds: ~5 minutes, plus two builds
#   LAYOUTS=6 ROUNDS=120 LOAD_SECS=1 LOAD_WARMUP_SECS=0.3 bash benches/metrics-cost.sh
#   ROUNDS=3 LOAD_SECS=1 bash benches/metrics-cost.sh  # a check that it works
#   SUMMARIZE="a/rounds.csv b/rounds.csv" bash benches/metrics-cost.sh  # runs pooled, no build
#
# Settings (environment): ROUNDS (30), LAYOUTS (1: the linker's own order, no shuffling),
# RECORDER (summary: the Prometheus exporter's default, quantile sketches; a66: the exporter
# with Prometheus histograms in gRFC A66's buckets; metrics-prometheus: the metrics-prometheus
# crate's recorder, A66's buckets counted where a sample is recorded — the load bench's
# LOAD_RECORDER, see benches/load/recorder.rs),
# CODEGEN_UNITS (unset: the bench profile's own, 16; a number builds every crate of both
# binaries with that many codegen units, in a target directory of its own under the default
# one unless CARGO_TARGET_DIR is set: with 16, which functions the compiler inlines into which
# — h2's and tonic's included — changes whenever the crate's code changes, by ±0.6 % of the
# client's instructions per call between two builds; with 1 it does not; RESULTS.md section 28),
# LOAD_SECS (2), LOAD_WARMUP_SECS (0.5), LOAD_CLIENT_THREADS (the bench's default when unset),
# OUT_DIR (where the CSV and the runs' logs go; default <cargo target dir>/metrics-cost/<UTC
# time>).
# SUMMARIZE (a space-separated list of CSVs of earlier runs: builds and runs nothing, prints
# the summary of all their rounds together — each file's rounds paired within that file —
# for runs of one setting whose single intervals are too wide to decide the bar; LAYOUTS
# then only groups the per-layout lines).
# Exit status: non-zero if a build or a bench run fails (not when the bar does not hold).
set -euo pipefail

ROUNDS=${ROUNDS:-30}
LAYOUTS=${LAYOUTS:-1}
RECORDER=${RECORDER:-summary}
LOAD_SECS=${LOAD_SECS:-2}
LOAD_WARMUP_SECS=${LOAD_WARMUP_SECS:-0.5}
# The bar: on + recorder / off, median of the per-round client CPU ratios.
BAR=1.03
# A round where other processes used more than this many cores was disturbed.
BUSY_CORES=0.2

fail() {
    echo "metrics-cost: $*" >&2
    exit 1
}

[[ $ROUNDS =~ ^[1-9][0-9]{0,3}$ ]] || fail "ROUNDS=$ROUNDS: expected 1 to 9999"
[[ $LAYOUTS =~ ^[1-9][0-9]?$ ]] || fail "LAYOUTS=$LAYOUTS: expected 1 to 99"
[[ $RECORDER == summary || $RECORDER == a66 || $RECORDER == metrics-prometheus ]] ||
    fail "RECORDER=$RECORDER: expected summary, a66 or metrics-prometheus"
for v in LOAD_SECS LOAD_WARMUP_SECS; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail "$v=${!v}: expected seconds, e.g. 2 or 0.5"
done
if [[ -n ${LOAD_CLIENT_THREADS:-} ]]; then
    [[ $LOAD_CLIENT_THREADS =~ ^[1-9][0-9]{0,2}$ ]] ||
        fail "LOAD_CLIENT_THREADS=$LOAD_CLIENT_THREADS: expected 1 to 999"
    export LOAD_CLIENT_THREADS
fi
export LOAD_SECS LOAD_WARMUP_SECS
# Settings of the bench that would change what the two binaries run: the script sets its own.
unset LOAD_POOL_SIZES LOAD_SCENARIOS LOAD_MODES LOAD_METRICS LOAD_ROUNDS LOAD_FIRST_ROUND LOAD_CSV LOAD_RECORDER

if [[ -n ${CODEGEN_UNITS:-} ]]; then
    [[ $CODEGEN_UNITS =~ ^[1-9][0-9]{0,2}$ ]] || fail "CODEGEN_UNITS=$CODEGEN_UNITS: expected 1 to 999"
    export CARGO_PROFILE_BENCH_CODEGEN_UNITS=$CODEGEN_UNITS
    # Its own target directory: switching back and forth would rebuild every dependency.
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/codegen-units-$CODEGEN_UNITS}
fi

SUMMARIZE=${SUMMARIZE:-}
for f in $SUMMARIZE; do
    [[ -f $f ]] || fail "SUMMARIZE: $f is not a file"
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/load-exe.sh
source benches/load-exe.sh
stamp=$(date -u +%Y%m%dT%H%M%SZ)
if [[ -z $SUMMARIZE ]]; then
out=${OUT_DIR:-${CARGO_TARGET_DIR:-target}/metrics-cost/$stamp}
mkdir -p "$out"
out=$(cd "$out" && pwd)
csv=$out/rounds.csv
[[ ! -e $csv ]] || fail "$csv exists: give a new OUT_DIR"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT

# Builds the load bench with the given cargo arguments and copies its binary to $bin/$1, so
# that the next build cannot overwrite it. The path comes from cargo's JSON messages: the
# compiler artifact of the bench target `load`. With a seed ($2 non-empty), the bench target
# is linked with its functions shuffled (`cargo rustc`: the flag reaches that target's link
# only, so the dependencies are not rebuilt).
build() {
    local name=$1 seed=$2
    shift 2
    local cmd json exe
    if [[ -n $seed ]]; then
        cmd=(cargo rustc --profile bench --bench load "$@" --message-format=json --
            -C "link-arg=-Wl,--shuffle-sections=.text*=$seed")
    else
        cmd=(cargo bench --bench load "$@" --no-run --message-format=json)
    fi
    echo "building the load bench ($name): ${cmd[*]}" >&2
    json=$("${cmd[@]}") || fail "${cmd[*]} failed (shuffling needs the LLD linker)"
    exe=$(printf '%s\n' "$json" | load_exe) || true
    [[ -n $exe && -x $exe ]] || fail "no executable for the bench target load in cargo's output"
    cp "$exe" "$bin/$name"
}

if ((LAYOUTS == 1)); then
    build off-1 ''
    build on-1 '' --features metrics
else
    # All layouts of one build before the other's: switching the feature rebuilds some
    # dependencies, so this switches once.
    for ((layout = 1; layout <= LAYOUTS; layout++)); do
        build "off-$layout" "$layout"
    done
    for ((layout = 1; layout <= LAYOUTS; layout++)); do
        build "on-$layout" "$layout" --features metrics
    done
fi

# Each invocation runs at most two modes: per mode the server start, Ready connections (10 s
# bound each), the warm-up, the window and a pause; generous, but bounded.
limit=$(awk -v s="$LOAD_SECS" -v w="$LOAD_WARMUP_SECS" 'BEGIN { printf "%d", 60 + 3 * (s + w) }')

# Runs one round of S2 with binary $1 as round $2 (odd: forward, even: reversed); the rest
# of the arguments are the bench's settings. Its output goes to a log; on failure the log's
# end is shown and the script stops.
run() {
    local name=$1 round=$2
    shift 2
    local log=$out/round-$round-$name.log
    if ! env "$@" LOAD_SCENARIOS=S2 LOAD_ROUNDS=1 LOAD_FIRST_ROUND="$round" LOAD_CSV="$csv" \
        timeout "$limit" "$bin/$name" --bench >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        fail "round $round, binary $name: the bench failed (or ran over ${limit} s); log: $log"
    fi
}
# Round r's layout: ((r - 1) mod LAYOUTS) + 1.
run_off() { run "off-$(((($1 - 1) % LAYOUTS) + 1))" "$1" LOAD_MODES=pool1 LOAD_METRICS=0; }
run_on() { run "on-$(((($1 - 1) % LAYOUTS) + 1))" "$1" LOAD_MODES=pool1,metrics1 LOAD_METRICS=1 LOAD_RECORDER="$RECORDER"; }

echo "output: $out" >&2
start=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2 == 1)); then
        run_off "$round"
        run_on "$round"
    else
        run_on "$round"
        run_off "$round"
    fi
    awk -F, -v r="$round" -v total="$ROUNDS" '
        NR > 1 && $3 == r {
            name = $8 !~ /metrics/ ? "off" : ($2 ~ /metrics/ ? "on+recorder" : "on")
            line = line sprintf("  %s %.1f µs/req %.0f req/s", name, $5, $4)
            if ($7 > other) other = $7
        }
        END { printf "round %d/%d:%s; other processes ≤ %.2f cores\n", r, total, line, other }
    ' "$csv" >&2
done
elapsed=$(($(date +%s) - start))
fi

# The summary. Modes: `off` = feature off (`pool ×1` of the build without `metrics`), `on` =
# feature on without a recorder (`pool ×1` of the build with it), `on+recorder` =
# `pool+metrics ×1`. Ratios are paired: per round, then their median (min–max).
# With SUMMARIZE, the CSVs named there instead of this run's; a round is keyed by its file
# and its number, so rounds pair within their own run.
if [[ -n $SUMMARIZE ]]; then
    read -r -a files <<<"$SUMMARIZE"
    title="pooled from ${#files[@]} CSV(s): $SUMMARIZE"
else
    files=("$csv")
    title="$ROUNDS round(s) × ($LOAD_WARMUP_SECS s warm-up + $LOAD_SECS s measured) per mode, $LAYOUTS layout(s), recorder: $RECORDER, codegen units: ${CODEGEN_UNITS:-default (16)}; the rounds took $elapsed s; CSV: $csv"
fi
awk -F, -v bar="$BAR" -v busy="$BUSY_CORES" -v title="$title" -v layouts="$LAYOUTS" '
    function sort(a, n,    i, j, t) {
        for (i = 2; i <= n; i++) {
            t = a[i]
            for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
            a[j + 1] = t
        }
    }
    # Median, min and max of a[1..n] (sorts a), as "median (min–max)" with format f.
    function stats(a, n, f,    m) {
        if (n == 0) return "—"
        sort(a, n)
        m = n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        median = m
        return sprintf(f " (" f "–" f ")", m, a[1], a[n])
    }
    # The 90 % bootstrap interval of the median of a[1..n] (sorted): 4 000 resamples, each
    # drawn as counts per index, its median found by walking the counts. Sets lo and hi.
    function bootstrap(a, n,    b, i, k, c, m1, m2, p1, p2, walked, meds) {
        srand(13)
        # The median of each resample is the mean of its p1-th and p2-th smallest (one element
        # when n is odd).
        p1 = int((n + 1) / 2)
        p2 = int(n / 2) + 1
        for (b = 1; b <= 4000; b++) {
            for (i = 1; i <= n; i++) c[i] = 0
            for (k = 1; k <= n; k++) c[int(rand() * n) + 1]++
            walked = 0
            m1 = m2 = ""
            for (i = 1; i <= n && m2 == ""; i++) {
                walked += c[i]
                if (m1 == "" && walked >= p1) m1 = a[i]
                if (walked >= p2) m2 = a[i]
            }
            meds[b] = (m1 + m2) / 2
        }
        sort(meds, 4000)
        lo = meds[200]
        hi = meds[3801]
    }
    FNR == 1 { file++; next }
    {
        name = $8 !~ /metrics/ ? "off" : ($2 ~ /metrics/ ? "on+recorder" : "on")
        key = file * 100000 + $3
        number[key] = $3
        cpu[name, key] = $5 + 0
        rps[name, key] = $4 + 0
        seen[name, key] = 1
        if ($7 > busy) disturbed[key] = 1
        rounds_seen[key] = 1
    }
    END {
        split("off on on+recorder", names, " ")
        rounds = 0
        for (r in rounds_seen) rounds++
        printf "\nS2, pool ×1: %s\n\n", title
        print "| mode | client CPU µs/req median (min–max) | req/s median (min–max) |"
        print "|---|---|---|"
        for (k = 1; k <= 3; k++) {
            n = 0
            for (r in rounds_seen) if ((names[k], r) in seen) { n++; c[n] = cpu[names[k], r] + 0; q[n] = rps[names[k], r] + 0 }
            cs = stats(c, n, "%.2f"); med_cpu[names[k]] = median
            qs = stats(q, n, "%.0f")
            label = names[k] == "off" ? "feature off" : (names[k] == "on" ? "feature on, no recorder" : "feature on + Prometheus recorder")
            printf "| %s | %s | %s |\n", label, cs, qs
        }
        print "\nPaired per-round client CPU ratios:\n"
        print "| ratio | median of per-round ratios (min–max) | 90 % bootstrap interval of that median | ratio of the medians | rounds |"
        print "|---|---|---|---|---|"
        split("on+recorder/off on/off on+recorder/on", pairs, " ")
        for (k = 1; k <= 3; k++) {
            split(pairs[k], ab, "/")
            n = 0
            for (r in rounds_seen)
                if ((ab[1], r) in seen && (ab[2], r) in seen && cpu[ab[2], r] > 0) { n++; x[n] = cpu[ab[1], r] / cpu[ab[2], r] }
            s = stats(x, n, "%.3f")
            ratio[pairs[k]] = n ? median : ""
            interval = "—"
            if (n > 1) { bootstrap(x, n); interval = sprintf("%.3f–%.3f", lo, hi) }
            printf "| %s | %s | %s | %.3f | %d |\n", pairs[k], s, interval, med_cpu[ab[2]] ? med_cpu[ab[1]] / med_cpu[ab[2]] : 0, n
        }
        if (layouts > 1) {
            printf "\nPer layout (round r runs layout ((r - 1) mod %d) + 1 of both binaries), on+recorder/off:\n\n", layouts
            print "| layout | median of per-round ratios (min–max) | rounds |"
            print "|---|---|---|"
            for (l = 1; l <= layouts; l++) {
                n = 0
                for (r in rounds_seen)
                    if ((number[r] - 1) % layouts + 1 == l && ("on+recorder", r) in seen && ("off", r) in seen && cpu["off", r] > 0) { n++; x[n] = cpu["on+recorder", r] / cpu["off", r] }
                printf "| %d | %s | %d |\n", l, stats(x, n, "%.3f"), n
            }
        }
        nd = 0
        for (r in disturbed) nd++
        printf "\nRounds where other processes used > %s cores: %d of %d\n", busy, nd, rounds
        if (ratio["on+recorder/off"] == "") { print "Bar: no paired rounds"; exit }
        printf "Bar: feature on + recorder / feature off, client CPU per call ≤ %s× (median of per-round ratios): %.3f× — %s\n", \
            bar, ratio["on+recorder/off"], ratio["on+recorder/off"] <= bar ? "holds" : "does not hold"
    }
' "${files[@]}"
