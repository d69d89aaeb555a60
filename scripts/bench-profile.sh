#!/usr/bin/env bash
# Where the node's CPU time goes at saturation: starts a release node pinned
# to CPU 0, drives it with `saferchat-bench` (saturation phase, M=100 by
# default) and samples it with `perf record` (software cpu-clock event, so it
# works in VMs without hardware counters) during the measured window.
# Needs `perf` (Debian: apt-get install linux-perf). Output in
# target/bench-profile/: perf.data, report-flat.txt (self time by symbol),
# report-children.txt (inclusive, with DWARF call graphs), categories.md
# (every sample put in one component and one leaf kind), bench results.
#
#   scripts/bench-profile.sh [MEMBERS] [PERF_SECONDS]
#
# NO_BUILD=1 skips `cargo build`; NODE_BIN and BENCH_BIN choose other
# binaries than target/release/saferchat-node and saferchat-bench.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEMBERS=${1:-100}
SECONDS_PERF=${2:-10}
OUT=target/bench-profile
RT=()
if [ "${BENCH_RT:-1}" = 1 ]; then RT=(chrt -r 10); fi
mkdir -p "$OUT"
rm -rf "$OUT/data"
if [ -z "${NO_BUILD:-}" ]; then
    # The node alone first: built with the harness crate it would carry the
    # harness's test-only features (cargo unifies features per build).
    cargo build --release --locked -p saferchat-node
    cargo build --release --locked -p saferchat-tests --bin saferchat-bench
fi
NODE_BIN=${NODE_BIN:-target/release/saferchat-node}
BENCH_BIN=${BENCH_BIN:-target/release/saferchat-bench}
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SAFERCHAT_ADMIN_TOKEN=$TOKEN RUST_LOG=warn taskset -c 0 "${RT[@]}" \
    "$NODE_BIN" --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
    >"$OUT/node.log" 2>&1 &
NODE=$!
stop_node() {
    kill -TERM "$NODE" 2>/dev/null || true
    wait "$NODE" 2>/dev/null || true
    rm -rf "$OUT/data"   # the stored envelopes: ~1 GB at M=100
}
trap stop_node EXIT
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
# Saturation long enough to cover setup (join, sealing) plus the recording.
SAFERCHAT_ADMIN_TOKEN=$TOKEN "$BENCH_BIN" --server "127.0.0.1:$PORT" \
    --server-pid "$NODE" --members "$MEMBERS" --phases sat --sat-warmup 3 \
    --sat-duration $((SECONDS_PERF + 20)) --out "$OUT" --tag profile --keys-dir target/bench-keys \
    >"$OUT/bench.log" 2>&1 &
BENCH=$!
# Wait until the saturation window has started (the bench prints when
# sealing is done), then record.
for _ in $(seq 1 600); do
    grep -q "sealed" "$OUT/bench.log" 2>/dev/null && break
    sleep 0.1
done
sleep 6
perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$NODE" -o "$OUT/perf.data" \
    -- sleep "$SECONDS_PERF" 2>"$OUT/perf-record.log"
wait "$BENCH"
perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio --percent-limit 0.3 \
    -g none >"$OUT/report-flat.txt" 2>/dev/null
perf report -i "$OUT/perf.data" --children --sort symbol --stdio --percent-limit 2 \
    -g none >"$OUT/report-children.txt" 2>/dev/null
perf script -i "$OUT/perf.data" -F comm,tid,ip,sym,dso 2>/dev/null >"$OUT/script.txt"
python3 - "$OUT/script.txt" >"$OUT/categories.md" <<'PY'
import sys, collections, re
path = sys.argv[1]
samples = []
cur = None
for line in open(path, errors='replace'):
    if not line.strip():
        if cur: samples.append(cur); cur = None
        continue
    if not line.startswith('\t') and not line.startswith(' '):
        cur = {'comm': line.split()[0], 'frames': []}
        continue
    if cur is None: continue
    parts = line.strip().split(' ', 1)
    if len(parts) < 2: continue
    rest = parts[1]
    m = re.match(r'(.*) \(([^()]*)\)$', rest)
    sym, dso = (m.group(1), m.group(2)) if m else (rest, '')
    cur['frames'].append((sym, dso))
if cur: samples.append(cur)
n = len(samples)
def kernel(f): return 'kernel' in f[1]
leaf_kind = collections.Counter()
comp = collections.Counter()
SYSCALLS = [('sync_file_range','fsync/fdatasync'),('writev','send (writev/sendmsg)'),('sendmsg','send (writev/sendmsg)'),('sendto','send (writev/sendmsg)'),('recv','receive (recvfrom/read)'),('read','receive (recvfrom/read)'),
            ('epoll','epoll'),('futex','futex (thread wake-ups)'),('fsync','fsync/fdatasync'),('fdatasync','fsync/fdatasync'),('pwrite','file write (pwrite)'),('libc_write','file write (write)'),('write','write')]
def syscall_of(frames):
    if any('page_fault' in f[0] for f in frames):
        return 'page faults (fresh memory)'
    for sym, dso in frames:
        if 'kernel' in dso and sym.startswith('__x64_sys_'):
            name = sym[len('__x64_sys_'):]
            for k, label in SYSCALLS:
                if k in name: return label
            return name
    for sym, dso in frames:
        if 'kernel' not in dso:
            s = sym.lower()
            for k, name in SYSCALLS:
                if k in s: return name
            return 'other (%s)' % sym[:40]
    return 'kernel (no user frame: interrupts, scheduler)'
ALLOC = ('malloc','free','realloc','calloc','_int_','unlink_chunk','consolidate','cfree','tcache')
for s in samples:
    fr = s['frames']
    if not fr: continue
    leaf = fr[0]
    txt = '\n'.join(f[0] for f in fr)
    # leaf kind (self time)
    if kernel(leaf):
        k = 'kernel: ' + syscall_of(fr)
    else:
        ls = leaf[0]
        if any(a in ls for a in ALLOC) and '::' not in ls: k = 'allocator (malloc/free)'
        elif 'memmove' in ls or 'memcpy' in ls: k = 'memcpy/memmove'
        elif 'memcmp' in ls or 'bcmp' in ls: k = 'memcmp'
        elif 'sha2::' in ls or 'sha256' in ls or 'digest::' in ls: k = 'SHA-256'
        elif ls.startswith('bytes::') or '<bytes::' in ls: k = 'bytes (refcounts, clones)'
        elif 'h2::' in ls or 'hyper' in ls or 'http_body' in ls: k = 'h2/hyper'
        elif 'tokio::' in ls: k = 'tokio (channels, scheduler, timers)'
        elif 'prost::' in ls or 'encode' in ls: k = 'protobuf encode/decode'
        elif 'sled' in ls: k = 'sled'
        elif 'saferchat' in ls: k = 'saferchat code'
        else: k = 'other: ' + ls[:60]
    leaf_kind[k] += 1
    # component (inclusive, first matching rule)
    if s['comm'].startswith('sled'):
        c = 'sled background threads (sled-io: log writes, fsync)'
    elif 'sled::' in txt or 'group_commit' in txt or 'storage::sled' in txt:
        c = 'storage: sled append + flush (tokio side)'
    elif 'Fanout::sealed_for' in txt or 'sealed_for_recipient' in txt:
        c = 'per-recipient Sealed (Merkle audit path + protobuf encode + copy)'
    elif 'Fanout::new' in txt or 'key_tree' in txt:
        c = 'per-message fan-out prep (Merkle tree, shared encoding)'
    elif 'Envelope::decode' in txt or 'check_membership' in txt:
        c = 'envelope decode + membership check'
    elif 'tonic::codec::encode' in txt or 'EncodeBody' in txt:
        c = 'tonic/prost: encode outgoing frames'
    elif 'tonic::codec::decode' in txt or 'Streaming' in txt and 'decode' in txt:
        c = 'tonic/prost: decode incoming frames'
    elif 'h2::' in txt or 'hyper::' in txt:
        c = 'HTTP/2 (h2/hyper): framing, flow control, socket I/O'
    elif 'room::actor' in txt:
        c = 'room actor (queueing to sessions, acks)'
    elif 'grpc::session' in txt:
        c = 'session tasks (batching deliveries, channel ops)'
    elif 'tokio::runtime' in txt:
        c = 'tokio runtime (scheduling, timers, I/O driver)'
    elif all(kernel(f) for f in fr):
        c = 'kernel only (interrupts, scheduler, softirq)'
    else:
        c = 'other'
    comp[c] += 1
print('samples: %d' % n)
print('\n| component (inclusive, each sample counted once) | share |\n|---|---|')
for k, v in comp.most_common(): print('| %s | %.1f%% |' % (k, 100.0*v/n))
print('\n| leaf kind (self time) | share |\n|---|---|')
for k, v in leaf_kind.most_common(18): print('| %s | %.1f%% |' % (k, 100.0*v/n))
PY
cat "$OUT/bench.log"
cat "$OUT/categories.md"
echo "profile: $OUT/categories.md, $OUT/report-flat.txt, $OUT/report-children.txt"
