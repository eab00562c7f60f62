#!/usr/bin/env bash
# Runs portcullis on config/example as an explicit proxy on 127.0.0.1:15080, with two tiny
# web servers standing in for the scenario's endpoints (127.0.0.2:8080 "external host",
# 127.0.0.3:8081 "in-cluster pod", loopback addresses of their own, so that 127.0.0.1 stays
# unregistered) when python3 is available. Needs no root and no iptables.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "run-example.sh: cargo is missing" >&2; exit 1; }
# jemalloc, the binary's allocator, is C built by its crate with make and cc.
for tool in make cc; do
    command -v "$tool" >/dev/null || { echo "run-example.sh: $tool is missing (apt-get install make gcc)" >&2; exit 1; }
done
cargo build --release -p portcullis

pids=()
work=$(mktemp -d)
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

if command -v python3 >/dev/null; then
    mkdir -p "$work/external" "$work/pod"
    echo "Welcome to the external host" >"$work/external/index.html"
    echo "This is an Nginx Pod" >"$work/pod/index.html"
    python3 -m http.server 8080 --bind 127.0.0.2 --directory "$work/external" >/dev/null 2>&1 &
    pids+=("$!")
    python3 -m http.server 8081 --bind 127.0.0.3 --directory "$work/pod" >/dev/null 2>&1 &
    pids+=("$!")
else
    echo "python3 not found: start your own servers on 127.0.0.2:8080 and 127.0.0.3:8081" >&2
fi

cat <<'HELP'
portcullis is starting on config/example. Try, from another terminal:
  curl -x http://127.0.0.1:15080 http://app.internal.com/       # a page from either endpoint
  curl -p -x http://127.0.0.1:15080 http://app.internal.com/    # the same through CONNECT
  curl -x http://127.0.0.1:15080 -I http://example.com/         # 502, server: envoy
  curl -x http://127.0.0.1:15080 -I http://127.0.0.1:9999/      # 502: loopback is not registered
  curl http://127.0.0.1:15000/config_dump                       # what it loaded
Edit or delete files in config/example while it runs; changes apply without a restart.
HELP

# Only loopback listeners: a laptop demo should not expose a proxy to the network.
target/release/portcullis run --config config/example \
    --http-proxy 127.0.0.1:15080 \
    --outbound 127.0.0.1:15001 \
    --metrics 127.0.0.1:15090 \
    --health 127.0.0.1:15021 &
pids+=("$!")
wait "${pids[-1]}"
