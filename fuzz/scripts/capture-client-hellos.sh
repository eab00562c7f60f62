#!/usr/bin/env bash
# Regenerates fuzz/corpus/client_hello: real ClientHellos from the TLS clients on this machine
# (openssl s_client, curl, python's ssl module), each captured by a one-shot listener on
# 127.0.0.1 that saves the client's first bytes and closes without answering. Also writes, for
# each capture, the same hello cut into two handshake records, as some clients send it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=corpus/client_hello
mkdir -p "$out"
for tool in openssl curl python3; do
    command -v "$tool" >/dev/null || { echo "capture-client-hellos.sh: $tool is missing" >&2; exit 1; }
done

# Listens on a free port (printed first), saves what the first client sends within a second.
listener=$(mktemp)
trap 'rm -f "$listener"' EXIT
cat >"$listener" <<'PY'
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
conn, _ = s.accept()
conn.settimeout(1.0)
data = b""
try:
    while len(data) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
except socket.timeout:
    pass
conn.close()
open(sys.argv[1], "wb").write(data)
PY

# capture NAME CLIENT-ARGS...: runs the client against the listener; {port} in the args
# becomes the listener's port.
capture() {
    local name=$1
    shift
    local fifo port pid
    fifo=$(mktemp -u)
    mkfifo "$fifo"
    python3 "$listener" "$out/$name" >"$fifo" &
    pid=$!
    read -r port <"$fifo"
    rm -f "$fifo"
    "${@//\{port\}/$port}" </dev/null >/dev/null 2>&1 || true
    wait "$pid"
    [ -s "$out/$name" ] || { echo "capture-client-hellos.sh: nothing captured for $name" >&2; exit 1; }
    echo "$name: $(wc -c <"$out/$name") bytes"
}

s_client=(timeout 5 openssl s_client -connect "127.0.0.1:{port}")
capture openssl-tls13-sni "${s_client[@]}" -servername app.internal.com
capture openssl-tls12-sni "${s_client[@]}" -tls1_2 -servername api.example.org
capture openssl-no-sni "${s_client[@]}" -noservername
capture openssl-alpn-wildcard "${s_client[@]}" -alpn h2,http/1.1 -servername foo.wild.example.com
capture openssl-sni-case-dot "${s_client[@]}" -servername APP.Internal.COM.
capture openssl-sni-ip-literal "${s_client[@]}" -servername 10.1.2.3
capture openssl-tls13-only "${s_client[@]}" -tls1_3 -servername db.example.net -groups X25519
capture curl-h2 timeout 5 curl -sk --http2 --resolve "app.internal.com:{port}:127.0.0.1" "https://app.internal.com:{port}/"
capture curl-tls12 timeout 5 curl -sk --http1.1 --tls-max 1.2 --resolve "api.example.org:{port}:127.0.0.1" "https://api.example.org:{port}/"
capture curl-ip-no-sni timeout 5 curl -sk "https://127.0.0.1:{port}/"
capture python-ssl timeout 5 python3 -c '
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2", "http/1.1"])
ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="web.default.svc.cluster.local")
' "{port}"

# The same hellos, their handshake message cut into two records after 40 bytes.
python3 - "$out" <<'PY'
import os, sys
out = sys.argv[1]
for name in sorted(os.listdir(out)):
    if name.endswith("-split"):
        continue
    data = open(os.path.join(out, name), "rb").read()
    length = int.from_bytes(data[3:5], "big")
    header, message = data[:5], data[5:5 + length]
    first, second = message[:40], message[40:]
    record = lambda part: header[:3] + len(part).to_bytes(2, "big") + part
    open(os.path.join(out, name + "-split"), "wb").write(record(first) + record(second))
PY
