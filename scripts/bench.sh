#!/usr/bin/env bash
# Single-node benchmark (issue 2): builds the node and the load generator in
# release mode, then runs `saferchat-bench` with the given arguments. The
# tool starts a fresh node per run pinned to CPU 0 (taskset, chrt -r 10
# unless BENCH_RT=0), pins itself to CPU 1, and writes JSON results and a
# Markdown report to target/bench-results/. Examples:
#
#   scripts/bench.sh                                  # M=10 and M=100, 1 rep, all phases
#   scripts/bench.sh --members 10,100 --reps 3        # as in BENCHMARKS.md
#   scripts/bench.sh --members 100 --phases sat       # one phase
#   scripts/bench.sh --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The node alone first: built with the harness crate it would carry the
# harness's test-only features (cargo unifies features per build).
cargo build --release --locked -p saferchat-node
cargo build --release --locked -p saferchat-tests --bin saferchat-bench
exec target/release/saferchat-bench "$@"
