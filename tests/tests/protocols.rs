//! Every protocol a pod speaks, through the transparent listener, with real peers: TLS routed
//! by SNI to an nginx holding a certificate made at test time, h2c and gRPC, WebSocket,
//! HTTP/1.0 refused as Istio's Envoy does, `Expect: 100-continue` and large bodies both ways.

use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_e2e::scenario::{self, APP_VIP, EXTERNAL_IP, ROGUE_IP, external_service};
use portcullis_e2e::{Lab, Nginx, Role, run};

/// The explicit-proxy listener, next to the transparent one.
const HTTP_PROXY: &str = "127.0.0.1:15080";

/// Runs `action` and fails unless `nginx` accepted no connection meanwhile.
fn untouched(
    lab: &mut Lab,
    nginx: &Nginx,
    what: &str,
    action: impl FnOnce(&mut Lab) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let before = lab.nginx_accepts(nginx)?;
    action(lab)?;
    let after = lab.nginx_accepts(nginx)?;
    // The second reading of the status page is itself one accepted connection.
    ensure!(
        after == before + 1,
        "{what}: nginx accepted {} connection(s) it should never have seen",
        after - before - 1
    );
    Ok(())
}

const TLS_PAGE: &str = "Welcome to the TLS host\n";

/// TLS and HTTPS ports are routed by the ClientHello's SNI, never by where the client dialled;
/// unregistered or missing SNI and garbage hellos are closed before anything is forwarded.
#[test]
fn tls_is_routed_by_sni() {
    run("tls", |lab| {
        let cert = lab.make_certificate(&[
            "tls.internal.com",
            "https.internal.com",
            "*.wild.internal.com",
            "other.internal.com",
        ])?;
        let servers = format!(
            "    server {{
        listen {EXTERNAL_IP}:443 ssl;
        server_name _;
        ssl_certificate {};
        ssl_certificate_key {};
        root {{html}};
    }}",
            cert.cert.display(),
            cert.key.display()
        );
        let nginx = lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8099)?;
        let rogue = lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:443"))?;
        lab.start_with_services(
            &[
                "tls.internal.com",
                "https.internal.com",
                "a.wild.internal.com",
                "other.internal.com",
            ],
            &[
                (
                    "tls.yaml",
                    external_service("tls", &["tls.internal.com"], 443, "TLS"),
                ),
                (
                    "https.yaml",
                    external_service("https", &["https.internal.com"], 443, "HTTPS"),
                ),
                (
                    "wild.yaml",
                    external_service("wild", &["*.wild.internal.com"], 443, "TLS"),
                ),
            ],
            &[],
        )?;
        let cacert = cert.cert.display().to_string();

        // Registered names, exact and wildcard, on a TLS and an HTTPS port: the page, with
        // the client's own SNI reaching nginx (bytes passed through, not re-encrypted).
        for host in [
            "tls.internal.com",
            "https.internal.com",
            "a.wild.internal.com",
        ] {
            let reply = lab.curl(&["--cacert", &cacert, &format!("https://{host}/")])?;
            reply.expect_page(&format!("curl https://{host}/"), "TLS host")?;
            ensure!(
                lab.nginx_log(&nginx)
                    .lines()
                    .last()
                    .is_some_and(|l| l.contains(&format!("sni={host}"))),
                "nginx must see the client's SNI {host}:\n{}",
                lab.nginx_log(&nginx)
            );
        }

        // An unregistered SNI: the handshake fails and nginx never sees a connection.
        untouched(lab, &nginx, "unregistered SNI", |lab| {
            let reply = lab.curl(&["--cacert", &cacert, "https://other.internal.com/"])?;
            ensure!(
                reply.status == 0 && reply.exit != 0,
                "SNI other.internal.com must be closed: {reply}"
            );
            Ok(())
        })?;
        lab.expect_logged(
            "the refused SNI in the access log",
            &["other.internal.com", &format!("{APP_VIP}:443")],
        )?;

        // No SNI, even to the endpoint's own address: closed.
        untouched(lab, &nginx, "no SNI", |lab| {
            let out = lab.shell(
                Role::Pod,
                &format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 openssl s_client -quiet \
                     -noservername -connect {EXTERNAL_IP}:443 -CAfile {cacert}"
                ),
            )?;
            ensure!(
                !out.contains("TLS host"),
                "a hello without SNI must be closed, got {out:?}"
            );
            Ok(())
        })?;

        // A registered SNI sent to the rogue's address lands on the registered host.
        let out = lab.shell(
            Role::Pod,
            &format!(
                "printf 'GET / HTTP/1.0\\r\\nHost: tls.internal.com\\r\\n\\r\\n' | timeout 10 \
                 openssl s_client -quiet -connect {ROGUE_IP}:443 -servername tls.internal.com \
                 -CAfile {cacert} -verify_return_error"
            ),
        )?;
        ensure!(
            out.contains(TLS_PAGE.trim()),
            "SNI tls.internal.com to {ROGUE_IP}:443 must reach the registered host: {out:?}"
        );

        // Garbage that starts like a TLS record, and an oversized record: closed at once.
        for (what, payload) in [
            ("garbage hello", "hex:16030100056a756e6b21".to_owned()),
            (
                "oversized record",
                format!("hex:160301ffff{}", "01".repeat(2000)),
            ),
        ] {
            untouched(lab, &nginx, what, |lab| {
                let seen = lab.connect(Role::Pod, &format!("{ROGUE_IP}:443"), &payload, 5)?;
                ensure!(
                    seen.received == 0 && seen.end != "timeout",
                    "{what} must be closed with nothing sent back: {seen:?}"
                );
                Ok(())
            })?;
        }
        ensure!(
            lab.sink_accepts(&rogue) == 0,
            "the rogue host saw a TLS connection"
        );
        lab.expect_running()
    });
}

const H2_PAGE: &str = "Welcome to the h2c host\n";

/// h2c with prior knowledge; ports declared HTTP2 speak HTTP/2 upstream, ports declared HTTP
/// speak HTTP/1.1, whatever the client spoke.
#[test]
fn http2_prior_knowledge() {
    run("h2c", |lab| {
        let servers = format!(
            "    server {{ listen {EXTERNAL_IP}:8080 http2; root {{html}}; }}
    server {{ listen {EXTERNAL_IP}:8081; root {{html}}; }}"
        );
        let nginx = lab.start_nginx_servers(Role::External, "h2", &servers, H2_PAGE, 8099)?;
        lab.start_with_services(
            &["h2.internal.com", "h1.internal.com"],
            &[
                (
                    "h2.yaml",
                    external_service("h2", &["h2.internal.com"], 8080, "HTTP2"),
                ),
                (
                    "h1.yaml",
                    external_service("h1", &["h1.internal.com"], 8081, "HTTP"),
                ),
            ],
            &[],
        )?;
        let cases = [
            ("--http2-prior-knowledge", 8080, "HTTP/2", "HTTP/2.0"),
            ("--http1.1", 8080, "HTTP/1.1", "HTTP/2.0"),
            ("--http2-prior-knowledge", 8081, "HTTP/2", "HTTP/1.1"),
        ];
        for (flag, port, client_proto, upstream_proto) in cases {
            let host = if port == 8080 { "h2" } else { "h1" };
            let url = format!("http://{host}.internal.com:{port}/");
            let reply = lab.curl(&[flag, &url])?;
            reply.expect_page(&format!("curl {flag} {url}"), "h2c host")?;
            ensure!(
                reply
                    .status_line
                    .starts_with(&format!("{client_proto} 200")),
                "curl {flag} {url}: the client must be answered in {client_proto}: {reply}"
            );
            let log = lab.nginx_log(&nginx);
            let last = log.lines().last().unwrap_or_default();
            ensure!(
                last.contains(&format!("\"GET / {upstream_proto}\"")),
                "curl {flag} {url} must reach nginx over {upstream_proto}; nginx logged {last:?}"
            );
        }

        untouched(lab, &nginx, "unregistered h2c", |lab| {
            let reply = lab.curl(&[
                "--http2-prior-knowledge",
                &format!("http://{EXTERNAL_IP}:8080/"),
            ])?;
            ensure!(
                reply.status_line.starts_with("HTTP/2 502")
                    && reply.header("server") == Some("envoy")
                    && reply.body.is_empty(),
                "h2c to unregistered {EXTERNAL_IP}:8080 must be a 502 from envoy: {reply}"
            );
            Ok(())
        })?;
        lab.expect_logged(
            "the refused h2c request in the access log",
            &["HTTP/2", "502", &format!("{EXTERNAL_IP}:8080"), "block_all"],
        )?;

        // A short bounded load run: many multiplexed streams, every one answered.
        let out = lab.output_in(
            Role::Pod,
            "h2load",
            &[
                "-n",
                "200",
                "-c",
                "2",
                "-m",
                "10",
                "http://h2.internal.com:8080/",
            ],
            Duration::from_secs(30),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("200 succeeded") && text.contains("status codes: 200 2xx"),
            "h2load: every request must succeed with 2xx:\n{text}"
        );
        lab.expect_running()
    });
}

/// gRPC over the transparent listener: a bidirectional stream, message by message in both
/// directions, then the status, its details and the trailing metadata.
#[test]
fn grpc_bidirectional_stream() {
    run("grpc", |lab| {
        lab.start_python_peer(
            Role::External,
            "grpc-server",
            &["grpc-server", EXTERNAL_IP, "50051"],
        )?;
        lab.start_with_services(
            &["grpc.internal.com"],
            &[(
                "grpc.yaml",
                external_service("grpc", &["grpc.internal.com"], 50051, "GRPC"),
            )],
            &[],
        )?;
        let out = lab.python(Role::Pod, &["grpc-client", "grpc.internal.com:50051", "5"])?;
        let want = "recv echo:msg-0\nrecv echo:msg-1\nrecv echo:msg-2\nrecv echo:msg-3\n\
                    recv echo:msg-4\ncode RESOURCE_EXHAUSTED\ndetails done after 5\n";
        ensure!(
            out.starts_with(want) && out.lines().any(|l| l == "trailer x-e2e-count 5"),
            "the gRPC stream must echo 5 messages in order, then the status, details and \
             trailers; got:\n{out}"
        );
        // Istio's metrics name the call's status from its trailers.
        let (_, text) = lab.admin_get("/stats/prometheus")?;
        ensure!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"grpc.internal.com\"")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("grpc_response_status=\"8\"")),
            "the call counted with grpc_response_status 8 (RESOURCE_EXHAUSTED):\n{text}"
        );

        // An unregistered address: the call fails without reaching the server.
        let calls = |lab: &mut Lab| -> anyhow::Result<usize> {
            Ok(lab
                .peer_stdout("grpc-server")?
                .lines()
                .filter(|l| l.starts_with("connection "))
                .count())
        };
        let before = calls(lab)?;
        let out = lab.python(
            Role::Pod,
            &["grpc-client", &format!("{EXTERNAL_IP}:50051"), "1"],
        )?;
        ensure!(
            !out.contains("recv ") && !out.contains("code OK"),
            "a gRPC call to unregistered {EXTERNAL_IP}:50051 must fail: {out}"
        );
        ensure!(
            calls(lab)? == before,
            "the refused gRPC call reached the server"
        );
        lab.expect_running()
    });
}

/// A WebSocket upgrade passes through after routing, from the transparent listener and through
/// the explicit proxy's CONNECT; an unregistered upgrade gets 502.
#[test]
fn websocket_round_trip() {
    run("websocket", |lab| {
        lab.start_python_peer(
            Role::External,
            "ws-server",
            &["ws-server", EXTERNAL_IP, "8765"],
        )?;
        lab.start_with_services(
            &["ws.internal.com"],
            &[(
                "ws.yaml",
                external_service("ws", &["ws.internal.com"], 8765, "HTTP"),
            )],
            &["--http-proxy", HTTP_PROXY],
        )?;
        let proxy = format!("http://{HTTP_PROXY}");
        for (what, via) in [("transparent", "-"), ("explicit proxy", proxy.as_str())] {
            let out = lab.python(
                Role::Pod,
                &["ws-client", "ws://ws.internal.com:8765/", via, "3"],
            )?;
            ensure!(
                out == "recv echo:msg-0\nrecv echo:msg-1\nrecv echo:msg-2\n",
                "WebSocket via the {what}: three messages must round-trip; got {out:?}"
            );
        }
        let connections = |lab: &mut Lab| -> anyhow::Result<usize> {
            Ok(lab
                .peer_stdout("ws-server")?
                .lines()
                .filter(|l| l.starts_with("connection "))
                .count())
        };
        ensure!(
            connections(lab)? == 2,
            "the WebSocket server must have seen exactly the two clients"
        );
        let out = lab.python(
            Role::Pod,
            &["ws-client", &format!("ws://{EXTERNAL_IP}:8765/"), "-", "1"],
        )?;
        ensure!(
            out.trim() == "status 502",
            "an unregistered WebSocket upgrade must get 502, got {out:?}"
        );
        ensure!(
            connections(lab)? == 2,
            "the refused upgrade reached the WebSocket server"
        );
        lab.expect_running()
    });
}

/// Deterministic pseudo-random bytes (xorshift), so the bodies compress to nothing useful.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// HTTP/1.0 refused with 426, `Expect: 100-continue` answered by the proxy, and 20 MiB
/// bodies streamed intact in both directions, with a length and chunked.
#[test]
fn http1_bodies_and_versions() {
    run("bodies", |lab| {
        lab.start_python_peer(
            Role::External,
            "http-echo",
            &["http-echo", EXTERNAL_IP, "8090"],
        )?;
        lab.start_with_services(
            &["echo.internal.com"],
            &[
                ("serviceentry.yaml", scenario::SERVICE_ENTRY.to_owned()),
                (
                    "echo.yaml",
                    external_service("echo", &["echo.internal.com"], 8090, "HTTP"),
                ),
            ],
            &[],
        )?;

        // HTTP/1.0 gets Envoy's `426 Upgrade Required` (Istio's default; see
        // tests/tests/istio_http.rs for `--accept-http10`), with or without Host, and
        // nothing reaches an upstream.
        let before = lab.nginx_requests(Role::External);
        let reply = lab.curl(&["--http1.0", &format!("http://{}/", scenario::APP_HOST)])?;
        ensure!(reply.status == 426, "curl --http1.0 must get 426: {reply}");
        let seen = lab.connect(
            Role::Pod,
            &format!("{EXTERNAL_IP}:80"),
            "GET / HTTP/1.0\r\n\r\n",
            5,
        )?;
        ensure!(
            seen.line.contains("data=HTTP/1.1 426 Upgrade Required")
                || seen.line.contains("data=HTTP/1.0 426 Upgrade Required"),
            "HTTP/1.0 without Host to {EXTERNAL_IP}:80 must get 426: {seen:?}"
        );
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "an HTTP/1.0 request reached the external host"
        );

        let size = 20 << 20;
        let file = lab.dir.join("upload.bin");
        std::fs::write(&file, noise(size))?;
        let upload = format!("@{}", file.display());
        let sum = lab.run(Role::Pod, "sha256sum", &[&file.display().to_string()])?;
        let sum = sum.split_whitespace().next().context("sha256sum output")?;
        let url = "http://echo.internal.com:8090/upload";
        // A long wait for `100 Continue` makes a proxy that never answers it time out.
        let uploads = [
            (
                "Expect: 100-continue with a length",
                ["-H", "Expect: 100-continue", "--expect100-timeout", "30"],
            ),
            (
                "chunked",
                ["-H", "Transfer-Encoding: chunked", "-H", "Expect:"],
            ),
        ];
        for (what, headers) in uploads {
            let mut args = vec!["--max-time", "30", "--data-binary", &upload];
            args.extend_from_slice(&headers);
            args.push(url);
            let reply = lab.curl(&args)?;
            ensure!(
                reply.status == 200 && reply.body.starts_with(&format!("len={size} sha256={sum} ")),
                "upload ({what}) of {size} bytes must arrive intact (sha256 {sum}): {reply}"
            );
        }

        let download = lab.dir.join("download.bin");
        let out = lab.output_in(
            Role::Pod,
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "-D",
                "-",
                "-o",
                &download.display().to_string(),
                &format!("http://echo.internal.com:8090/bytes/{size}"),
            ],
            Duration::from_secs(40),
        )?;
        let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let want = headers
            .lines()
            .find_map(|l| l.strip_prefix("x-sha256: "))
            .map(str::trim)
            .with_context(|| format!("no x-sha256 header in {headers:?}"))?
            .to_owned();
        let got = lab.run(Role::Pod, "sha256sum", &[&download.display().to_string()])?;
        let len = std::fs::metadata(&download)?.len();
        ensure!(
            got.split_whitespace().next() == Some(want.as_str()) && len == size as u64,
            "chunked download of {size} bytes must arrive intact: got {len} bytes, sha256 \
             {got:?}, sent {want}"
        );
        lab.expect_running()
    });
}
