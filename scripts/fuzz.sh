#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted bytes with AFL++
# (through afl.rs, which works on the stable toolchain: rustc's own
# sanitizer-coverage instrumentation, no nightly, no LLVM plugin).
#
#   scripts/fuzz.sh                 every target for FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh envelope 600    one target, ten minutes
#   scripts/fuzz.sh --prepare       only install and build (scripts/test.sh
#                                   runs this in the background early on)
#
# Targets (fuzz/src/): envelope (decode and round-trip), sealed (a
# recipient opening its delivery), frames (chat, admin and peer messages and
# the node's conversions of peer frames), config (the configuration file,
# room names, handles, certificate fingerprints). Each starts from its
# corpus in fuzz/corpus/TARGET (the protocol test vectors, a configuration
# file) and fails the script on any crash (a panic is a crash) or hang.
# Memory is bounded by AFL (-m, MiB); time by -V.
#
# Installs cargo-afl (crates.io) into target/tools and builds AFL++ from the
# sources it carries (needs a C compiler and make). Everything it writes is
# under target/: the tools, target/fuzz (builds), target/fuzz-out (queues,
# crashes; kept for inspection).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
AFL_VERSION=0.18.2
TOOLS="$ROOT/target/tools"
SECONDS_EACH=${2:-${FUZZ_SECONDS:-60}}
MEMORY_MB=${FUZZ_MEMORY_MB:-1024}
ALL=(envelope sealed frames config)
prepare=0
if [ "${1:-}" = --prepare ]; then prepare=1; shift; fi
if [ $# -ge 1 ]; then TARGETS=("$1"); else TARGETS=("${ALL[@]}"); fi

if ! { [ -x "$TOOLS/bin/cargo-afl" ] && "$TOOLS/bin/cargo-afl" afl --version 2>/dev/null | grep -qF "$AFL_VERSION"; }; then
  echo "==> installing cargo-afl $AFL_VERSION into $TOOLS"
  cargo install cargo-afl --locked --version "$AFL_VERSION" --root "$TOOLS"
fi
export PATH="$TOOLS/bin:$PATH"
# AFL++ itself, built once from the sources cargo-afl carries.
export XDG_DATA_HOME="$TOOLS/xdg"
if ! ls "$XDG_DATA_HOME"/afl.rs/rustc-*/afl.rs-"$AFL_VERSION"/afl/bin/afl-fuzz >/dev/null 2>&1; then
  echo "==> building AFL++ (once)"
  cargo afl config --build
fi

echo "==> building the fuzz targets with AFL's instrumentation"
export CARGO_TARGET_DIR="$ROOT/target/fuzz"
(cd fuzz && cargo afl build --locked)
if [ "$prepare" = 1 ]; then exit 0; fi

# No UI, no CPU-frequency or core-dump-pattern checks (a CI machine owns
# neither), and a deterministic start.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_NO_AFFINITY=1

# First the pipeline's own check: the planted bug must be found.
out="$ROOT/target/fuzz-out/selftest"
mkdir -p "$ROOT/target/fuzz-out"
rm -rf "$out"
AFL_BENCH_UNTIL_CRASH=1 cargo afl fuzz -i fuzz/corpus/selftest -o "$out" -V "${FUZZ_SELFTEST_SECONDS:-60}" -m "$MEMORY_MB" -s 1 \
  "$CARGO_TARGET_DIR/debug/selftest" >"$out.log" 2>&1 || true
found=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
if [ "$found" -eq 0 ]; then
  echo "the fuzzing pipeline did not find the planted bug of fuzz/src/selftest.rs; its log:"
  tail -40 "$out.log"
  exit 1
fi
echo "==> selftest: the planted bug found after $(awk -F': *' '/^execs_done/ {print $2}' "$out/default/fuzzer_stats") executions"

status=0
for target in "${TARGETS[@]}"; do
  out="$ROOT/target/fuzz-out/$target"
  mkdir -p "$ROOT/target/fuzz-out"
  rm -rf "$out"
  echo "==> $target: ${SECONDS_EACH} s from fuzz/corpus/$target"
  cargo afl fuzz -i "fuzz/corpus/$target" -o "$out" -V "$SECONDS_EACH" -m "$MEMORY_MB" -s 1 \
    "$CARGO_TARGET_DIR/debug/$target" >"$out.log" 2>&1 || {
      echo "afl-fuzz failed on $target; its log:"; tail -40 "$out.log"; status=1; continue; }
  stats="$out/default/fuzzer_stats"
  execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats")
  paths=$(awk -F': *' '/^corpus_count/ {print $2}' "$stats")
  crashes=$(find "$out/default/crashes" -type f -name 'id:*' | wc -l)
  hangs=$(find "$out/default/hangs" -type f -name 'id:*' | wc -l)
  echo "    $execs executions, $paths inputs in the queue, $crashes crashes, $hangs hangs"
  if [ "$crashes" -ne 0 ] || [ "$hangs" -ne 0 ]; then
    echo "    FOUND: see $out/default/crashes and hangs (replay: $CARGO_TARGET_DIR/debug/$target < FILE)"
    status=1
  fi
done
exit $status
