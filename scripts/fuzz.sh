#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30) on the stable toolchain:
# `cargo fuzz ... -s none` (libFuzzer with coverage instrumentation, no sanitizer; the
# sanitizers need nightly). The checked-in seeds under fuzz/corpus/TARGET are read, never
# written: what the run discovers goes to fuzz/target/corpus/TARGET. Any crash, panic, leak
# of time (-timeout) or memory fails the script and names the input that caused it.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
targets=(client_hello detect host_routing config_loader http_request h1_fast_path xds_resources)
declare -A dict=(
    [client_hello]=tls
    [detect]=http
    [host_routing]=hosts
    [config_loader]=yaml
    [http_request]=http
    [h1_fast_path]=http
)
# Protobuf input (xds_resources) has no useful token dictionary: its seeds carry the structure.

# libfuzzer-sys compiles libFuzzer itself, which is C++.
if ! command -v c++ >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        apt-get install -y -q --no-install-recommends g++
    else
        echo "scripts/fuzz.sh: needs a C++ compiler (g++) to build libFuzzer" >&2
        exit 1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "=== installing cargo-fuzz ==="
    cargo install cargo-fuzz --locked
fi

start=$SECONDS
echo "=== fuzz: build (cargo fuzz build -s none) ==="
cargo fuzz build -s none
echo "fuzz: build took $((SECONDS - start)) s"

failed=()
for target in "${targets[@]}"; do
    work=fuzz/target/corpus/$target
    log=fuzz/target/logs/$target.log
    mkdir -p "$work" "${log%/*}"
    echo "=== fuzz: $target for ${seconds} s ==="
    status=0
    dict_flag=()
    if [ -n "${dict[$target]:-}" ]; then
        dict_flag=(-dict="fuzz/dict/${dict[$target]}.dict")
    fi
    cargo fuzz run -s none "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        "${dict_flag[@]}" -print_final_stats=1 >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n 1 | cut -d' ' -f5 || true)
        echo "!!! fuzz: $target FAILED (exit $status); input: ${artifact:-none written}; log: $log" >&2
        echo "!!! reproduce: cargo fuzz run -s none $target ${artifact:-}" >&2
        failed+=("$target")
        continue
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    corpus=$(find "$work" -type f | wc -l)
    echo "fuzz: $target ok: $runs runs, $speed exec/s, $corpus inputs in $work"
done

echo "fuzz: took $((SECONDS - start)) s in all"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "!!! fuzz: FAILED targets: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
