#!/usr/bin/env bash
# Mutation testing with cargo-mutants: every mutant of the consensus core
# (consensus/src/{lease/,paxos/,time.rs,replica.rs,config.rs}) and of the
# node's lease clock and view (node/src/clock.rs, membership/view.rs) must be
# caught by some test of its crate, or be listed as equivalent (with the
# reason) in .cargo/mutants.toml. Exits non-zero when a mutant that is not
# listed survives, or the unmutated tree fails its tests; a mutant whose
# tests time out counts as caught (and is listed).
#
#   scripts/mutants.sh [--ci] [--prepare] [FILE...] [-- CARGO-MUTANTS-ARGS...]
#
# --prepare: only install cargo-mutants and, with --ci, build the crate's
# dependencies in the CI subset's target directory (scripts/test.sh runs
# this in the background early on).
#
# Full mode (default): every in-scope file (or the FILEs given). Consensus
# files against every test of the crate, built with the `mutants` profile
# (optimised, debug assertions on): ~255 mutants, each one rebuild of the
# crate's five test targets (~45 s on 2 cores) plus the tests it needs (unit
# tests fail in about a second; a mutant they miss runs the model check and
# the simulation, ~65 s): several hours with one job. Node files against the
# node's unit tests in the dev profile: 27 mutants in ~10 minutes, after a
# first build of the node's dependencies (~8 minutes). Arguments after `--`
# go to cargo-mutants, e.g. `-- --shard 1/4`, `-- --iterate` or `-- --re X`.
# Results: target/mutants/{full,node}/mutants.out/{caught,missed,timeout,unviable}.txt
#
# --ci: the fast subset CI runs (scripts/test.sh): time.rs, config.rs,
# lease/grantor.rs, lease/holder.rs, replica.rs, paxos/acceptor.rs and
# handover.rs
# against the unit tests and the scripted scenarios only (scripted.rs and
# room_epochs.rs), in the dev profile
# and a target directory of its own (see below). paxos/proposer.rs stays
# out: two of its mutants hang the tests until the timeout.
#
# cargo-mutants 27.1.0 is installed from crates.io into target/tools (not
# globally) when missing: ~5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

MUTANTS_VERSION=27.1.0
TOOLS="$ROOT/target/tools"
CARGO_MUTANTS="$TOOLS/bin/cargo-mutants"

ci=0
prepare=0
files=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) ci=1 ;;
    --prepare) prepare=1 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "unknown option $1 (cargo-mutants options go after --)" >&2; exit 2 ;;
    *) files+=("$1") ;;
  esac
  shift
done

if ! { [ -x "$CARGO_MUTANTS" ] && "$CARGO_MUTANTS" mutants --version | grep -qF "$MUTANTS_VERSION"; }; then
  echo "==> installing cargo-mutants $MUTANTS_VERSION into $TOOLS"
  cargo install cargo-mutants --locked --version "$MUTANTS_VERSION" --root "$TOOLS"
fi

# The test targets the CI subset builds for each mutant (see --ci below).
CI_TARGETS=(--lib --test=scripted --test=room_epochs)
if [ "$prepare" = 1 ]; then
  if [ "$ci" = 1 ]; then
    # The dependencies, built once in the CI subset's target directory; the
    # crate's own hash there does not depend on where its tree is, so the
    # baseline build in cargo-mutants' copy reuses them and rebuilds only
    # the crate.
    echo "==> building the consensus tests' dependencies in target/mutants-target"
    CARGO_TARGET_DIR="$ROOT/target/mutants-target" cargo test --locked --no-run \
      --package saferchat-consensus "${CI_TARGETS[@]}"
  fi
  exit 0
fi

# One cargo-mutants run: run NAME OUT ARGS... (results in OUT/mutants.out).
status=0
run() {
  local name=$1 out=$2
  shift 2
  mkdir -p "$out"
  echo "==> [$name] cargo $* --output $out ${extra[*]}"
  local start=$(date +%s) rc=0
  PATH="$TOOLS/bin:$PATH" "$CARGO_MUTANTS" "$@" --output "$out" "${extra[@]}" || rc=$?
  echo "==> [$name] cargo-mutants exited $rc after $(( $(date +%s) - start )) s; results in $out/mutants.out"
  for kind in missed timeout unviable; do
    if [ -s "$out/mutants.out/$kind.txt" ]; then
      echo "--- $kind:"
      cat "$out/mutants.out/$kind.txt"
    fi
  done
  # 3: only timeouts. A mutant whose tests never finish is caught (the
  # suite cannot pass), so it does not fail the run; the list above shows
  # it, for a look at whether the timeout was too tight.
  case "$rc" in 0 | 3) ;; *) status=$rc ;; esac
}

common=(mutants --jobs 1 --no-shuffle)
if [ "$ci" = 1 ]; then
  [ ${#files[@]} -gt 0 ] || files=(
    consensus/src/time.rs
    consensus/src/config.rs
    consensus/src/lease/grantor.rs
    consensus/src/lease/holder.rs
    consensus/src/replica.rs
    consensus/src/paxos/acceptor.rs
    consensus/src/handover.rs
  )
  # A target directory of its own: sharing the workspace's would overwrite
  # the workspace's consensus crate with the last mutant's build (the copy's
  # crate gets the same hash, and cargo then takes that artifact as fresh),
  # so a later `cargo test` would test a mutant. Its dev-profile
  # dependencies cost a minute or two to build: `--ci --prepare` builds
  # them beforehand (scripts/test.sh does, in the background).
  # --minimum-test-timeout 300: scripts/test.sh runs this subset at the
  # lowest CPU priority next to the workspace's tests, which may starve it
  # for minutes; the suite takes under a second when it has the CPU, so
  # only a mutant that hangs it reaches the limit. --gitignore: the copy
  # skips ignored files (web/node_modules, build outputs), which the test
  # run may be writing meanwhile.
  args=("${common[@]}" --package saferchat-consensus --minimum-test-timeout 300 --gitignore=true)
  for t in "${CI_TARGETS[@]}"; do args+=("--cargo-arg=$t"); done
  for f in "${files[@]}"; do args+=(--file "$f"); done
  CARGO_TARGET_DIR="$ROOT/target/mutants-target" run ci "$ROOT/target/mutants/ci" "${args[@]}"
else
  [ ${#files[@]} -gt 0 ] || files=(
    consensus/src/time.rs
    consensus/src/config.rs
    consensus/src/lease/mod.rs
    consensus/src/lease/grantor.rs
    consensus/src/lease/holder.rs
    consensus/src/replica.rs
    consensus/src/paxos/mod.rs
    consensus/src/paxos/acceptor.rs
    consensus/src/paxos/proposer.rs
    consensus/src/handover.rs
    node/src/clock.rs
    node/src/membership/view.rs
  )
  consensus=()
  node=()
  for f in "${files[@]}"; do
    case "$f" in
      consensus/*) consensus+=(--file "$f") ;;
      node/*) node+=(--file "$f") ;;
      *) echo "$f: only consensus/ and node/ files are in scope" >&2; exit 2 ;;
    esac
  done
  if [ ${#consensus[@]} -gt 0 ]; then
    run consensus "$ROOT/target/mutants/full" "${common[@]}" --package saferchat-consensus --profile mutants "${consensus[@]}"
  fi
  if [ ${#node[@]} -gt 0 ]; then
    # The node's lease clock and view against the node's unit tests, in the
    # dev profile (an optimised build of the node crate per mutant would
    # take minutes) and the target directory --ci uses.
    CARGO_TARGET_DIR="$ROOT/target/mutants-target" run node "$ROOT/target/mutants/node" \
      "${common[@]}" --package saferchat-node --cargo-arg=--lib --minimum-test-timeout 120 "${node[@]}"
  fi
fi
# cargo-mutants exits 2 for a missed mutant, 3 for a timeout (passed above),
# 4 when the unmutated tree fails; unviable mutants (that do not build) pass.
exit "$status"
