#!/usr/bin/env bash
# Runs a saferchat cluster on this machine, on loopback.
#
#   deploy/local-cluster.sh start --nodes N [--datacenters D] [--web] --dir DIR
#   deploy/local-cluster.sh join --id ID [--datacenter DC] --dir DIR
#   deploy/local-cluster.sh stop --dir DIR
#
# start: creates DIR, a cluster CA and node certificates (DIR/tls), a shared
# admin token (DIR/admin.token, mode 0600) and session secret, picks free
# loopback ports, starts N nodes (node i in datacenter dc((i-1) mod D + 1)),
# each with its data in DIR/nI and its log in DIR/nI.log (started afresh
# each time), waits until every
# node serves, and prints one line per node:
#
#   node ID dc DC client HOST:PORT
#
# With --web, every node also serves the browser page and grpc-web on a
# web listener of its own, and each line ends with `web http://HOST:PORT`.
#
# join: adds node ID (datacenter DC, dc1 unless given) to the running
# cluster in DIR: a certificate from DIR's cluster CA, `saferchat cluster
# add-node` through node 1, then the node started with --join (it holds no
# replica slot; it serves clients by handing them to the rooms' owners).
# Prints its line like start does.
#
# stop: SIGTERM to every node started in DIR, SIGKILL after 30 s.
#
# The node binary: $SAFERCHAT_NODE_BIN, else target/release/saferchat-node,
# else target/debug/saferchat-node, else it is built (cargo build --release).
# The CLI (join only) likewise: $SAFERCHAT_CLI_BIN, else target/…/saferchat.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "local-cluster: $*" >&2; exit 2; }
usage() {
  sed -n '4,6p' "${BASH_SOURCE[0]}" | sed 's/^# //' >&2
  exit 2
}

# A binary: $ENV_VAR if set, else target/release/NAME, else
# target/debug/NAME, else built (cargo build --release -p PACKAGE).
bin_of() {
  local name="$1" package="$2" var="$3"
  if [ -n "${!var:-}" ]; then
    [ -x "${!var}" ] || die "$var=${!var} is not executable"
    echo "${!var}"
  elif [ -x "$ROOT/target/release/$name" ]; then
    echo "$ROOT/target/release/$name"
  elif [ -x "$ROOT/target/debug/$name" ]; then
    echo "$ROOT/target/debug/$name"
  else
    echo "local-cluster: building $name (release)…" >&2
    (cd "$ROOT" && cargo build --release --quiet -p "$package") >&2
    echo "$ROOT/target/release/$name"
  fi
}
node_bin() { bin_of saferchat-node saferchat-node SAFERCHAT_NODE_BIN; }
cli_bin() { bin_of saferchat saferchat-client SAFERCHAT_CLI_BIN; }

# Waits until node ID in DIR serves (or exited, or the deadline passed).
wait_serving() {
  local dir="$1" i="$2" deadline="$3"
  until grep -q "saferchat node serving" "$dir/n$i.log" 2>/dev/null; do
    if ! kill -0 "$(cat "$dir/n$i.pid")" 2>/dev/null; then
      echo "local-cluster: node $i exited; its log ($dir/n$i.log):" >&2
      tail -20 "$dir/n$i.log" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "local-cluster: node $i did not start in time; see $dir/n$i.log" >&2
      return 1
    fi
    sleep 0.2
  done
}

# COUNT distinct free loopback ports, all bound at once so none repeats.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

start() {
  local nodes="" dcs=1 dir="" web=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes|--datacenters|--dir) [ $# -ge 2 ] || die "$1 needs a value" ;;&
      --web) web=1; shift ;;
      --nodes) nodes="$2"; shift 2 ;;
      --datacenters) dcs="$2"; shift 2 ;;
      --dir) dir="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  [ -n "$dir" ] || usage
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number"
  [[ "$dcs" =~ ^[1-9][0-9]*$ ]] || die "--datacenters must be a positive number"
  [ "$dcs" -le "$nodes" ] || die "more datacenters than nodes"
  if compgen -G "$dir/n*.pid" >/dev/null; then
    die "$dir already has a cluster; stop it first (or use another --dir)"
  fi
  local bin; bin="$(node_bin)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  umask 077

  local ports; read -r -a ports <<<"$(free_ports $(((2 + web) * nodes)))"
  local i dc certs=()
  for i in $(seq 1 "$nodes"); do
    certs+=(--node "$i:dc$(( (i - 1) % dcs + 1 ))")
  done
  "$bin" certs --dir "$dir/tls" "${certs[@]}" >/dev/null
  [ -s "$dir/admin.token" ] || random_hex >"$dir/admin.token"
  [ -s "$dir/session.secret" ] || random_hex >"$dir/session.secret"

  for i in $(seq 1 "$nodes"); do
    local client="${ports[$((i - 1))]}" peer="${ports[$((nodes + i - 1))]}" peers="" j
    for j in $(seq 1 "$nodes"); do
      [ "$j" = "$i" ] && continue
      peers="${peers:+$peers,}$j=127.0.0.1:${ports[$((nodes + j - 1))]}/127.0.0.1:${ports[$((j - 1))]}@dc$(( (j - 1) % dcs + 1 ))"
    done
    dc="dc$(( (i - 1) % dcs + 1 ))"
    local web_info="" extra=()
    if [ "$web" = 1 ]; then
      extra=(SAFERCHAT_WEB_LISTEN="127.0.0.1:${ports[$((2 * nodes + i - 1))]}")
      web_info=" web http://127.0.0.1:${ports[$((2 * nodes + i - 1))]}"
    fi
    SAFERCHAT_NODE_ID="$i" \
    SAFERCHAT_DATACENTER="$dc" \
    SAFERCHAT_LISTEN="127.0.0.1:$client" \
    SAFERCHAT_PEER_LISTEN="127.0.0.1:$peer" \
    SAFERCHAT_PEERS="$peers" \
    SAFERCHAT_PEER_TLS_DIR="$dir/tls" \
    SAFERCHAT_DATA_DIR="$dir/n$i" \
    SAFERCHAT_ADMIN_TOKEN="$(cat "$dir/admin.token")" \
    SAFERCHAT_SESSION_SECRET="$(cat "$dir/session.secret")" \
      nohup env ${extra[@]+"${extra[@]}"} "$bin" </dev/null >"$dir/n$i.log" 2>&1 &
    echo $! >"$dir/n$i.pid"
    echo "$i $dc 127.0.0.1:$client$web_info" >"$dir/n$i.info"
  done

  local deadline=$((SECONDS + ${LOCAL_CLUSTER_START_TIMEOUT_S:-60}))
  for i in $(seq 1 "$nodes"); do
    wait_serving "$dir" "$i" "$deadline" || { stop --dir "$dir"; exit 1; }
  done
  for i in $(seq 1 "$nodes"); do
    read -r id dc client rest <"$dir/n$i.info"
    echo "node $id dc $dc client $client${rest:+ $rest}"
  done
}

join() {
  local id="" dc="dc1" dir=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --id|--datacenter|--dir) [ $# -ge 2 ] || die "$1 needs a value" ;;&
      --id) id="$2"; shift 2 ;;
      --datacenter) dc="$2"; shift 2 ;;
      --dir) dir="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  [ -n "$dir" ] || usage
  [[ "$id" =~ ^[1-9][0-9]*$ ]] || die "--id must be a positive number"
  [ -s "$dir/n1.info" ] || die "$dir has no cluster (start one first)"
  [ ! -e "$dir/n$id.pid" ] || die "node $id already runs in $dir"
  dir="$(cd "$dir" && pwd)"
  umask 077
  local bin cli; bin="$(node_bin)"; cli="$(cli_bin)"
  local ports; read -r -a ports <<<"$(free_ports 2)"
  local client="${ports[0]}" peer="${ports[1]}" first
  read -r _ _ first _ <"$dir/n1.info"
  "$bin" certs --dir "$dir/tls" --node "$id:$dc" >/dev/null
  SAFERCHAT_ADMIN_TOKEN_FILE="$dir/admin.token" "$cli" --server "$first" cluster add-node "$id" \
    --datacenter "$dc" --peer-address "127.0.0.1:$peer" --client-address "127.0.0.1:$client" >&2
  SAFERCHAT_NODE_ID="$id" \
  SAFERCHAT_DATACENTER="$dc" \
  SAFERCHAT_LISTEN="127.0.0.1:$client" \
  SAFERCHAT_PEER_LISTEN="127.0.0.1:$peer" \
  SAFERCHAT_JOIN=true \
  SAFERCHAT_PEER_TLS_DIR="$dir/tls" \
  SAFERCHAT_DATA_DIR="$dir/n$id" \
  SAFERCHAT_ADMIN_TOKEN="$(cat "$dir/admin.token")" \
  SAFERCHAT_SESSION_SECRET="$(cat "$dir/session.secret")" \
    nohup "$bin" </dev/null >"$dir/n$id.log" 2>&1 &
  echo $! >"$dir/n$id.pid"
  echo "$id $dc 127.0.0.1:$client" >"$dir/n$id.info"
  wait_serving "$dir" "$id" $((SECONDS + ${LOCAL_CLUSTER_START_TIMEOUT_S:-60})) || exit 1
  echo "node $id dc $dc client 127.0.0.1:$client"
}

stop() {
  local dir=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --dir) [ $# -ge 2 ] || die "--dir needs a value"; dir="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  [ -n "$dir" ] || usage
  local f pid pids=()
  for f in "$dir"/n*.pid; do
    [ -e "$f" ] || continue
    pid="$(cat "$f")"
    if kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
    rm -f "$f"
  done
  local deadline=$((SECONDS + 30))
  for pid in ${pids[@]+"${pids[@]}"}; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
      sleep 0.2
    done
  done
  echo "stopped ${#pids[@]} node(s)"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  join) shift; join "$@" ;;
  stop) shift; stop "$@" ;;
  *) usage ;;
esac
