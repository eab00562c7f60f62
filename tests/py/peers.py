"""Peers of the end-to-end lab: servers on the external host and clients in the pod.

Usage: python3 peers.py COMMAND ARGS...

  http-echo HOST PORT            HTTP/1.1 server: POST answers with the body's length and
                                 sha256; GET /bytes/N streams N bytes chunked, their sha256 in
                                 the `x-sha256` header; anything else answers `echo server`.
  grpc-server HOST PORT          gRPC server (raw bytes, no protoc): bidirectional
                                 /e2e.Echo/Chat echoes each message as `echo:<message>`, then
                                 ends with trailing metadata `x-e2e-count: <n>` and status
                                 RESOURCE_EXHAUSTED with details `done after <n>`.
  grpc-client TARGET N           calls /e2e.Echo/Chat, sending message i only after echo i-1
                                 arrived, and prints what came back.
  ws-server HOST PORT            WebSocket server echoing each message as `echo:<message>`.
  ws-client URL PROXY N          WebSocket client (PROXY `-` for none); prints the echoes, or
                                 `status <code>` when the handshake is refused.
  admin-page URL DIR FIRST SECOND
                                 drives headless Chromium over the DevTools protocol: opens
                                 the admin page URL, prints `loaded <json>` (mode, services,
                                 denial rows) once a denial of FIRST is shown, `live` once one
                                 of SECOND appears without a reload, then clicks the download
                                 button and prints `downloaded <path>` once the file is in DIR.

Servers print `ready` once they listen and one `connection` line per client connection.
"""

import asyncio
import hashlib
import http.server
import os
import queue
import sys


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def pattern(n):
    return hashlib.shake_256(b"portcullis e2e").digest(n)


def http_echo(host, port):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            say("request " + (fmt % args))

        def read_body(self):
            digest = hashlib.sha256()
            total = 0
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return total, digest.hexdigest(), "chunked"
                    left = size
                    while left:
                        chunk = self.rfile.read(min(left, 1 << 16))
                        if not chunk:
                            raise ConnectionError("body cut short")
                        digest.update(chunk)
                        total += len(chunk)
                        left -= len(chunk)
                    self.rfile.readline()
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("body cut short")
                digest.update(chunk)
                total += len(chunk)
                left -= len(chunk)
            return total, digest.hexdigest(), "length"

        def reply(self, body, headers=()):
            self.send_response(200)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            total, digest, framing = self.read_body()
            if self.reply_status():
                return
            if self.path == "/headers":
                self.reply_headers()
                return
            self.reply(f"len={total} sha256={digest} framing={framing}\n".encode())

        def reply_headers(self):
            seen = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items())
            self.reply(seen.encode())

        def reply_status(self):
            # /status/CODE answers CODE; /flaky/CODE answers CODE to a first attempt and 200
            # to a retry (by Envoy's x-envoy-attempt-count); /busy/CODE answers CODE with
            # `x-busy: yes` to a first attempt and without it to a retry; all say which
            # attempt they saw.
            kind, _, code = self.path.strip("/").partition("/")
            if kind not in ("status", "flaky", "busy") or not code.isdigit():
                return False
            status = int(code)
            if kind == "flaky" and self.attempt() > 1:
                status = 200
            body = f"status {status} on attempt {self.attempt()}\n".encode()
            self.send_response(status)
            if kind == "busy" and self.attempt() == 1:
                self.send_header("x-busy", "yes")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True

        def attempt(self):
            return int(self.headers.get("x-envoy-attempt-count", "1"))

        def do_GET(self):
            if self.path == "/headers":
                self.reply_headers()
                return
            # Another path under /headers/ (a rewritten prefix): the path, then the headers.
            if self.path.startswith("/headers/"):
                seen = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items())
                self.reply(f"path: {self.path}\n{seen}".encode(), [("x-upstream", "echo")])
                return
            if self.reply_status():
                return
            if not self.path.startswith("/bytes/"):
                self.reply(b"echo server\n")
                return
            data = pattern(int(self.path[len("/bytes/"):]))
            self.send_response(200)
            self.send_header("x-sha256", hashlib.sha256(data).hexdigest())
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(data), 1 << 16):
                chunk = data[start:start + (1 << 16)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")

    class Server(http.server.ThreadingHTTPServer):
        def get_request(self):
            conn = super().get_request()
            say("connection")
            return conn

    server = Server((host, int(port)), Handler)
    say("ready")
    server.serve_forever()


def grpc_server(host, port):
    from concurrent import futures

    import grpc

    def chat(requests, context):
        count = 0
        for message in requests:
            count += 1
            yield b"echo:" + message
        context.set_trailing_metadata((("x-e2e-count", str(count)),))
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(f"done after {count}")

    class Count(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            say("connection " + details.method)
            return continuation(details)

    handler = grpc.method_handlers_generic_handler(
        "e2e.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(chat)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=(Count(),))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    say("ready")
    server.wait_for_termination()


def grpc_client(target, n):
    # getaddrinfo, so the pod's hosts file names the target as it does for curl.
    os.environ["GRPC_DNS_RESOLVER"] = "native"
    import grpc

    n = int(n)
    outbox = queue.Queue()

    def requests():
        while True:
            message = outbox.get()
            if message is None:
                return
            yield message

    with grpc.insecure_channel(target) as channel:
        chat = channel.stream_stream("/e2e.Echo/Chat")
        call = chat(requests(), timeout=10)
        outbox.put(b"msg-0")
        try:
            for i, reply in enumerate(call):
                say("recv " + reply.decode())
                outbox.put(f"msg-{i + 1}".encode() if i + 1 < n else None)
        except grpc.RpcError:
            pass
        say(f"code {call.code().name}")
        say(f"details {call.details()}")
        for key, value in call.trailing_metadata() or ():
            say(f"trailer {key} {value}")


async def ws_server(host, port):
    from websockets.asyncio.server import serve

    async def echo(ws):
        say("connection " + ws.request.headers.get("Host", "-"))
        async for message in ws:
            await ws.send("echo:" + message)

    async with serve(echo, host, int(port)):
        say("ready")
        await asyncio.Future()


async def ws_client(url, proxy, n):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    try:
        async with connect(url, proxy=None if proxy == "-" else proxy, open_timeout=5) as ws:
            for i in range(int(n)):
                await ws.send(f"msg-{i}")
                say("recv " + await asyncio.wait_for(ws.recv(), 5))
    except InvalidStatus as refused:
        say(f"status {refused.response.status_code}")


def admin_page(url, downloads, first, second):
    import json
    import shutil
    import subprocess
    import tempfile
    import time

    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="pce2e-chromium-")
    chromium = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--user-data-dir=" + profile, "--remote-debugging-port=0", "about:blank"],
        # Chromium's own temporary directories go in the profile, removed with it, rather
        # than one more /tmp/org.chromium.Chromium.* per run.
        env=dict(os.environ, TMPDIR=profile),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def until(what, check, seconds=30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if chromium.poll() is not None:
                sys.exit(f"chromium exited ({chromium.returncode}) waiting for {what}")
            value = check()
            if value:
                return value
            time.sleep(0.2)
        sys.exit(f"timed out waiting for {what}")

    def active_port():
        try:
            with open(os.path.join(profile, "DevToolsActivePort")) as f:
                lines = f.read().split()
            return lines if len(lines) == 2 else None
        except FileNotFoundError:
            return None

    try:
        port, path = until("the DevTools port", active_port)
        ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10)
        ids = iter(range(1, 1 << 30))

        def call(method, params=None, session=None):
            message = {"id": next(ids), "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            ws.send(json.dumps(message))
            while True:
                answer = json.loads(ws.recv(timeout=30))
                if answer.get("id") == message["id"]:
                    if "error" in answer:
                        sys.exit(f"{method}: {answer['error']}")
                    return answer["result"]

        call("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
        target = call("Target.createTarget", {"url": url})["targetId"]
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def evaluate(expression):
            result = call("Runtime.evaluate",
                          {"expression": expression, "returnByValue": True}, session)
            return result["result"].get("value")

        state = """JSON.stringify({
            mode: document.getElementById('mode').textContent,
            source: document.getElementById('mode-source').textContent,
            services: [...document.querySelectorAll('#services tbody tr')].map(r => r.dataset.host),
            denials: [...document.querySelectorAll('#denials tbody tr')].map(r =>
                [...r.children].map(c => c.textContent))})"""

        def showing(host):
            page = json.loads(evaluate(state) or "{}")
            rows = page.get("denials", [])
            return page if any(row and row[0] == host for row in rows) else None

        say("loaded " + json.dumps(until(f"a denial of {first} on the page", lambda: showing(first))))
        until(f"a denial of {second} on the page", lambda: showing(second))
        say("live")
        evaluate("document.getElementById('download').click()")
        saved = os.path.join(downloads, "learned-serviceentries.yaml")
        until("the download", lambda: os.path.exists(saved))
        say("downloaded " + saved)
    finally:
        chromium.terminate()
        try:
            chromium.wait(10)
        except subprocess.TimeoutExpired:
            chromium.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "http-echo":
        http_echo(*args)
    elif command == "grpc-server":
        grpc_server(*args)
    elif command == "grpc-client":
        grpc_client(*args)
    elif command == "ws-server":
        asyncio.run(ws_server(*args))
    elif command == "ws-client":
        asyncio.run(ws_client(*args))
    elif command == "admin-page":
        admin_page(*args)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
