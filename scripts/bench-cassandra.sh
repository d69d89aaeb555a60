#!/usr/bin/env bash
# The single-node benchmark with the timeline in Cassandra (issue 4): starts
# one Cassandra node (deploy/cassandra/cassandra.sh, unpinned, normal
# priority), a release node on it pinned to CPU 0, and runs `saferchat-bench`
# against that node with the given arguments (default: M=10 and M=100, every
# phase but idle). The tool's "other cpu" column is then mostly Cassandra;
# this script also prints Cassandra's own CPU seconds over the whole run.
#
#   scripts/bench-cassandra.sh [saferchat-bench args…]
#
# Results in target/bench-cassandra/; the Cassandra node's data and log in
# target/bench-cassandra/cassandra (deleted at the start of every run).
# NO_BUILD=1 skips `cargo build`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=target/bench-cassandra
RT=()
if [ "${BENCH_RT:-1}" = 1 ]; then RT=(chrt -r 10); fi
if [ -z "${NO_BUILD:-}" ]; then
    # The node alone first: built with the harness crate it would carry the
    # harness's test-only features (cargo unifies features per build).
    cargo build --release --locked -p saferchat-node
    cargo build --release --locked -p saferchat-tests --bin saferchat-bench
fi
export CASSANDRA_NODE_DIR="$PWD/$OUT/cassandra"
export CASSANDRA_PORT=${CASSANDRA_PORT:-19043} CASSANDRA_STORAGE_PORT=${CASSANDRA_STORAGE_PORT:-17001}
export CASSANDRA_JMX_PORT=${CASSANDRA_JMX_PORT:-17199} CASSANDRA_HEAP=${CASSANDRA_HEAP:-2G}
rm -rf "$OUT"
mkdir -p "$OUT"
bash deploy/cassandra/cassandra.sh fetch
bash deploy/cassandra/cassandra.sh start
NODE=
stop_all() {
    if [ -n "$NODE" ]; then kill -TERM "$NODE" 2>/dev/null || true; wait "$NODE" 2>/dev/null || true; fi
    bash deploy/cassandra/cassandra.sh stop || true
}
trap stop_all EXIT
bash deploy/cassandra/cassandra.sh wait 240
CASSANDRA_PID=$(cat "$CASSANDRA_NODE_DIR/cassandra.pid")
cpu_s() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }

TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SAFERCHAT_STORAGE=cassandra SAFERCHAT_CASSANDRA_CONTACT_POINTS="127.0.0.1:$CASSANDRA_PORT" \
SAFERCHAT_CASSANDRA_KEYSPACE=saferchat_bench SAFERCHAT_ADMIN_TOKEN=$TOKEN RUST_LOG=warn \
    taskset -c 0 "${RT[@]}" target/release/saferchat-node --data-dir "$OUT/node" \
    --listen "127.0.0.1:$PORT" >"$OUT/node.log" 2>&1 &
NODE=$!
for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    sleep 0.2   # polling a port that is not open yet; not test synchronisation
done
BEFORE=$(cpu_s "$CASSANDRA_PID")
T0=$(date +%s.%N)
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then ARGS=(--members 10,100 --phases rooms,rate,sat,half); fi
SAFERCHAT_ADMIN_TOKEN=$TOKEN target/release/saferchat-bench --server "127.0.0.1:$PORT" \
    --server-pid "$NODE" --out "$OUT" --work-dir "$OUT/work" "${ARGS[@]}"
AFTER=$(cpu_s "$CASSANDRA_PID")
T1=$(date +%s.%N)
python3 -c "b, a, t0, t1 = $BEFORE, $AFTER, $T0, $T1
print(f'Cassandra CPU over the run: {a - b:.1f} s in {t1 - t0:.1f} s = {(a - b) / (t1 - t0):.2f} cores')" \
    | tee "$OUT/cassandra-cpu.txt"
