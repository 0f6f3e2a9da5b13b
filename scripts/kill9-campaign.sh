#!/usr/bin/env bash
# kill -9 campaign: a real server process killed at random moments while clients
# enroll, delete and compact and the server seals its log; after each restart every
# acknowledged operation must hold and every checksum verify. Results go into
# RELIABILITY.md with the line this prints.
#
#   scripts/kill9-campaign.sh [TRIALS]      (default 200; about 1-2 s per trial)
set -euo pipefail
cd "$(dirname "$0")/.."
export BIOGATE_TRIALS="${1:-200}"
cargo test --release --test campaigns -- --ignored --nocapture kill9_campaign 2>&1 \
  | grep -E "trial|campaign|panicked|test result"
