#!/usr/bin/env bash
# Mutation testing of the consensus core with cargo-mutants: every mutant of
# consensus/src/{lease/,paxos/,time.rs,replica.rs,config.rs} must be caught by
# some test of saferchat-consensus, or be listed as equivalent (with the
# reason) in .cargo/mutants.toml. Exits non-zero when a mutant that is not
# listed survives (or times out, or the unmutated tree fails its tests).
#
#   scripts/mutants.sh [--ci] [FILE...] [-- CARGO-MUTANTS-ARGS...]
#
# Full mode (default): every in-scope file (or the FILEs given), every test
# of the crate, built with the `mutants` profile (optimised, debug
# assertions on). ~250 mutants; each is one rebuild of the crate's five
# test targets (~45 s on 2 cores) plus the tests it needs: unit tests fail
# in about a second, a mutant they miss runs the model check and the
# simulation (~65 s). Expect 4-8 hours with one job. Arguments after `--`
# go to cargo-mutants, e.g. `-- --shard 1/4` or `-- --iterate`.
# Results: target/mutants/full/mutants.out/{caught,missed,timeout,unviable}.txt
#
# --ci: the fast subset CI runs (scripts/test.sh): time.rs, config.rs and
# lease/grantor.rs against the unit tests and the scripted scenarios only,
# in the dev profile and a target directory of its own (see below). 75
# mutants in about 2 minutes on 2 cores, its dependency build included.
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
files=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) ci=1 ;;
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

args=(mutants --package saferchat-consensus --jobs 1 --no-shuffle)
if [ "$ci" = 1 ]; then
  [ ${#files[@]} -gt 0 ] || files=(consensus/src/time.rs consensus/src/config.rs consensus/src/lease/grantor.rs)
  out="$ROOT/target/mutants/ci"
  # A target directory of its own: sharing the workspace's would overwrite
  # the workspace's consensus crate with the last mutant's build (the copy's
  # crate gets the same hash, and cargo then takes that artifact as fresh),
  # so a later `cargo test` would test a mutant. Rebuilding the dev-profile
  # dependencies here costs a minute or two.
  export CARGO_TARGET_DIR="$ROOT/target/mutants-target"
  args+=(--cargo-arg=--lib --cargo-arg=--test=scripted --minimum-test-timeout 120)
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
  )
  out="$ROOT/target/mutants/full"
  args+=(--profile mutants)
fi
for f in "${files[@]}"; do args+=(--file "$f"); done
mkdir -p "$out"
args+=(--output "$out")

echo "==> cargo ${args[*]} ${extra[*]}"
start=$(date +%s)
status=0
PATH="$TOOLS/bin:$PATH" "$CARGO_MUTANTS" "${args[@]}" "${extra[@]}" || status=$?
echo "==> cargo-mutants exited $status after $(( $(date +%s) - start )) s; results in $out/mutants.out"
for kind in missed timeout unviable; do
  if [ -s "$out/mutants.out/$kind.txt" ]; then
    echo "--- $kind:"
    cat "$out/mutants.out/$kind.txt"
  fi
done
# cargo-mutants exits 2 for a missed mutant, 3 for a timeout, 4 when the
# unmutated tree fails; unviable mutants (that do not build) pass.
exit "$status"
