//! No way around the registry: one table of tricks, each sent through the transparent
//! listener (towards the rogue host, or wherever the row says) and through the explicit
//! proxy. Every row either reaches only a registered endpoint or is refused as the behaviour
//! table says; the rogue host never sees a connection; every refusal is in the access log
//! with the requested host (or SNI) and the original destination.
//!
//! Requests are sent as raw bytes (`pce2e-net connect`), so nothing normalises the odd forms
//! away; HTTP/2 rows use `nghttp`, TLS rows `openssl s_client`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::ensure;
use portcullis_e2e::lab::Sink;
use portcullis_e2e::scenario::{
    EXTERNAL_IP, EXTERNAL_MARK, ROGUE_IP, ROGUE_IP6, SELECT_EXTERNAL, service_entry,
};
use portcullis_e2e::{Lab, Role, poll, run};

/// The explicit proxy, beside the transparent listener.
const HTTP_PROXY: &str = "127.0.0.1:15080";
/// The page of the TLS upstream (nginx on the external host, port 443).
const TLS_PAGE: &str = "Welcome to the TLS host\n";

/// What a row sends.
#[derive(Clone, Copy)]
enum Request {
    /// HTTP/1.x bytes; `{p}` becomes the row's unique path, which finds its access log line.
    Raw(&'static str),
    /// HTTP/2 prior knowledge (nghttp) with this `:authority` and, if given, a `host` header.
    H2(&'static str, Option<&'static str>),
    /// A TLS handshake with this SNI (none: `-noservername`), then `GET /` inside.
    Tls(Option<&'static str>),
}

/// What must come back.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// A registered endpoint's page (the external host's; for TLS rows the TLS host's).
    Page,
    /// Envoy's registry-only answer: `502`, `server: envoy`, empty body.
    Blocked,
    /// `400 Bad Request`.
    BadRequest,
    /// `426 Upgrade Required`: HTTP/1.0, refused as Istio's Envoy does by default.
    UpgradeRequired,
    /// Closed without a byte.
    Closed,
}

/// Where a row goes through the transparent listener: the destination the client dials.
#[derive(Clone, Copy)]
enum Via {
    /// Dial this address (redirected to the proxy by iptables).
    Transparent(&'static str, Expect),
    /// Request to the explicit proxy.
    Explicit(Expect),
}

struct Row {
    name: &'static str,
    send: Request,
    /// The requested host as the access log must show it on a refusal (`None`: no host was
    /// sent, only the original destination is checked).
    host: Option<&'static str>,
    via: &'static [Via],
}

const ROGUE_80: &str = "10.50.3.3:80";
const ROGUE_443: &str = "10.50.3.3:443";

use Expect::{BadRequest, Blocked, Closed, Page, UpgradeRequired};
use Request::{H2, Raw, Tls};
use Via::{Explicit, Transparent};

/// The table. `Transparent(dest, ..)` dials `dest` from the pod; `Explicit(..)` sends the same
/// bytes to the explicit proxy.
const ROWS: &[Row] = &[
    Row {
        name: "registered Host to an unregistered IP",
        send: Raw("GET {p} HTTP/1.1\r\nHost: app.internal.com\r\nConnection: close\r\n\r\n"),
        host: Some("app.internal.com"),
        via: &[
            Transparent(ROGUE_80, Page),
            Transparent("[fd00:50::33]:80", Page),
            Transparent("[::ffff:10.50.3.3]:80", Page),
            Explicit(Page),
        ],
    },
    Row {
        name: "the unregistered IP as Host",
        send: Raw("GET {p} HTTP/1.1\r\nHost: 10.50.3.3\r\nConnection: close\r\n\r\n"),
        host: Some("10.50.3.3"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "absolute-form registered URL, Host of the unregistered IP",
        send: Raw(
            "GET http://app.internal.com{p} HTTP/1.1\r\nHost: 10.50.3.3\r\nConnection: close\r\n\r\n",
        ),
        host: Some("app.internal.com"),
        via: &[Transparent(ROGUE_80, Page), Explicit(Page)],
    },
    Row {
        name: "absolute-form unregistered URL, registered Host",
        send: Raw(
            "GET http://10.50.3.3{p} HTTP/1.1\r\nHost: app.internal.com\r\nConnection: close\r\n\r\n",
        ),
        host: Some("10.50.3.3"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "duplicate Host headers, registered first",
        send: Raw(
            "GET {p} HTTP/1.1\r\nHost: app.internal.com\r\nHost: 10.50.3.3\r\nConnection: close\r\n\r\n",
        ),
        host: None,
        via: &[Transparent(ROGUE_80, BadRequest), Explicit(BadRequest)],
    },
    Row {
        name: "duplicate Host headers, unregistered first",
        send: Raw(
            "GET {p} HTTP/1.1\r\nHost: 10.50.3.3\r\nHost: app.internal.com\r\nConnection: close\r\n\r\n",
        ),
        host: None,
        via: &[Transparent(ROGUE_80, BadRequest), Explicit(BadRequest)],
    },
    Row {
        name: "HTTP/1.0 without Host",
        send: Raw("GET {p} HTTP/1.0\r\n\r\n"),
        host: None,
        via: &[
            Transparent(ROGUE_80, UpgradeRequired),
            Transparent("10.50.0.1:80", UpgradeRequired),
            Explicit(UpgradeRequired),
        ],
    },
    Row {
        name: "trailing dot",
        send: Raw("GET {p} HTTP/1.1\r\nHost: app.internal.com.\r\nConnection: close\r\n\r\n"),
        host: Some("app.internal.com."),
        // Envoy's virtual hosts compare the Host as sent: no domain has the dot.
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "mixed case",
        send: Raw("GET {p} HTTP/1.1\r\nHost: APP.Internal.COM\r\nConnection: close\r\n\r\n"),
        host: Some("APP.Internal.COM"),
        via: &[Transparent(ROGUE_80, Page), Explicit(Page)],
    },
    Row {
        // Intercepted, the port the client dialled decides and the authority's is ignored,
        // as in Istio's route tables; the explicit proxy has only the authority's port.
        name: "registered name with an unregistered port",
        send: Raw(
            "GET http://app.internal.com:22{p} HTTP/1.1\r\nHost: app.internal.com:22\r\nConnection: close\r\n\r\n",
        ),
        host: Some("app.internal.com:22"),
        via: &[Transparent(ROGUE_80, Page), Explicit(Blocked)],
    },
    Row {
        name: "absolute-form https URL",
        send: Raw(
            "GET https://app.internal.com{p} HTTP/1.1\r\nHost: app.internal.com\r\nConnection: close\r\n\r\n",
        ),
        host: None,
        via: &[Transparent(ROGUE_80, BadRequest), Explicit(BadRequest)],
    },
    Row {
        name: "IDNA punycode look-alike",
        send: Raw("GET {p} HTTP/1.1\r\nHost: xn--pp-8cd.internal.com\r\nConnection: close\r\n\r\n"),
        host: Some("xn--pp-8cd.internal.com"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "raw UTF-8 look-alike (Cyrillic a)",
        send: Raw("GET {p} HTTP/1.1\r\nHost: \u{430}pp.internal.com\r\nConnection: close\r\n\r\n"),
        host: None,
        via: &[Transparent(ROGUE_80, BadRequest), Explicit(BadRequest)],
    },
    Row {
        name: "IPv4 in decimal",
        send: Raw("GET {p} HTTP/1.1\r\nHost: 171049731\r\nConnection: close\r\n\r\n"),
        host: Some("171049731"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "IPv4 in decimal, absolute-form",
        send: Raw(
            "GET http://171049731{p} HTTP/1.1\r\nHost: 171049731\r\nConnection: close\r\n\r\n",
        ),
        host: Some("171049731"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "IPv4 in octal",
        send: Raw(
            "GET http://012.062.03.03{p} HTTP/1.1\r\nHost: 012.062.03.03\r\nConnection: close\r\n\r\n",
        ),
        host: Some("012.062.03.03"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "IPv4 in hex",
        send: Raw(
            "GET http://0xa.0x32.3.3{p} HTTP/1.1\r\nHost: 0xa.0x32.3.3\r\nConnection: close\r\n\r\n",
        ),
        host: Some("0xa.0x32.3.3"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "the endpoint's IP in decimal",
        send: Raw(
            "GET http://171048961{p} HTTP/1.1\r\nHost: 171048961\r\nConnection: close\r\n\r\n",
        ),
        host: Some("171048961"),
        via: &[Transparent("10.50.0.1:80", Blocked), Explicit(Blocked)],
    },
    Row {
        name: "IPv6 literal",
        send: Raw(
            "GET http://[fd00:50::33]{p} HTTP/1.1\r\nHost: [fd00:50::33]\r\nConnection: close\r\n\r\n",
        ),
        host: Some("[fd00:50::33]"),
        via: &[Transparent("[fd00:50::33]:80", Blocked), Explicit(Blocked)],
    },
    Row {
        name: "IPv4-mapped IPv6 literal",
        send: Raw(
            "GET http://[::ffff:10.50.3.3]{p} HTTP/1.1\r\nHost: [::ffff:10.50.3.3]\r\nConnection: close\r\n\r\n",
        ),
        host: Some("[::ffff:10.50.3.3]"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "userinfo: registered name as user, unregistered host",
        send: Raw(
            "GET http://app.internal.com@10.50.3.3{p} HTTP/1.1\r\nHost: 10.50.3.3\r\nConnection: close\r\n\r\n",
        ),
        host: Some("10.50.3.3"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "userinfo in the Host header",
        send: Raw("GET {p} HTTP/1.1\r\nHost: user@app.internal.com\r\nConnection: close\r\n\r\n"),
        host: Some("user@app.internal.com"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to an IP literal",
        send: Raw(
            "CONNECT 10.50.3.3:80 HTTP/1.1\r\nHost: 10.50.3.3:80\r\nConnection: close\r\n\r\n",
        ),
        host: Some("10.50.3.3:80"),
        via: &[Transparent(ROGUE_80, Blocked), Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to the endpoint's IP",
        send: Raw(
            "CONNECT 10.50.0.1:80 HTTP/1.1\r\nHost: 10.50.0.1:80\r\nConnection: close\r\n\r\n",
        ),
        host: Some("10.50.0.1:80"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to an IPv4-mapped literal",
        send: Raw(
            "CONNECT [::ffff:10.50.3.3]:80 HTTP/1.1\r\nHost: [::ffff:10.50.3.3]:80\r\nConnection: close\r\n\r\n",
        ),
        host: Some("[::ffff:10.50.3.3]:80"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to a decimal IPv4",
        send: Raw(
            "CONNECT 171049731:80 HTTP/1.1\r\nHost: 171049731:80\r\nConnection: close\r\n\r\n",
        ),
        host: Some("171049731:80"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to a registered name on an unregistered port",
        send: Raw(
            "CONNECT app.internal.com:22 HTTP/1.1\r\nHost: app.internal.com:22\r\nConnection: close\r\n\r\n",
        ),
        host: Some("app.internal.com:22"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to a registered name (control)",
        send: Raw(
            "CONNECT app.internal.com:80 HTTP/1.1\r\nHost: app.internal.com:80\r\n\r\nGET / HTTP/1.1\r\nHost: app.internal.com\r\nConnection: close\r\n\r\n",
        ),
        host: None,
        via: &[Explicit(Page)],
    },
    Row {
        name: "the admin port through the proxy",
        send: Raw(
            "GET http://127.0.0.1:15000/config_dump{p} HTTP/1.1\r\nHost: 127.0.0.1:15000\r\nConnection: close\r\n\r\n",
        ),
        host: Some("127.0.0.1:15000"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "CONNECT to the admin port",
        send: Raw(
            "CONNECT 127.0.0.1:15000 HTTP/1.1\r\nHost: 127.0.0.1:15000\r\nConnection: close\r\n\r\n",
        ),
        host: Some("127.0.0.1:15000"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "the explicit proxy's own port through itself",
        send: Raw(
            "GET http://127.0.0.1:15080{p} HTTP/1.1\r\nHost: 127.0.0.1:15080\r\nConnection: close\r\n\r\n",
        ),
        host: Some("127.0.0.1:15080"),
        via: &[Explicit(Blocked)],
    },
    Row {
        name: "the admin port via the pod IP",
        send: Raw(
            "GET /config_dump{p} HTTP/1.1\r\nHost: 10.50.1.1:15000\r\nConnection: close\r\n\r\n",
        ),
        host: None,
        via: &[Transparent("10.50.1.1:15000", Closed)],
    },
    Row {
        name: "the outbound listener via the pod IP",
        send: Raw("GET {p} HTTP/1.1\r\nHost: app.internal.com\r\nConnection: close\r\n\r\n"),
        host: None,
        via: &[Transparent("10.50.1.1:15001", Closed)],
    },
    Row {
        name: "the explicit proxy port via the pod IP",
        send: Raw(
            "GET http://app.internal.com{p} HTTP/1.1\r\nHost: 10.50.1.1:15080\r\nConnection: close\r\n\r\n",
        ),
        host: None,
        via: &[Transparent("10.50.1.1:15080", Closed)],
    },
    Row {
        name: "HTTP/2 :authority registered, host unregistered",
        send: H2("app.internal.com", Some("10.50.3.3")),
        host: None,
        via: &[Transparent(ROGUE_80, BadRequest)],
    },
    Row {
        name: "HTTP/2 :authority unregistered, host registered",
        send: H2("10.50.3.3", Some("app.internal.com")),
        host: None,
        via: &[Transparent(ROGUE_80, BadRequest)],
    },
    Row {
        name: "HTTP/2 registered :authority to an unregistered IP",
        send: H2("app.internal.com", None),
        host: Some("app.internal.com"),
        via: &[Transparent(ROGUE_80, Page)],
    },
    Row {
        name: "HTTP/2 unregistered :authority",
        send: H2("10.50.3.3", None),
        host: Some("10.50.3.3"),
        via: &[Transparent(ROGUE_80, Blocked)],
    },
    Row {
        name: "registered SNI to an unregistered IP",
        send: Tls(Some("tls.internal.com")),
        host: Some("tls.internal.com"),
        via: &[Transparent(ROGUE_443, Page)],
    },
    Row {
        name: "mixed-case SNI",
        send: Tls(Some("TLS.Internal.COM")),
        host: Some("TLS.Internal.COM"),
        via: &[Transparent(ROGUE_443, Page)],
    },
    Row {
        name: "SNI with a trailing dot",
        send: Tls(Some("tls.internal.com.")),
        host: Some("tls.internal.com."),
        via: &[Transparent(ROGUE_443, Page)],
    },
    Row {
        name: "registered SNI on an unregistered port",
        send: Tls(Some("tls.internal.com")),
        host: Some("tls.internal.com"),
        via: &[Transparent("10.50.3.3:8443", Closed)],
    },
    Row {
        name: "SNI of a name registered on another port",
        send: Tls(Some("app.internal.com")),
        host: Some("app.internal.com"),
        via: &[Transparent(ROGUE_443, Closed)],
    },
    Row {
        name: "unregistered SNI",
        send: Tls(Some("rogue.example.com")),
        host: Some("rogue.example.com"),
        via: &[Transparent(ROGUE_443, Closed)],
    },
    Row {
        name: "punycode SNI look-alike",
        send: Tls(Some("xn--tl-ojc.internal.com")),
        host: Some("xn--tl-ojc.internal.com"),
        via: &[Transparent(ROGUE_443, Closed)],
    },
    Row {
        name: "no SNI",
        send: Tls(None),
        host: None,
        via: &[
            Transparent(ROGUE_443, Closed),
            Transparent("10.50.0.1:443", Closed),
        ],
    },
];

/// What came back, reduced to the table's vocabulary (`None`: something else entirely).
fn classify(text: &str, received: usize, timed_out: bool) -> Option<Expect> {
    let lower = text.to_ascii_lowercase();
    if lower.contains("sink") {
        return None;
    }
    if text.contains(EXTERNAL_MARK) || text.contains(TLS_PAGE.trim()) {
        return Some(Page);
    }
    if (lower.starts_with("http/1.1 502") || lower.starts_with("http/1.0 502"))
        && lower.contains("server: envoy")
    {
        return Some(Blocked);
    }
    if lower.starts_with("http/1.1 400") || lower.starts_with("http/1.0 400") {
        return Some(BadRequest);
    }
    if lower.starts_with("http/1.1 426") || lower.starts_with("http/1.0 426") {
        return Some(UpgradeRequired);
    }
    (received == 0 && !timed_out).then_some(Closed)
}

/// What one row's request got back.
struct Outcome {
    got: Option<Expect>,
    /// The TCP handshake completed (to the proxy, or to whatever answered instead).
    connected: bool,
    /// For the failure report.
    line: String,
}

/// Sends `row` along `via`.
fn send(lab: &mut Lab, row: &Row, path: &str, via: Via) -> anyhow::Result<Outcome> {
    let dest = match via {
        Transparent(dest, _) => dest,
        Explicit(_) => HTTP_PROXY,
    };
    match row.send {
        Raw(template) => {
            let payload = template.replace("{p}", path);
            let seen = lab.connect(Role::Pod, dest, &payload, 5)?;
            let data = seen.line.split_once("data=").map_or("", |(_, d)| d);
            Ok(Outcome {
                got: classify(data, seen.received, seen.end == "timeout"),
                connected: seen.connected,
                line: seen.line.clone(),
            })
        }
        H2(authority, host) => {
            let mut args = vec![
                "-v".to_owned(),
                "-t".to_owned(),
                "5".to_owned(),
                format!("http://{dest}{path}"),
                "-H".to_owned(),
                format!(":authority: {authority}"),
            ];
            if let Some(host) = host {
                args.push("-H".to_owned());
                args.push(format!("host: {host}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = lab.output_in(Role::Pod, "nghttp", &args, Duration::from_secs(15))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let status = text
                .lines()
                .find_map(|l| l.split_once(":status: ").map(|(_, s)| s.trim().to_owned()));
            let got = match status.as_deref() {
                Some("200") if text.contains(EXTERNAL_MARK) => Some(Page),
                Some("502") if text.contains("server: envoy") => Some(Blocked),
                Some("400") => Some(BadRequest),
                None if !text.contains("recv DATA") => Some(Closed),
                _ => None,
            };
            Ok(Outcome {
                got,
                connected: true,
                line: format!("nghttp -> status {status:?}"),
            })
        }
        Tls(sni) => {
            let sni = sni.map_or_else(
                || "-noservername".to_owned(),
                |s| format!("-servername {s}"),
            );
            let host = match row.send {
                Tls(Some(s)) => s,
                _ => "none",
            };
            let out = lab.shell(
                Role::Pod,
                &format!(
                    "printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | timeout 10 \
                     openssl s_client -quiet -connect {dest} {sni} 2>&1"
                ),
            )?;
            let got = if out.contains(TLS_PAGE.trim()) {
                Some(Page)
            } else if out.contains("HTTP/") || out.contains("sink") {
                None
            } else {
                Some(Closed)
            };
            Ok(Outcome {
                got,
                connected: true,
                line: format!(
                    "openssl s_client -> {:?}",
                    portcullis_e2e::cmd::tail(&out, 3)
                ),
            })
        }
    }
}

/// The lab: the app service on port 80 (external host), a TLS service on 443 served by an
/// nginx with a test certificate, rogue listeners on every port a row dials, portcullis with
/// both the transparent listener and the explicit proxy.
fn bypass_lab(lab: &mut Lab) -> anyhow::Result<Vec<Sink>> {
    let cert = lab.make_certificate(&["tls.internal.com"])?;
    let servers = format!(
        "    server {{
        listen {EXTERNAL_IP}:443 ssl;
        ssl_certificate {};
        ssl_certificate_key {};
        root {{html}};
    }}",
        cert.cert.display(),
        cert.key.display()
    );
    lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8099)?;
    let mut sinks = Vec::new();
    for addr in [
        ROGUE_80.to_owned(),
        ROGUE_443.to_owned(),
        format!("{ROGUE_IP}:8443"),
        format!("{ROGUE_IP}:22"),
        format!("[{ROGUE_IP6}]:80"),
    ] {
        sinks.push(lab.start_sink(Role::Rogue, &addr)?);
    }
    lab.write_registry_only()?;
    lab.write_app_service()?;
    lab.write_config(
        "tls.yaml",
        &service_entry(
            "tls",
            &["tls.internal.com"],
            443,
            "TLS",
            "STATIC",
            SELECT_EXTERNAL,
        ),
    )?;
    lab.apply_iptables()?;
    lab.start_portcullis(&["--http-proxy", HTTP_PROXY])?;
    Ok(sinks)
}

/// The parts a refusal's log line must hold: the row's path when the proxy answered over
/// HTTP, the requested host or SNI when one was read, and the original destination (an
/// IPv4-mapped address is logged as the IPv4 address it is).
fn log_parts(row: &Row, path: &str, via: Via, got: Expect) -> Vec<String> {
    let mut parts = Vec::new();
    let http = matches!(row.send, Raw(_) | H2(..));
    let answered = got != Closed;
    if http && answered && matches!(row.send, Raw(t) if t.contains("{p}"))
        || matches!(row.send, H2(..))
    {
        parts.push(path.to_owned());
    }
    if let Some(host) = row.host
        && (answered || !http)
    {
        parts.push(host.to_owned());
    }
    if let Transparent(dest, _) = via {
        parts.push(match dest.strip_prefix("[::ffff:") {
            Some(v4) => v4.replacen("]:", ":", 1),
            None => dest.to_owned(),
        });
    }
    parts
}

/// Every row of [`ROWS`] along every path it names, in one shared lab.
#[test]
fn no_bypass() {
    run("bypass", |lab| {
        let sinks = bypass_lab(lab)?;
        let mut failures = String::new();
        for (i, row) in ROWS.iter().enumerate() {
            for (j, &via) in row.via.iter().enumerate() {
                let path = format!("/?bypass-{i}-{j}");
                let want = match via {
                    Transparent(_, e) | Explicit(e) => e,
                };
                let mode = match via {
                    Transparent(dest, _) => format!("transparent to {dest}"),
                    Explicit(_) => "explicit proxy".to_owned(),
                };
                let log_before = lab.portcullis_output().len();
                let Outcome {
                    got,
                    connected,
                    line,
                } = send(lab, row, &path, via)?;
                lab.note(format!(
                    "row {:?} {mode}: got {got:?}, want {want:?}",
                    row.name
                ));
                if got != Some(want) {
                    let _ = writeln!(
                        failures,
                        "  {} ({mode}): want {want:?}, got {got:?}: {line}",
                        row.name
                    );
                }
                let rogue: usize = sinks.iter().map(|s| lab.sink_accepts(s)).sum();
                if rogue > 0 {
                    let _ = writeln!(
                        failures,
                        "  {} ({mode}): THE ROGUE HOST SAW A CONNECTION",
                        row.name
                    );
                    anyhow::bail!("bypass:\n{failures}");
                }
                // Nothing to log when nothing answered the handshake (a port nobody listens
                // on and that is not captured, like the pod's own address).
                let Some(refusal) = got.filter(|g| *g != Page && connected) else {
                    continue;
                };
                let parts = log_parts(row, &path, via, refusal);
                let logged = poll(
                    "the refusal's access log line",
                    Duration::from_secs(2),
                    || {
                        let log = lab.portcullis_output();
                        Ok(log
                            .get(log_before..)
                            .unwrap_or_default()
                            .lines()
                            .any(|l| parts.iter().all(|p| l.contains(p.as_str())))
                            .then_some(()))
                    },
                );
                if logged.is_err() {
                    let _ = writeln!(
                        failures,
                        "  {} ({mode}): refused, but no access log line holds all of {parts:?}",
                        row.name
                    );
                }
            }
        }
        ensure!(failures.is_empty(), "rows that do not hold:\n{failures}");
        lab.expect_running()
    });
}
