#!/usr/bin/env bash
# Single-node Apache Cassandra 5.0 on loopback, run from Maven Central jars only
# (no docker, no apache.org tarball). See README.md next to this file.
#
# Usage: cassandra.sh fetch | start | wait [seconds] | stop | status | reset | logs [lines]
#                     | nodetool <args>
#                     | pair start | pair wait [seconds] | pair stop | pair status | pair reset
#
#   fetch          copy cassandra-all + its runtime jars into ./lib (skipped when already done)
#   start          write conf under the node dir and launch the daemon in the background
#   wait [secs]    block until a CQL handshake succeeds (default 180 s); on failure print the log tail
#   stop           SIGTERM (Cassandra drains), wait up to 60 s, then SIGKILL; fine if not running
#   status         print up/down; exit 0 only when the process is alive and answers CQL
#   reset          stop, then delete the node dir (data, commitlog, logs, conf)
#   logs [lines]   print the last lines of the node's log (default 100)
#   nodetool ...   run nodetool against the node (needs CASSANDRA_JMX_PORT at start)
#   pair ...       the same for two nodes of one cluster in two datacenters, dc1 on 127.0.0.2
#                  and dc2 on 127.0.0.3 (CQL port CASSANDRA_PORT on each), under
#                  CASSANDRA_PAIR_DIR/dc1 and /dc2; `pair wait` also waits until each node sees
#                  the other up. For a keyspace with NetworkTopologyStrategy {'dc1': 1, 'dc2': 1}.
#
# Environment (all optional):
#   CASSANDRA_HOST          listen + native (CQL) address          default 127.0.0.1
#   CASSANDRA_PORT          native (CQL) port                      default 9042
#   CASSANDRA_STORAGE_PORT  internode (gossip) port                default 7000
#   CASSANDRA_NODE_DIR      conf, data, logs, pid file             default <this dir>/node
#   CASSANDRA_HEAP          -Xms/-Xmx                              default 1G
#   CASSANDRA_JAVA          java binary (JDK 17 or 11)             default: auto-detected
#   CASSANDRA_JMX_PORT      enable local-only JMX (for nodetool)   default: JMX off
#   CASSANDRA_UNSAFE_SYSTEM true = no flush of schema tables on DDL default false
#                           (faster DDL, but schema is lost on a crash / SIGKILL)
#   CASSANDRA_MVN_ARGS      extra args for `mvn` in fetch, e.g. -Dmaven.repo.local=/tmp/m2
#   CASSANDRA_DC            this node's datacenter: GossipingPropertyFileSnitch, hints on
#                           default: unset (SimpleSnitch, "datacenter1")
#   CASSANDRA_SEEDS         seed list host:port,...                default \$HOST:\$STORAGE_PORT
#   CASSANDRA_CLUSTER       cluster name (nodes of one cluster share it) default saferchat-test
#   CASSANDRA_PAIR_DIR      base folder of `pair`                  default <this dir>/pair
#
# Two instances can run side by side when they differ in CASSANDRA_NODE_DIR and in ports
# (or use another loopback address, e.g. CASSANDRA_HOST=127.0.0.2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB_DIR="$HERE/lib"
FETCH_STAMP="$LIB_DIR/.fetched"          # holds the sha256 of the pom.xml the jars came from

HOST="${CASSANDRA_HOST:-127.0.0.1}"
CQL_PORT="${CASSANDRA_PORT:-9042}"
STORAGE_PORT="${CASSANDRA_STORAGE_PORT:-7000}"
HEAP="${CASSANDRA_HEAP:-1G}"
JMX_PORT="${CASSANDRA_JMX_PORT:-}"
UNSAFE_SYSTEM="${CASSANDRA_UNSAFE_SYSTEM:-false}"
DC="${CASSANDRA_DC:-}"
SEEDS="${CASSANDRA_SEEDS:-$HOST:$STORAGE_PORT}"
CLUSTER="${CASSANDRA_CLUSTER:-saferchat-test}"
PAIR_DIR="$(realpath -m "${CASSANDRA_PAIR_DIR:-$HERE/pair}")"
PAIR_HOSTS=(127.0.0.2 127.0.0.3)
PAIR_DCS=(dc1 dc2)
# cassandra.yaml and the -D paths need an absolute node dir (it need not exist yet)
NODE_DIR="$(realpath -m "${CASSANDRA_NODE_DIR:-$HERE/node}")"

PIDFILE="$NODE_DIR/cassandra.pid"
JMX_PORT_FILE="$NODE_DIR/jmx.port"      # written by start when CASSANDRA_JMX_PORT is set
LOG="$NODE_DIR/logs/cassandra.log"       # JVM stdout/stderr + logback console output

# JPMS exports/opens for JDK 17: conf/jvm17-server.options of the 5.0 tarball, plus a few extra
# opens for jamm's deep object measuring. Without them startup dies with InaccessibleObjectException
# (e.g. FileDescriptor.fd in NativeLibrary). nodetool needs the same set.
JPMS_OPTS=(
  -Djdk.attach.allowAttachSelf=true
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
  --add-exports java.management/com.sun.jmx.remote.security=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
  --add-exports java.sql/java.sql=ALL-UNNAMED
  --add-exports java.base/java.lang.ref=ALL-UNNAMED
  --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
  --add-opens java.base/java.lang.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
  --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
  --add-opens java.base/jdk.internal.math=ALL-UNNAMED
  --add-opens java.base/jdk.internal.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  --add-opens java.base/java.nio=ALL-UNNAMED
  --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
  --add-opens java.base/java.math=ALL-UNNAMED
  --add-opens java.base/java.net=ALL-UNNAMED
  --add-opens java.base/java.nio.charset=ALL-UNNAMED
  --add-opens java.base/java.time=ALL-UNNAMED
  --add-opens java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens java.base/java.util.concurrent.locks=ALL-UNNAMED
)

STOP_TIMEOUT=60                          # seconds between SIGTERM and SIGKILL

log() { echo "cassandra.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Last lines of the node log on stderr, each cut to 300 chars (the startup "Node configuration"
# line alone is ~12 kB).
log_tail() { [ -f "$LOG" ] && tail -n 60 "$LOG" | cut -c1-300 >&2; return 0; }

# ---------------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------------

pom_hash() { sha256sum "$HERE/pom.xml" | cut -d' ' -f1; }
jar_count() { find "$LIB_DIR" -maxdepth 1 -name '*.jar' | wc -l; }

fetch() {
  if [ -f "$FETCH_STAMP" ] && [ "$(cat "$FETCH_STAMP")" = "$(pom_hash)" ] \
     && compgen -G "$LIB_DIR/cassandra-all-*.jar" >/dev/null \
     && compgen -G "$LIB_DIR/jamm-*.jar" >/dev/null; then
    log "jars already in $LIB_DIR ($(jar_count) jars), skipping fetch"
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  # Copy into a scratch dir and swap it in at the end, so an interrupted fetch never leaves a
  # half-filled lib/ that the skip check above would take for complete.
  local tmp="$HERE/lib.tmp"
  rm -rf "$tmp"
  log "fetching cassandra-all and its runtime dependencies from Maven Central..."
  # Maven 3.8's -q still emits stray colour codes; keep its output and show it only on failure.
  local out
  out="$(mktemp)"
  # shellcheck disable=SC2086  # CASSANDRA_MVN_ARGS is a list of words on purpose
  if ! (cd "$HERE" && mvn -q -B ${CASSANDRA_MVN_ARGS:-} dependency:copy-dependencies \
          -DoutputDirectory="$tmp" -DincludeScope=runtime) >"$out" 2>&1; then
    cat "$out" >&2
    rm -f "$out"
    die "fetch: mvn dependency:copy-dependencies failed (output above)"
  fi
  rm -f "$out"
  compgen -G "$tmp/cassandra-all-*.jar" >/dev/null || die "fetch: no cassandra-all jar in $tmp"
  compgen -G "$tmp/jamm-*.jar" >/dev/null || die "fetch: no jamm jar in $tmp"
  pom_hash > "$tmp/.fetched"
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
  log "fetched $(jar_count) jars into $LIB_DIR ($(basename "$LIB_DIR"/cassandra-all-*.jar))"
}

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

java_major() { # prints the Java feature version of the binary in $1, e.g. 17
  "$1" -XshowSettings:properties -version 2>&1 \
    | awk -F'= ' '/java.specification.version/ {print $2; exit}'
}

# Cassandra 5.0 runs on JDK 11 or 17 only (newer JDKs fail on the Security Manager).
# The machine may carry another JDK as JAVA_HOME or first on PATH, so look for a fitting one.
find_java() {
  local c v
  if [ -n "${CASSANDRA_JAVA:-}" ] && [ ! -x "$CASSANDRA_JAVA" ]; then
    die "CASSANDRA_JAVA=$CASSANDRA_JAVA is not an executable"
  fi
  for c in "${CASSANDRA_JAVA:-}" "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" \
           /usr/lib/jvm/java-17-openjdk-*/bin/java /usr/lib/jvm/*17*/bin/java \
           /usr/lib/jvm/*11*/bin/java; do
    if [ -z "$c" ] || [ ! -x "$c" ]; then continue; fi
    v="$(java_major "$c")"
    if [ "$v" = 17 ] || [ "$v" = 11 ]; then echo "$c"; return 0; fi
    [ -n "${CASSANDRA_JAVA:-}" ] && [ "$c" = "$CASSANDRA_JAVA" ] \
      && die "CASSANDRA_JAVA=$c is Java $v; Cassandra 5.0 needs 17 (or 11)"
  done
  die "no JDK 17 (or 11) found; install openjdk-17-jre-headless or set CASSANDRA_JAVA"
}

# Pid from the pid file, printed only if that process is alive and is our Cassandra
# (guards against a stale pid file whose pid got reused by something else).
running_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "CassandraDaemon" || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$NODE_DIR/conf/" || return 1
  echo "$pid"
}

# True if something accepts TCP connections on $1:$2.
port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# Real CQL handshake: send a protocol-v4 OPTIONS frame, expect a SUPPORTED (opcode 0x06) reply
# from a response frame (version byte 0x84). A bare open port is not enough.
cql_ping() {
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$HOST" "$CQL_PORT" <<'PY'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.settimeout(3)
    # version 4 request, flags 0, stream 0, opcode OPTIONS (0x05), body length 0
    s.sendall(bytes([0x04, 0, 0, 0, 0x05, 0, 0, 0, 0]))
    hdr = b""
    while len(hdr) < 9:
        chunk = s.recv(9 - len(hdr))
        if not chunk:
            break
        hdr += chunk
    s.close()
    sys.exit(0 if len(hdr) == 9 and hdr[0] == 0x84 and hdr[4] == 0x06 else 1)
except OSError:
    sys.exit(1)
PY
  else
    # Same handshake in bash: fd 3 on /dev/tcp, read the 9-byte header back as hex.
    # shellcheck disable=SC2016  # the inner script gets host/port as $1/$2
    timeout 5 bash -c '
      exec 3<>"/dev/tcp/$1/$2" || exit 1
      printf "\x04\x00\x00\x00\x05\x00\x00\x00\x00" >&3
      hdr="$(head -c 9 <&3 | od -An -tx1 | tr -d " \n")"
      [ "${hdr:0:2}" = 84 ] && [ "${hdr:8:2}" = 06 ]' _ "$HOST" "$CQL_PORT" 2>/dev/null
  fi
}

# ---------------------------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------------------------

write_conf() {
  mkdir -p "$NODE_DIR"/{conf,data,commitlog,saved_caches,hints,cdc_raw,logs,tmp,triggers}
  # Regenerated on every start so env changes (ports, address) take effect. Unknown keys are
  # fatal in 5.0 ("Invalid yaml. Please remove properties"), so only add keys that Config knows.
  # One datacenter: SimpleSnitch ("datacenter1"). Several: each node names its own in
  # cassandra-rackdc.properties, and hints are kept for a peer that is down (a datacenter that
  # comes back gets the writes it missed, within max_hint_window).
  local snitch=SimpleSnitch hints=false
  if [ -n "$DC" ]; then
    snitch=GossipingPropertyFileSnitch
    hints=true
    printf 'dc=%s\nrack=rack1\n' "$DC" > "$NODE_DIR/conf/cassandra-rackdc.properties"
  fi
  cat > "$NODE_DIR/conf/cassandra.yaml" <<YAML
# Generated by deploy/cassandra/cassandra.sh - edits are overwritten on the next start.
cluster_name: '${CLUSTER}'
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: ${snitch}

listen_address: ${HOST}
rpc_address: ${HOST}
storage_port: ${STORAGE_PORT}
native_transport_port: ${CQL_PORT}
start_native_transport: true

seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "${SEEDS}"

authenticator:
  class_name: org.apache.cassandra.auth.AllowAllAuthenticator
authorizer:
  class_name: org.apache.cassandra.auth.AllowAllAuthorizer

data_file_directories:
  - ${NODE_DIR}/data
commitlog_directory: ${NODE_DIR}/commitlog
saved_caches_directory: ${NODE_DIR}/saved_caches
hints_directory: ${NODE_DIR}/hints
cdc_enabled: false
cdc_raw_directory: ${NODE_DIR}/cdc_raw

commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_disk_access_mode: legacy     # no direct I/O (tmpfs, Debian kernel-bug startup check)

# sized for a 2-core box with a ${HEAP} heap
memtable_allocation_type: heap_buffers
memtable_heap_space: 256MiB
memtable_offheap_space: 256MiB
memtable_flush_writers: 1
concurrent_compactors: 1
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8

# generous timeouts: GC pauses on a busy 2-core CI box trip the 2 s / 5 s defaults
read_request_timeout: 10000ms
range_request_timeout: 20000ms
write_request_timeout: 10000ms
counter_write_request_timeout: 10000ms
request_timeout: 20000ms

# nothing a throwaway node needs (hints only with datacenters, see above)
hinted_handoff_enabled: ${hints}
auto_snapshot: false
incremental_backups: false
snapshot_before_compaction: false
YAML

  # cassandra-all ships no logback.xml; without one logback logs DEBUG to the console.
  cat > "$NODE_DIR/conf/logback.xml" <<'XML'
<configuration scan="false">
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %logger{0} - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="STDOUT"/>
  </root>
</configuration>
XML
}

start() {
  local pid java jamm
  if pid="$(running_pid)"; then
    log "already running (pid $pid), log: $LOG"
    return 0
  fi
  rm -f "$PIDFILE"
  compgen -G "$LIB_DIR/cassandra-all-*.jar" >/dev/null || die "no jars in $LIB_DIR: run '$0 fetch' first"
  [ "$(cat "$FETCH_STAMP" 2>/dev/null)" = "$(pom_hash)" ] \
    || die "$LIB_DIR was fetched for another pom.xml: run '$0 fetch' again"
  java="$(find_java)"

  # Refuse to start next to something already bound to our ports: the JVM would die anyway,
  # and `wait` could otherwise handshake with the other server.
  local p
  for p in "$CQL_PORT" "$STORAGE_PORT" ${JMX_PORT:+"$JMX_PORT"}; do
    port_in_use "$HOST" "$p" && die "$HOST:$p is already in use (another Cassandra? see CASSANDRA_PORT / CASSANDRA_STORAGE_PORT / CASSANDRA_JMX_PORT)"
  done

  write_conf
  jamm="$(compgen -G "$LIB_DIR/jamm-*.jar" | head -n 1)"

  local JVM_OPTS=(
    -Xms"$HEAP" -Xmx"$HEAP"
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxGCPauseMillis=300
    -XX:+ExitOnOutOfMemoryError -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$NODE_DIR/logs"
    -XX:+PerfDisableSharedMem            # no hsperfdata mmap file in /tmp

    # jamm memory meter agent, as upstream's bin/cassandra adds it; without it jamm falls back
    # to Unsafe-based sizing (reported to crash some 4.x/5.0 builds on JDK 17)
    -javaagent:"$jamm"

    "${JPMS_OPTS[@]}"

    # --- Netty (jvm17-server.options) ---
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11

    # --- general (jvm-server.options) ---
    -Djava.net.preferIPv4Stack=true
    -Djava.security.manager=allow
    # native libs (JNA, snappy, zstd, netty-epoll) are unpacked here; /tmp may be noexec
    -Djava.io.tmpdir="$NODE_DIR/tmp"
    -Djna.tmpdir="$NODE_DIR/tmp"

    # --- Cassandra ---
    -Dcassandra-foreground=yes           # else the daemon closes stdout/stderr after startup
    -Dcassandra.config="file://$NODE_DIR/conf/cassandra.yaml"
    -Dcassandra-rackdc.properties="file://$NODE_DIR/conf/cassandra-rackdc.properties"
    -Dcassandra.storagedir="$NODE_DIR"
    -Dcassandra.logdir="$NODE_DIR/logs"
    -Dcassandra.triggers_dir="$NODE_DIR/triggers"
    -Dlogback.configurationFile="$NODE_DIR/conf/logback.xml"
    -Dcassandra.libjemalloc=-
    # test-speed knob: no gossip-settle wait (>= 5 s) on a single node
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.load_ring_state=false
    # stop: no 2 s pause to announce the shutdown to peers (there are none)
    -Dcassandra.shutdown_announce_in_ms=0
  )
  # Skipping the schema/system flush on every DDL makes DDL faster, but after a SIGKILL or crash
  # the schema changes made since the last flush are missing on restart and rows written to
  # those tables are dropped during commitlog replay. Off by default; see README.md.
  [ "$UNSAFE_SYSTEM" = true ] && JVM_OPTS+=(-Dcassandra.unsafesystem=true)
  # JMX stays off unless asked for (no connector is started when no port is set). The port is
  # remembered in the node dir for `nodetool`.
  rm -f "$JMX_PORT_FILE"
  if [ -n "$JMX_PORT" ]; then
    JVM_OPTS+=(-Dcassandra.jmx.local.port="$JMX_PORT")
    echo "$JMX_PORT" > "$JMX_PORT_FILE"
  fi

  echo "=== $(date -Is) cassandra.sh start ($HOST:$CQL_PORT, storage $STORAGE_PORT, heap $HEAP, datacenter ${DC:-datacenter1}, java $java)" >> "$LOG"
  # nohup execs java, so $! is the JVM's own pid. The log is appended to across restarts.
  nohup "$java" "${JVM_OPTS[@]}" -cp "$LIB_DIR/*" \
        org.apache.cassandra.service.CassandraDaemon >>"$LOG" 2>&1 </dev/null &
  echo $! > "$PIDFILE"
  log "started pid $! ($HOST:$CQL_PORT), log: $LOG"
}

# ---------------------------------------------------------------------------------------------
# wait / stop / status / reset
# ---------------------------------------------------------------------------------------------

wait_ready() {
  local timeout="${1:-180}" pid deadline
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "wait: seconds must be a number, got '$timeout'"
  pid="$(running_pid)" || { log "not running; last log lines:"; log_tail; return 1; }
  deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "Cassandra (pid $pid) exited during startup; last log lines:"
      log_tail
      return 1
    fi
    if cql_ping; then
      log "CQL ready on $HOST:$CQL_PORT (pid $pid)"
      return 0
    fi
    sleep 1
  done
  log "not ready after ${timeout}s; last log lines:"
  log_tail
  return 1
}

stop() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  # SIGTERM runs StorageServiceShutdownHook: drain = stop clients, flush memtables, close commitlog.
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 2; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

status() {
  local pid
  if ! pid="$(running_pid)"; then echo "down"; return 1; fi
  if cql_ping; then
    echo "up (pid $pid, CQL $HOST:$CQL_PORT)"
  else
    echo "starting (pid $pid, CQL $HOST:$CQL_PORT not answering yet)"
    return 1
  fi
}

reset() {
  stop
  # Guard the rm: only a folder that looks like ours (or an empty one) is deleted.
  if [ ! -e "$NODE_DIR" ]; then
    log "nothing to delete ($NODE_DIR does not exist)"
  elif [ -d "$NODE_DIR/conf" ] || [ -z "$(ls -A "$NODE_DIR")" ]; then
    rm -rf "${NODE_DIR:?}"
    log "deleted $NODE_DIR"
  else
    die "refusing to delete $NODE_DIR: it does not look like a node dir (no conf/)"
  fi
}

# nodetool over the local-only JMX port (start the node with CASSANDRA_JMX_PORT set).
nodetool() {
  local port java
  running_pid >/dev/null || die "not running"
  port="$(cat "$JMX_PORT_FILE" 2>/dev/null)" \
    || die "JMX is off: restart with CASSANDRA_JMX_PORT=7199 (any free port) to use nodetool"
  java="$(find_java)"
  # user.home: nodetool writes ~/.cassandra/nodetool.history; keep it in the node dir
  "$java" "${JPMS_OPTS[@]}" -Duser.home="$NODE_DIR" \
    -Dlogback.configurationFile="$NODE_DIR/conf/logback.xml" -cp "$LIB_DIR/*" \
    org.apache.cassandra.tools.NodeTool -h 127.0.0.1 -p "$port" "$@"
}

# ---------------------------------------------------------------------------------------------
# pair: one cluster, two datacenters, one node each
# ---------------------------------------------------------------------------------------------

# Runs this script's $1 for each node of the pair (stops at the first failure).
each_of_pair() {
  local i seeds
  seeds="${PAIR_HOSTS[0]}:$STORAGE_PORT,${PAIR_HOSTS[1]}:$STORAGE_PORT"
  for i in 0 1; do
    # Both nodes are seeds: neither bootstraps from the other, so they start side by side.
    CASSANDRA_HOST="${PAIR_HOSTS[$i]}" CASSANDRA_DC="${PAIR_DCS[$i]}" \
      CASSANDRA_NODE_DIR="$PAIR_DIR/${PAIR_DCS[$i]}" CASSANDRA_SEEDS="$seeds" \
      CASSANDRA_CLUSTER=saferchat-pair CASSANDRA_JMX_PORT= \
      bash "${BASH_SOURCE[0]}" "$@" || return 1
  done
}

# Waits until both nodes answer CQL and each has seen the other come up.
pair_wait() {
  local timeout="${1:-240}" deadline i other
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "pair wait: seconds must be a number, got '$timeout'"
  deadline=$((SECONDS + timeout))
  each_of_pair wait "$timeout" || return 1
  for i in 0 1; do
    other="${PAIR_HOSTS[$((1 - i))]}"
    until grep -q "/$other:$STORAGE_PORT is now UP" "$PAIR_DIR/${PAIR_DCS[$i]}/logs/cassandra.log"; do
      if ((SECONDS >= deadline)); then
        log "${PAIR_DCS[$i]} never saw $other come up; last log lines:"
        LOG="$PAIR_DIR/${PAIR_DCS[$i]}/logs/cassandra.log" log_tail
        return 1
      fi
      sleep 1
    done
  done
  log "pair ready: dc1 ${PAIR_HOSTS[0]}:$CQL_PORT, dc2 ${PAIR_HOSTS[1]}:$CQL_PORT"
}

pair() {
  case "${1:-}" in
    start)  each_of_pair start ;;
    wait)   pair_wait "${2:-240}" ;;
    stop)   each_of_pair stop ;;
    status) each_of_pair status ;;
    reset)  each_of_pair reset ;;
    *) echo "usage: $0 pair start | wait [seconds] | stop | status | reset" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  fetch)  fetch ;;
  start)  start ;;
  wait)   wait_ready "${2:-180}" ;;
  stop)   stop ;;
  status) status ;;
  reset)  reset ;;
  logs)   tail -n "${2:-100}" "$LOG" ;;
  nodetool) shift; nodetool "$@" ;;
  pair)   shift; pair "$@" ;;
  *) echo "usage: $0 fetch | start | wait [seconds] | stop | status | reset | logs [lines] | nodetool <args> | pair <start|wait|stop|status|reset>" >&2
     exit 2 ;;
esac
