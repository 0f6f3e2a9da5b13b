#!/usr/bin/env bash
# The nemesis campaign (issue 24): SCHEDULES seeded schedules against a loopback
# cluster (3 etcd members, 3 nodes, 2 routers; a fresh cluster every PER_CLUSTER
# schedules), each WINDOW_MS of clients and faults, then heal, settle and check the
# history against the model. Prints one line per schedule and a total; a failed
# schedule prints its seed and keeps its cluster's folder. Results go into
# RELIABILITY.md with the line this prints. Needs etcd on PATH.
#
#   scripts/nemesis.sh [SCHEDULES] [FIRST_SEED]   (default 100 from seed 1000;
#                                                  about 10-15 s per schedule)
set -euo pipefail
cd "$(dirname "$0")/.."
export BIOGATE_REQUIRE_ETCD=1
export BIOGATE_NEMESIS_SCHEDULES="${1:-100}"
export BIOGATE_NEMESIS_SEED="${2:-1000}"
export BIOGATE_NEMESIS_PER_CLUSTER="${PER_CLUSTER:-20}"
export BIOGATE_NEMESIS_WINDOW_MS="${WINDOW_MS:-8000}"
# The campaign runs copies of the binaries, so rebuilding the tree meanwhile changes
# nothing under it (a node restarted by the nemesis runs the build the campaign began with).
copy="$(mktemp -d "${TMPDIR:-/tmp}/biogate-nemesis.XXXXXX")"
test_bin="$(cargo test --release --test nemesis --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*nemesis-[^"]*"' | tail -1 | cut -d'"' -f4)"
cp "$test_bin" "$copy/nemesis"
cp target/release/biogate "$copy/biogate"
echo "nemesis campaign on $(git rev-parse --short HEAD), binaries copied to $copy"
BIOGATE_TEST_BIN="$copy/biogate" "$copy/nemesis" --nocapture 2>&1 \
  | grep --line-buffered -E "nemesis|seed|panicked|test result"
