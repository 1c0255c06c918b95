#!/usr/bin/env bash
# The benchmark of SPEC §10 in one command: installs nginx and wrk (Debian) and oha (crates.io)
# when missing, builds the release binary and the relays it is compared with
# (examples/relay.rs, examples/pipelined_relay.rs), then runs bench/bench.py (arguments are
# passed on: --rounds, --seconds, --idle-connections, --paced-rate, --paced-rounds,
# --paced-seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update
  apt-get install -y "${missing[@]}"
fi
# oha sends a fixed number of requests a second, for latency at the same load; Debian has no
# load generator that does.
command -v oha >/dev/null || cargo install oha --locked
cargo build --release --bin wxgate --example relay --example pipelined_relay
exec python3 bench/bench.py "$@"
