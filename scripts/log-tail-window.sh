#!/usr/bin/env bash
# The window after kill -9 in which a log's last commit group is unprovable: a real
# server (log_idle_ms = 50) killed d ms after its last answer, d in 0..300, and its log
# cut by one byte; prints, per 25 ms bucket, how often the cut was refused and how often
# `check` could only say "cannot tell". Results go into RELIABILITY.md.
#
#   scripts/log-tail-window.sh [TRIALS]      (default 200; about 0.5 s per trial)
set -euo pipefail
cd "$(dirname "$0")/.."
export BIOGATE_TRIALS="${1:-200}"
cargo test --release --test campaigns -- --ignored --nocapture log_tail_window_campaign 2>&1 \
  | grep -E "log tail window|d in|panicked|test result"
