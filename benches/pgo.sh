#!/usr/bin/env bash
# A profile-guided release build of ferry: target/pgo/release/ferry.
#
# 1. builds ferry instrumented (-Cprofile-generate) in target/pgo-gen,
# 2. runs it under benches/pgo_train.py (python3, standard library only),
# 3. merges the profile with llvm-profdata and
# 4. builds ferry again with it (-Cprofile-use) in target/pgo.
#
# llvm-profdata must be of the LLVM major version rustc uses (`rustc -vV`):
# `rustup component add llvm-tools`, or Debian/Ubuntu's llvm-NN package.
# Extra arguments go to pgo_train.py (say --secs 20).
set -euo pipefail
cd "$(dirname "$0")/.."

major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
sysroot=$(rustc --print sysroot)
profdata=""
for p in "$sysroot"/lib/rustlib/*/bin/llvm-profdata "/usr/lib/llvm-$major/bin/llvm-profdata" \
  "$(command -v "llvm-profdata-$major" || true)" "$(command -v llvm-profdata || true)"; do
  [ -n "$p" ] && [ -x "$p" ] || continue
  if "$p" --version 2>/dev/null | grep -q "LLVM version $major\."; then
    profdata=$p
    break
  fi
done
if [ -z "$profdata" ]; then
  echo "pgo.sh: no llvm-profdata of LLVM $major (rustc's) found;" \
    "install one: rustup component add llvm-tools, or apt-get install llvm-$major" >&2
  exit 1
fi

data=$PWD/target/pgo-data
rm -rf "$data"
mkdir -p "$data"
echo "pgo.sh: building the instrumented ferry (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$data" CARGO_TARGET_DIR=target/pgo-gen \
  cargo build --release --locked --bin ferry
# Build scripts ran instrumented too: only ferry's own profile counts.
rm -f "$data"/*.profraw
echo "pgo.sh: training"
LLVM_PROFILE_FILE="$data/ferry-%p-%m.profraw" \
  python3 benches/pgo_train.py --ferry target/pgo-gen/release/ferry "$@"
"$profdata" merge -o "$data/ferry.profdata" "$data"/*.profraw
echo "pgo.sh: building with the profile (target/pgo)"
RUSTFLAGS="-Cprofile-use=$data/ferry.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  CARGO_TARGET_DIR=target/pgo cargo build --release --locked --bin ferry
echo "pgo.sh: done: target/pgo/release/ferry"
