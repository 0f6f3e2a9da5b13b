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
cargo test --release --test nemesis -- --nocapture 2>&1 \
  | grep --line-buffered -E "nemesis|seed|panicked|test result"
