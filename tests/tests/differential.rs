//! Differential tests against real Envoy 1.40: each scenario is written once, as the
//! listeners, routes and clusters istiod builds for a sidecar's outbound side, and the probes.
//! The repo's control plane serves those resources over ADS to portcullis and to Envoy, each
//! in one of two identical pods; the same clients must see the same status, proxy-owned
//! headers, body, answering endpoint, closed-vs-reset, and access-log flags, cluster, route
//! and request id (see `portcullis_e2e::envoy`). The seed scenario also runs portcullis from the Istio YAML
//! istiod would compile, which covers portcullis's own compilation against the same Envoy.

use std::time::Duration;

use serde_json::{Value, json};

use portcullis_e2e::Lab;
use portcullis_e2e::envoy::istio::{
    Mode, Resources, cluster_name, dns_cluster, http_listener, original_dst_cluster, retry_policy,
    service_vhost, static_cluster, tcp_listener, tls_listener, to_cluster, to_weighted, vs_route,
    vs_vhost,
};
use portcullis_e2e::envoy::{Probe, Scenario, TLS_PAGE, run_differential};
use portcullis_e2e::scenario::{
    APP_HOST, APP_VIP, EXTERNAL_IP, IN_CLUSTER_IP, POD, ROGUE_IP, SERVICE_ENTRY, WORKLOAD_ENTRY,
};
use portcullis_e2e::{DNS_IP, Role, poll};

/// Enough requests that two endpoints chosen at random both answer. A miss is 1 in 2^23 a
/// probe; at 12 (1 in 2^11) some twenty probes a run failed one CI run in about a hundred.
const SPREAD: usize = 24;

// Each constant names a row of the README's "Differences from Istio/Envoy"; the probes
// marked with it must show the difference (see `Probe::differs`).

/// The README row on pod IPs (files only: over xDS a pod is reached as Envoy reaches it).
const POD_IP_REGISTERED: &str = "README, Differences from Istio/Envoy: a ready pod's IP is a \
                                 registered destination on any port (Istio: only through its \
                                 services' listeners)";
/// The README row on plain HTTP where istiod built no HTTP listener.
const HTTP_WITHOUT_LISTENER: &str = "README, Differences from Istio/Envoy: plain HTTP on a port \
                                     with no HTTP service is sniffed (502 `block_all`, or \
                                     proxied as HTTP through `allow_any`); Envoy carries it as \
                                     opaque TCP on the default chain";
/// The README row on HTTP/1.0.
const HTTP10: &str = "README, Differences from Istio/Envoy: HTTP/1.0 gets a 426; istiod's HTTP \
                      chains match only http/1.1 and h2c, so Envoy sends it to the default \
                      chain (reset with `UH`, or passed through under ALLOW_ANY)";
/// The README row on plain HTTP to a TLS port.
const HTTP_ON_TLS_PORT: &str = "README, Differences from Istio/Envoy: plain HTTP on a port with \
                                only TLS services gets the 502 of `block_all`; Envoy resets \
                                it on the default chain (`UH`)";
/// The README row on direct responses.
const DIRECT_RESPONSE_HEAD: &str = "README, Differences from Istio/Envoy: a direct response's \
                                    reason phrase is the standard one (`418 I'm a teapot`, \
                                    Envoy: `Unknown` for codes it has no name for) and a 204 \
                                    carries `content-length: 0`";
/// Istio YAML files (name, content) for the files lab.
fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(name, yaml)| ((*name).to_owned(), (*yaml).to_owned()))
        .collect()
}

/// A certificate for `names` and an nginx serving [`TLS_PAGE`] with it on 10.50.0.1:443.
fn tls_server(lab: &mut Lab, names: &[&str]) -> anyhow::Result<()> {
    let cert = lab.make_certificate(names)?;
    let servers = cert.nginx_tls_server(&format!("{EXTERNAL_IP}:443"));
    lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8443)?;
    Ok(())
}

/// The seed guide's final state: app.internal.com served by the external host's
/// WorkloadEntry and the in-cluster pod; everything else refused.
#[test]
fn seed_guide_http_by_host() {
    let app_url = format!("http://{APP_HOST}/");
    let rogue_url = format!("http://{ROGUE_IP}/");
    let scenario = Scenario {
        name: "seed",
        files: files(&[
            ("workloadentry.yaml", WORKLOAD_ENTRY),
            ("serviceentry.yaml", SERVICE_ENTRY),
            ("pod.yaml", POD),
        ]),
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(
                80,
                vec![service_vhost(APP_HOST, 80, &[])],
                Mode::RegistryOnly,
            ))
            .cluster(static_cluster(
                80,
                APP_HOST,
                &[(EXTERNAL_IP, 80), (IN_CLUSTER_IP, 80)],
            )),
        portcullis_flags: vec![],
        probes: vec![
            Probe::spread("registered host, both endpoints", &[&app_url], SPREAD),
            Probe::spread(
                "registered host over h2c",
                &["--http2-prior-knowledge", &app_url],
                SPREAD,
            ),
            Probe::spread(
                "Host with the port",
                &["-H", "Host: app.internal.com:80", &app_url],
                SPREAD,
            ),
            Probe::spread(
                "Host in upper case",
                &["-H", "Host: APP.Internal.COM", &app_url],
                SPREAD,
            ),
            Probe::curl(
                "Host with a trailing dot",
                &["-H", "Host: app.internal.com.", &app_url],
            ),
            Probe::spread(
                "absolute-form URI naming the registered host, sent to the rogue",
                &["--request-target", &app_url, &rogue_url],
                SPREAD,
            ),
            Probe::curl(
                "absolute-form URI naming an unregistered host, Host registered",
                &[
                    "--request-target",
                    "http://example.org/",
                    "-H",
                    "Host: app.internal.com",
                    &rogue_url,
                ],
            ),
            Probe::curl(
                "unregistered IP literal",
                &[&format!("http://{EXTERNAL_IP}/")],
            ),
            Probe::curl(
                "unregistered name",
                &[
                    "--resolve",
                    &format!("example.org:80:{ROGUE_IP}"),
                    "http://example.org/",
                ],
            ),
            Probe::curl(
                "unregistered, POST with a body",
                &["-d", "payload", &format!("http://{EXTERNAL_IP}/")],
            ),
            Probe::curl(
                "unregistered over h2c",
                &["--http2-prior-knowledge", &format!("http://{EXTERNAL_IP}/")],
            ),
            Probe::curl("HTTP/1.0", &["-0", &app_url]).differs(HTTP10),
            Probe::curl(
                "registered host on a port without services",
                &[&format!("http://{APP_HOST}:8080/")],
            )
            .differs(HTTP_WITHOUT_LISTENER),
            Probe::tcp(
                "request without Host",
                &format!("{APP_VIP}:80"),
                "GET / HTTP/1.1\r\n\r\n",
            ),
            Probe::tcp(
                "non-HTTP bytes on the HTTP port",
                &format!("{EXTERNAL_IP}:80"),
                "hello there\n",
            ),
            Probe::curl(
                "the in-cluster pod's IP",
                &[&format!("http://{IN_CLUSTER_IP}/")],
            )
            .differs_from_files(POD_IP_REGISTERED),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[])?;
        lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:80"))?;
        Ok(())
    });
}

/// The address of the TLS service that has one.
const TLS_VIP: &str = "10.50.200.4";

/// TLS and HTTPS services without addresses on port 443, routed by SNI, and one with an
/// address, routed by it; bytes pass through.
#[test]
fn tls_by_sni() {
    let mut envoy = Resources::new(Mode::RegistryOnly)
        .listener(tls_listener(
            443,
            &["tls.internal.com", "secure.internal.com"],
            Mode::RegistryOnly,
        ))
        .listener(tcp_listener(TLS_VIP, 443, "vip-tls.internal.com"));
    for host in [
        "tls.internal.com",
        "secure.internal.com",
        "vip-tls.internal.com",
    ] {
        envoy = envoy.cluster(static_cluster(443, host, &[(EXTERNAL_IP, 443)]));
    }
    let scenario = Scenario {
        name: "tls",
        files: Vec::new(),
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl("TLS service by SNI", &["-k", "https://tls.internal.com/"]),
            Probe::curl(
                "HTTPS service by SNI",
                &["-k", "https://secure.internal.com/"],
            ),
            Probe::curl("SNI in upper case", &["-k", "https://TLS.INTERNAL.COM/"]),
            Probe::curl(
                "registered SNI dialled to the rogue's address",
                &[
                    "-k",
                    "--resolve",
                    &format!("tls.internal.com:443:{ROGUE_IP}"),
                    "https://tls.internal.com/",
                ],
            ),
            Probe::curl(
                "unregistered SNI",
                &[
                    "-k",
                    "--resolve",
                    &format!("other.example:443:{EXTERNAL_IP}"),
                    "https://other.example/",
                ],
            ),
            Probe::curl("no SNI", &["-k", &format!("https://{EXTERNAL_IP}/")]),
            Probe::curl(
                "registered SNI on a port without services",
                &["-k", "https://tls.internal.com:8443/"],
            )
            .close_races(),
            Probe::curl(
                "plaintext HTTP on the TLS port",
                &["http://tls.internal.com:443/"],
            )
            .differs(HTTP_ON_TLS_PORT),
            Probe::curl(
                "TLS service with an address, by SNI",
                &[
                    "-k",
                    "--resolve",
                    &format!("vip-tls.internal.com:443:{TLS_VIP}"),
                    "https://vip-tls.internal.com/",
                ],
            ),
            Probe::curl(
                "TLS service with an address, no SNI",
                &["-k", &format!("https://{TLS_VIP}/")],
            ),
            Probe::curl(
                "TLS service with an address, another SNI",
                &[
                    "-k",
                    "--resolve",
                    &format!("other.example:443:{TLS_VIP}"),
                    "https://other.example/",
                ],
            ),
            Probe::curl(
                "plaintext HTTP to the TLS service's address",
                &[&format!("http://{TLS_VIP}:443/")],
            ),
            Probe::tcp(
                "garbage on the TLS port",
                &format!("{EXTERNAL_IP}:443"),
                "hello there\n",
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&["tls.internal.com", "secure.internal.com"])?;
        tls_server(lab, &["tls.internal.com", "secure.internal.com"])?;
        lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:443"))?;
        Ok(())
    });
}

/// The VIP of the opaque TCP service.
const TCP_VIP: &str = "10.50.200.2";
/// The VIP of the HTTP service with an address.
const WEB_VIP: &str = "10.50.200.5";

/// Services with addresses, and a port-wide one: opaque TCP on a VIP (its own listener, never
/// sniffed), TCP without addresses (claims its port), HTTP whose VIP is also a domain.
#[test]
fn tcp_by_vip() {
    let web_url = format!("http://{WEB_VIP}/");
    let scenario = Scenario {
        name: "tcp",
        files: Vec::new(),
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(tcp_listener(TCP_VIP, 9000, "tcp.internal.com"))
            .listener(tcp_listener("0.0.0.0", 9100, "tcpany.internal.com"))
            .listener(http_listener(
                80,
                vec![service_vhost("web.internal.com", 80, &[WEB_VIP])],
                Mode::RegistryOnly,
            ))
            .cluster(static_cluster(
                9000,
                "tcp.internal.com",
                &[(EXTERNAL_IP, 9000)],
            ))
            .cluster(static_cluster(
                9100,
                "tcpany.internal.com",
                &[(EXTERNAL_IP, 9100)],
            ))
            .cluster(static_cluster(80, "web.internal.com", &[(EXTERNAL_IP, 80)])),
        portcullis_flags: vec![],
        probes: vec![
            Probe::tcp("the VIP and port", &format!("{TCP_VIP}:9000"), "hello\n"),
            Probe::curl(
                "HTTP to the VIP passes as bytes",
                &[&format!("http://{TCP_VIP}:9000/")],
            ),
            Probe::tcp(
                "the VIP, another port",
                &format!("{TCP_VIP}:9001"),
                "hello\n",
            )
            .close_races(),
            Probe::tcp(
                "another address, the same port",
                "10.50.200.3:9000",
                "hello\n",
            )
            .close_races(),
            Probe::tcp(
                "the endpoint's own address",
                &format!("{EXTERNAL_IP}:9000"),
                "hello\n",
            )
            .close_races(),
            Probe::tcp(
                "a port claimed by a TCP service without addresses",
                &format!("{ROGUE_IP}:9100"),
                "hello\n",
            ),
            Probe::curl(
                "HTTP on the claimed port",
                &[&format!("http://{ROGUE_IP}:9100/")],
            ),
            Probe::curl(
                "HTTP to the web service's VIP",
                &[&format!("http://{WEB_VIP}/")],
            ),
            Probe::curl(
                "the web service's Host sent to the rogue",
                &[
                    "-H",
                    "Host: web.internal.com",
                    &format!("http://{ROGUE_IP}/"),
                ],
            ),
            Probe::curl(
                "one connection: the web service, then an unregistered Host",
                &[&web_url, "--next", "-H", "Host: other.example", &web_url],
            ),
            Probe::curl(
                "one connection: an unregistered Host, then the web service",
                &["-H", "Host: other.example", &web_url, "--next", &web_url],
            ),
            Probe::curl(
                "HTTP on a port with no service",
                &[&format!("http://{EXTERNAL_IP}:8080/")],
            )
            .differs(HTTP_WITHOUT_LISTENER),
        ],
    };
    run_differential(scenario, |lab| {
        lab.start_sink(Role::External, &format!("{EXTERNAL_IP}:9000"))?;
        lab.start_sink(Role::External, &format!("{EXTERNAL_IP}:9100"))?;
        Ok(())
    });
}

/// A TCP service whose DestinationRule sets `connectionPool.tcp.maxConnectionDuration: 1s`
/// (istiod: the `tcp_proxy`'s `max_downstream_connection_duration`). A connection that
/// stays open (the client sends nothing, the sink waits 3 s for bytes) is closed at 1 s with
/// `DT`; one that ends on its own before has no flag.
#[test]
fn tcp_max_connection_duration() {
    let mut listener = tcp_listener(TCP_VIP, 9000, "tcp.internal.com");
    listener["filter_chains"][0]["filters"][0]["typed_config"]["max_downstream_connection_duration"] =
        json!("1s");
    let addr = format!("{TCP_VIP}:9000");
    let scenario = Scenario {
        name: "tcp-max-duration",
        files: vec![(
            "tcp.yaml".to_owned(),
            format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tcp, namespace: default}}
spec:
  hosts: [tcp.internal.com]
  addresses: [{TCP_VIP}]
  ports: [{{number: 9000, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tcp, namespace: default}}
spec:
  host: tcp.internal.com
  trafficPolicy:
    connectionPool: {{tcp: {{maxConnectionDuration: 1s}}}}
"
            ),
        )],
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(listener)
            .cluster(static_cluster(
                9000,
                "tcp.internal.com",
                &[(EXTERNAL_IP, 9000)],
            )),
        portcullis_flags: vec![],
        probes: vec![
            Probe::tcp("a connection that stays open", &addr, ""),
            Probe::tcp("a connection that ends before", &addr, "hello\n"),
        ],
    };
    run_differential(scenario, |lab| {
        lab.start_sink(Role::External, &format!("{EXTERNAL_IP}:9000"))?;
        Ok(())
    });
}

/// ALLOW_ANY: registered traffic as usual, everything else to its original destination.
#[test]
fn allow_any_passthrough() {
    let app_url = format!("http://{APP_HOST}/");
    let scenario = Scenario {
        name: "allowany",
        files: Vec::new(),
        envoy: Resources::new(Mode::AllowAny)
            .listener(http_listener(
                80,
                vec![service_vhost(APP_HOST, 80, &[])],
                Mode::AllowAny,
            ))
            .cluster(static_cluster(80, APP_HOST, &[(EXTERNAL_IP, 80)])),
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl("registered host", &[&app_url]),
            Probe::curl("registered host, HEAD", &["-I", &app_url]),
            Probe::curl(
                "unregistered host on an HTTP port",
                &[&format!("http://{EXTERNAL_IP}/")],
            ),
            Probe::curl(
                "unregistered host, nothing listening",
                &[&format!("http://{ROGUE_IP}/")],
            ),
            Probe::curl(
                "HTTP on a port without services",
                &[&format!("http://{ROGUE_IP}:7000/")],
            )
            .differs(HTTP_WITHOUT_LISTENER),
            Probe::curl(
                "HTTP/1.0, unregistered",
                &["-0", &format!("http://{EXTERNAL_IP}/")],
            )
            .differs(HTTP10),
            Probe::tcp(
                "opaque TCP, unregistered",
                &format!("{ROGUE_IP}:7000"),
                "hello\n",
            ),
            Probe::tcp(
                "opaque TCP, nothing listening",
                &format!("{ROGUE_IP}:7001"),
                "hello\n",
            )
            .close_races(),
            Probe::tcp(
                "port 15001 of another host",
                &format!("{ROGUE_IP}:15001"),
                "hello\n",
            )
            .close_races(),
            Probe::curl(
                "TLS to an unregistered host",
                &[
                    "-k",
                    "--resolve",
                    &format!("unknown.example:443:{EXTERNAL_IP}"),
                    "https://unknown.example/",
                ],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[])?;
        lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:7000"))?;
        lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:15001"))?;
        tls_server(lab, &["unknown.example"])?;
        Ok(())
    });
}

/// `*.wild.com` on 80 (HTTP) and 443 (TLS) with resolution NONE: the original destination,
/// with `--permissive-none-resolution` for Istio's exact behaviour.
#[test]
fn wildcard_with_resolution_none() {
    let scenario = Scenario {
        name: "wildnone",
        files: Vec::new(),
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(
                80,
                vec![service_vhost("*.wild.com", 80, &[])],
                Mode::RegistryOnly,
            ))
            .listener(tls_listener(443, &["*.wild.com"], Mode::RegistryOnly))
            .cluster(original_dst_cluster(80, "*.wild.com"))
            .cluster(original_dst_cluster(443, "*.wild.com")),
        portcullis_flags: vec!["--permissive-none-resolution"],
        probes: vec![
            Probe::curl("one label under the wildcard", &["http://a.wild.com/"]),
            Probe::curl("two labels under the wildcard", &["http://a.b.wild.com/"]),
            Probe::curl(
                "the bare domain",
                &[
                    "--resolve",
                    &format!("wild.com:80:{EXTERNAL_IP}"),
                    "http://wild.com/",
                ],
            ),
            Probe::curl(
                "a wildcard Host sent to the rogue (Istio's documented hole)",
                &["-H", "Host: a.wild.com", &format!("http://{ROGUE_IP}/")],
            ),
            Probe::curl("TLS under the wildcard", &["-k", "https://a.wild.com/"]),
            Probe::curl(
                "TLS, SNI outside the wildcard",
                &[
                    "-k",
                    "--resolve",
                    &format!("x.other.com:443:{EXTERNAL_IP}"),
                    "https://x.other.com/",
                ],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        let hosts = format!(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n\
             {EXTERNAL_IP} a.wild.com\n{EXTERNAL_IP} a.b.wild.com\n"
        );
        lab.write_pod_etc("hosts", &hosts)?;
        lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:80"))?;
        tls_server(lab, &["a.wild.com"])?;
        Ok(())
    });
}

/// An upstream on the rogue that reads a request and resets the connection.
const RESETTER: &str = "import socket, struct
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.50.3.3', 82))
s.listen(64)
print('ready', flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    c.close()
";

/// Upstream failures under Istio's default retry policy (two retries on connect failure,
/// refused stream, `unavailable`, `cancelled`, other hosts first): a refusing endpoint beside a
/// good one, only refusing endpoints, a resetting endpoint beside a good one, only resetting.
#[test]
fn upstream_failures_and_default_retries() {
    let good = (EXTERNAL_IP, 80);
    let refusing = (ROGUE_IP, 81);
    let resetting = (ROGUE_IP, 82);
    let services: [(&str, Vec<(&str, u16)>); 4] = [
        ("flaky", vec![good, refusing]),
        ("dead", vec![refusing]),
        ("shaky", vec![good, resetting]),
        ("reset", vec![resetting]),
    ];
    let mut envoy = Resources::new(Mode::RegistryOnly).listener(http_listener(
        80,
        services
            .iter()
            .map(|(name, _)| service_vhost(&format!("{name}.internal.com"), 80, &[]))
            .collect(),
        Mode::RegistryOnly,
    ));
    for (name, endpoints) in &services {
        envoy = envoy.cluster(static_cluster(
            80,
            &format!("{name}.internal.com"),
            endpoints,
        ));
    }
    let scenario = Scenario {
        name: "failures",
        files: Vec::new(),
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::spread(
                "a refusing endpoint beside a good one",
                &["http://flaky.internal.com/"],
                SPREAD,
            ),
            Probe::curl("only refusing endpoints", &["http://dead.internal.com/"]),
            Probe::spread(
                "a resetting endpoint beside a good one",
                &["http://shaky.internal.com/"],
                SPREAD,
            ),
            Probe::curl("only resetting endpoints", &["http://reset.internal.com/"]),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[
            "flaky.internal.com",
            "dead.internal.com",
            "shaky.internal.com",
            "reset.internal.com",
        ])?;
        lab.spawn_peer(
            Role::Rogue,
            "resetter",
            "python3",
            &["-u", "-c", RESETTER],
            "TERM",
        )?;
        poll("the resetting upstream", Duration::from_secs(10), || {
            Ok(lab.peer_stdout("resetter")?.contains("ready").then_some(()))
        })
    });
}

/// What an upstream receives, and what the client gets back from it: the headers the echo
/// server saw (Envoy's `x-forwarded-proto`, `x-request-id`, `x-envoy-attempt-count`, and what
/// happens to a client's own), over HTTP/1.1 and h2c, on both HTTP/1.1 paths, registered and
/// passed through; the access log shows the id the upstream got (every probe compares it).
#[test]
fn upstream_request_headers() {
    let url = "http://echo.internal.com:8080/headers";
    let scenario = Scenario {
        name: "headers",
        files: Vec::new(),
        envoy: Resources::new(Mode::AllowAny)
            .listener(http_listener(
                8080,
                vec![service_vhost("echo.internal.com", 8080, &[])],
                Mode::AllowAny,
            ))
            .cluster(static_cluster(
                8080,
                "echo.internal.com",
                &[(EXTERNAL_IP, 8080)],
            )),
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl("GET", &[url]),
            Probe::curl("GET over h2c", &["--http2-prior-knowledge", url]),
            Probe::curl("POST with a body", &["-d", "payload", url]),
            Probe::curl(
                "POST with a chunked body (the general path)",
                &["-H", "transfer-encoding: chunked", "-d", "payload", url],
            ),
            Probe::curl(
                "the client's own request id",
                &["-H", "x-request-id: from-the-client", url],
            ),
            Probe::curl(
                "the client's own request id over h2c",
                &[
                    "--http2-prior-knowledge",
                    "-H",
                    "x-request-id: from-the-client",
                    url,
                ],
            ),
            Probe::curl(
                "the client's own attempt count and forwarded proto",
                &[
                    "-H",
                    "x-envoy-attempt-count: 7",
                    "-H",
                    "x-forwarded-proto: https",
                    url,
                ],
            ),
            Probe::curl(
                "the client's own x-forwarded-for",
                &["-H", "x-forwarded-for: 192.0.2.7", url],
            ),
            Probe::curl(
                "an unregistered Host passed through (allow_any)",
                &["-H", "Host: other.example:8080", url],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&["echo.internal.com"])?;
        lab.start_python_peer(Role::External, "echo", &["http-echo", EXTERNAL_IP, "8080"])
    });
}

/// DNS, DNS_ROUND_ROBIN and NONE against dnsmasq in the lab: STRICT_DNS, LOGICAL_DNS and
/// ORIGINAL_DST clusters.
#[test]
fn dns_clusters() {
    let mut envoy = Resources::new(Mode::RegistryOnly).listener(http_listener(
        80,
        ["dns", "never", "both", "rr", "none"]
            .iter()
            .map(|n| service_vhost(&format!("{n}.internal.com"), 80, &[]))
            .collect(),
        Mode::RegistryOnly,
    ));
    for name in ["dns", "never", "both"] {
        envoy = envoy.cluster(dns_cluster(80, &format!("{name}.internal.com"), false));
    }
    envoy = envoy
        .cluster(dns_cluster(80, "rr.internal.com", true))
        .cluster(original_dst_cluster(80, "none.internal.com"));
    let via_vip = |host: &str| {
        [
            "--resolve".to_owned(),
            format!("{host}:80:{APP_VIP}"),
            format!("http://{host}/"),
        ]
    };
    let [a, b, c] = via_vip("dns.internal.com");
    let [d, e, f] = via_vip("never.internal.com");
    let [g, h, i] = via_vip("both.internal.com");
    let [j, k, l] = via_vip("rr.internal.com");
    let scenario = Scenario {
        name: "dns",
        files: Vec::new(),
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl("DNS, one address", &[&a, &b, &c]),
            Probe::curl("DNS, a name that never resolves", &[&d, &e, &f]),
            Probe::spread("DNS, two addresses", &[&g, &h, &i], SPREAD),
            // LOGICAL_DNS connects to the first address of the latest answer; with two
            // addresses, which one is first depends on when each proxy last re-resolved
            // (dnsmasq's TTL is 1 s), so only one address compares deterministically.
            Probe::curl("DNS_ROUND_ROBIN, one address", &[&j, &k, &l]),
            Probe::curl(
                "NONE, dialled to what the host resolves to",
                &["http://none.internal.com/"],
            ),
            Probe::curl(
                "NONE, Host sent to the rogue",
                &[
                    "-H",
                    "Host: none.internal.com",
                    &format!("http://{ROGUE_IP}/"),
                ],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        let hosts = format!(
            "{EXTERNAL_IP} dns.internal.com\n\
             {EXTERNAL_IP} both.internal.com\n{IN_CLUSTER_IP} both.internal.com\n\
             {EXTERNAL_IP} rr.internal.com\n\
             {EXTERNAL_IP} none.internal.com\n"
        );
        lab.start_dnsmasq(&hosts, "none.internal.com", EXTERNAL_IP)?;
        lab.note(format!("the pod resolves through dnsmasq on {DNS_IP}"));
        lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:80"))?;
        Ok(())
    });
}

// What istiod builds from VirtualServices (weighted destinations, redirects, direct
// responses, header rewrites, retries), served over ADS to both proxies; a third lab runs
// portcullis from the VirtualServices themselves, which istiod compiles into those resources.

/// STATIC ServiceEntries, one per `(host, port, endpoint ip, endpoint port)`, each with its
/// own name.
fn static_services(services: &[(&str, u16, &str, u16)]) -> String {
    services
        .iter()
        .map(|(host, port, ip, target)| {
            let name = host.split('.').next().unwrap_or(host);
            format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: http, protocol: HTTP, targetPort: {target}}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
"
            )
        })
        .collect()
}

/// Hosts that exist only for their VirtualServices: registered on port 80 (HTTP) so that
/// the sidecar imports them, with no endpoints of their own.
fn route_only_hosts(hosts: &[&str]) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: routed, namespace: default}}
spec:
  hosts: [{}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
---
",
        hosts.join(", ")
    )
}

/// The VirtualServices of [`virtual_service_routes`].
const VS_ROUTES: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split, namespace: default}
spec:
  hosts: [split.internal.com]
  http:
  - name: canary-by-header
    match: [{headers: {x-canary: {exact: 'yes'}}}]
    route: [{destination: {host: pod.internal.com}}]
  - name: split
    route:
    - {destination: {host: ext.internal.com}, weight: 50}
    - {destination: {host: pod.internal.com}, weight: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: canary, namespace: default}
spec:
  hosts: [canary.internal.com]
  http:
  - name: all-on-one
    route:
    - {destination: {host: ext.internal.com}, weight: 100}
    - {destination: {host: pod.internal.com}, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: moved, namespace: default}
spec:
  hosts: [moved.internal.com]
  http:
  - name: path
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new}
  - name: elsewhere
    match: [{uri: {prefix: /away}}]
    redirect: {authority: app.internal.com, scheme: https, port: 8443, redirectCode: 302}
  - name: keep-path
    redirect: {authority: ext.internal.com, redirectCode: 308}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: fixed, namespace: default}
spec:
  hosts: [fixed.internal.com]
  http:
  - name: teapot
    match: [{uri: {prefix: /teapot}}]
    directResponse: {status: 418, body: {string: \"short and stout\\n\"}}
  - name: empty
    match: [{uri: {prefix: /empty}}]
    directResponse: {status: 204}
  - name: maintenance
    directResponse: {status: 503, body: {string: \"down for maintenance\\n\"}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: rewrite, namespace: default}
spec:
  hosts: [rewrite.internal.com]
  http:
  - name: rewritten
    match: [{uri: {prefix: /old/}}]
    route: [{destination: {host: echo.internal.com}}]
    rewrite: {uri: /headers/new/, authority: backend.example}
    headers:
      request: {add: {x-added: by-route}, set: {x-set: by-route}, remove: [x-drop]}
      response: {add: {x-response-added: by-route}, set: {x-upstream: overwritten}}
  - name: response-removed
    match: [{uri: {prefix: /headers/}}]
    route: [{destination: {host: echo.internal.com}}]
    headers: {response: {remove: [x-upstream]}}
";

/// The external nginx as a service's only endpoint.
const EXTERNAL_CLUSTER: &str = "outbound|80||ext.internal.com";
/// The in-cluster nginx as a service's only endpoint.
const IN_CLUSTER_CLUSTER: &str = "outbound|80||pod.internal.com";
/// The echo peer on the external host's port 8080.
const ECHO_CLUSTER: &str = "outbound|8080||echo.internal.com";

/// `action` with `extra` fields merged in.
fn with(mut action: Value, extra: Value) -> Value {
    if let (Some(action), Value::Object(extra)) = (action.as_object_mut(), extra) {
        action.extend(extra);
    }
    action
}

/// A VirtualService route to one cluster with the mesh's default retries.
fn route_to(cluster: &str) -> Value {
    json!({ "route": to_cluster(cluster, None) })
}

/// The cluster of `subset` of `host` on port 80 (`outbound|80|SUBSET|HOST`), as istiod
/// builds one for each subset of a DestinationRule.
fn subset_cluster(subset: &str, host: &str, endpoint: (&str, u16)) -> Value {
    let mut cluster = static_cluster(80, host, &[endpoint]);
    let name = format!("outbound|80|{subset}|{host}");
    cluster["name"] = json!(name);
    cluster["load_assignment"]["cluster_name"] = json!(name);
    cluster
}

/// `subsets.internal.com`: the external nginx is subset v1, the in-cluster one v2.
const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: subsets, namespace: default}
spec:
  hosts: [subsets.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.50.0.1, labels: {version: v1}}
  - {address: 10.50.2.1, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: subsets, namespace: default}
spec:
  host: subsets.internal.com
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: subsets, namespace: default}
spec:
  hosts: [subsets.internal.com]
  http:
  - name: v2-by-header
    match: [{headers: {x-v2: {exact: 'yes'}}}]
    route: [{destination: {host: subsets.internal.com, subset: v2}}]
  - name: by-subset
    route:
    - {destination: {host: subsets.internal.com, subset: v1}, weight: 50}
    - {destination: {host: subsets.internal.com, subset: v2}, weight: 50}
---
";

/// Weighted destinations, redirects, direct responses, header rewrites and header matches,
/// all on port 80 beside Istio's `block_all`.
#[test]
fn virtual_service_routes() {
    let header = |key: &str, value: &str, append: &str| json!({ "header": { "key": key, "value": value }, "append_action": append });
    let v1 = "outbound|80|v1|subsets.internal.com";
    let v2 = "outbound|80|v2|subsets.internal.com";
    let vhosts = vec![
        vs_vhost(
            "subsets.internal.com",
            80,
            vec![
                json!({
                    "name": "v2-by-header",
                    "match": {
                        "prefix": "/",
                        "headers": [{ "name": "x-v2", "string_match": { "exact": "yes" } }]
                    },
                    "route": to_cluster(v2, None)
                }),
                vs_route(
                    "by-subset",
                    "/",
                    json!({ "route": to_weighted(&[(v1, 50), (v2, 50)]) }),
                ),
            ],
        ),
        vs_vhost(
            "split.internal.com",
            80,
            vec![
                json!({
                    "name": "canary-by-header",
                    "match": {
                        "prefix": "/",
                        "headers": [{ "name": "x-canary", "string_match": { "exact": "yes" } }]
                    },
                    "route": to_cluster(IN_CLUSTER_CLUSTER, None)
                }),
                vs_route(
                    "split",
                    "/",
                    json!({ "route": to_weighted(&[(EXTERNAL_CLUSTER, 50), (IN_CLUSTER_CLUSTER, 50)]) }),
                ),
            ],
        ),
        vs_vhost(
            "canary.internal.com",
            80,
            vec![vs_route(
                "all-on-one",
                "/",
                json!({ "route": to_weighted(&[(EXTERNAL_CLUSTER, 100), (IN_CLUSTER_CLUSTER, 0)]) }),
            )],
        ),
        vs_vhost(
            "moved.internal.com",
            80,
            vec![
                vs_route(
                    "path",
                    "/old",
                    json!({ "redirect": { "path_redirect": "/new", "response_code": "MOVED_PERMANENTLY" } }),
                ),
                vs_route(
                    "elsewhere",
                    "/away",
                    json!({ "redirect": {
                        "host_redirect": "app.internal.com",
                        "scheme_redirect": "https",
                        "port_redirect": 8443,
                        "response_code": "FOUND"
                    } }),
                ),
                vs_route(
                    "keep-path",
                    "/",
                    json!({ "redirect": { "host_redirect": "ext.internal.com", "response_code": "PERMANENT_REDIRECT" } }),
                ),
            ],
        ),
        vs_vhost(
            "fixed.internal.com",
            80,
            vec![
                vs_route(
                    "teapot",
                    "/teapot",
                    json!({ "direct_response": { "status": 418, "body": { "inline_string": "short and stout\n" } } }),
                ),
                vs_route(
                    "empty",
                    "/empty",
                    json!({ "direct_response": { "status": 204 } }),
                ),
                vs_route(
                    "maintenance",
                    "/",
                    json!({ "direct_response": { "status": 503, "body": { "inline_string": "down for maintenance\n" } } }),
                ),
            ],
        ),
        vs_vhost(
            "rewrite.internal.com",
            80,
            vec![
                vs_route(
                    "rewritten",
                    "/old/",
                    with(
                        json!({ "route": with(to_cluster(ECHO_CLUSTER, None), json!({
                            "prefix_rewrite": "/headers/new/",
                            "host_rewrite_literal": "backend.example"
                        })) }),
                        json!({
                            "request_headers_to_add": [
                                header("x-added", "by-route", "APPEND_IF_EXISTS_OR_ADD"),
                                header("x-set", "by-route", "OVERWRITE_IF_EXISTS_OR_ADD")
                            ],
                            "request_headers_to_remove": ["x-drop"],
                            "response_headers_to_add": [
                                header("x-response-added", "by-route", "APPEND_IF_EXISTS_OR_ADD"),
                                header("x-upstream", "overwritten", "OVERWRITE_IF_EXISTS_OR_ADD")
                            ]
                        }),
                    ),
                ),
                vs_route(
                    "response-removed",
                    "/headers/",
                    with(
                        route_to(ECHO_CLUSTER),
                        json!({ "response_headers_to_remove": ["x-upstream"] }),
                    ),
                ),
            ],
        ),
    ];
    let envoy = Resources::new(Mode::RegistryOnly)
        .listener(http_listener(80, vhosts, Mode::RegistryOnly))
        .cluster(static_cluster(80, "ext.internal.com", &[(EXTERNAL_IP, 80)]))
        .cluster(static_cluster(
            80,
            "pod.internal.com",
            &[(IN_CLUSTER_IP, 80)],
        ))
        .cluster(static_cluster(
            8080,
            "echo.internal.com",
            &[(EXTERNAL_IP, 8080)],
        ))
        .cluster(subset_cluster(
            "v1",
            "subsets.internal.com",
            (EXTERNAL_IP, 80),
        ))
        .cluster(subset_cluster(
            "v2",
            "subsets.internal.com",
            (IN_CLUSTER_IP, 80),
        ));
    let client_headers = [
        "-H",
        "x-added: by-client",
        "-H",
        "x-set: by-client",
        "-H",
        "x-drop: by-client",
    ];
    let rewritten = "http://rewrite.internal.com/old/thing?q=1";
    let mut rewrite_args = client_headers.to_vec();
    rewrite_args.push(rewritten);
    let services = [
        static_services(&[
            ("ext.internal.com", 80, EXTERNAL_IP, 80),
            ("pod.internal.com", 80, IN_CLUSTER_IP, 80),
            ("echo.internal.com", 8080, EXTERNAL_IP, 8080),
        ]),
        route_only_hosts(&[
            "split.internal.com",
            "canary.internal.com",
            "moved.internal.com",
            "fixed.internal.com",
            "rewrite.internal.com",
        ]),
        SUBSETS.to_owned(),
        VS_ROUTES.to_owned(),
    ]
    .concat();
    let scenario = Scenario {
        name: "vsroutes",
        files: vec![("routes.yaml".to_owned(), services)],
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::spread(
                "subsets weighted 50/50",
                &["http://subsets.internal.com/"],
                SPREAD,
            ),
            Probe::spread(
                "a header match to one subset",
                &["-H", "x-v2: yes", "http://subsets.internal.com/"],
                SPREAD,
            ),
            Probe::spread("weighted 50/50", &["http://split.internal.com/"], SPREAD),
            Probe::spread("weighted 100/0", &["http://canary.internal.com/"], SPREAD),
            Probe::spread(
                "a header match before the split",
                &["-H", "x-canary: yes", "http://split.internal.com/"],
                SPREAD,
            ),
            Probe::curl(
                "redirect of the path",
                &["http://moved.internal.com/old/page?x=1"],
            ),
            Probe::curl(
                "redirect to another scheme, host and port",
                &["http://moved.internal.com/away/page"],
            ),
            Probe::curl(
                "redirect of the host, path kept, 308",
                &["-d", "payload", "http://moved.internal.com/kept?y=2"],
            ),
            Probe::curl(
                "direct response with a body",
                &["http://fixed.internal.com/teapot"],
            )
            .differs(DIRECT_RESPONSE_HEAD),
            Probe::curl(
                "direct response without a body",
                &["http://fixed.internal.com/empty"],
            )
            .differs(DIRECT_RESPONSE_HEAD),
            Probe::curl(
                "direct response, HEAD",
                &["-I", "http://fixed.internal.com/down"],
            ),
            Probe::curl(
                "direct response over h2c",
                &["--http2-prior-knowledge", "http://fixed.internal.com/down"],
            ),
            Probe::curl(
                "prefix and host rewritten, request and response headers changed",
                &rewrite_args,
            ),
            Probe::curl(
                "a response header removed",
                &["http://rewrite.internal.com/headers/plain"],
            ),
            Probe::curl(
                "a path no route of the host matches",
                &["http://rewrite.internal.com/elsewhere"],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[
            "subsets.internal.com",
            "split.internal.com",
            "canary.internal.com",
            "moved.internal.com",
            "fixed.internal.com",
            "rewrite.internal.com",
        ])?;
        lab.start_python_peer(Role::External, "echo", &["http-echo", EXTERNAL_IP, "8080"])
    });
}

/// VirtualService `retries` against an upstream that answers the status a path names (and
/// a second attempt with 200 on `/flaky/`), and against a refusing endpoint: `5xx`,
/// `gateway-error`, a status code, Istio's default policy, and retries turned off.
#[test]
fn retry_policies() {
    let refusing = (ROGUE_IP, 81);
    let policies: [(&str, Option<Value>); 4] = [
        ("fivexx", Some(retry_policy("5xx", 2))),
        ("gateway", Some(retry_policy("gateway-error", 1))),
        ("codes", Some(retry_policy("503", 1))),
        ("plain", None),
    ];
    let mut vhosts: Vec<Value> = policies
        .iter()
        .map(|(name, policy)| {
            vs_vhost(
                &format!("{name}.internal.com"),
                80,
                vec![vs_route(
                    name,
                    "/",
                    json!({ "route": to_cluster(ECHO_CLUSTER, policy.clone()) }),
                )],
            )
        })
        .collect();
    let dead = cluster_name(80, "dead.internal.com");
    vhosts.push(vs_vhost(
        "dead.internal.com",
        80,
        vec![vs_route(
            "connect-retries",
            "/",
            json!({ "route": to_cluster(&dead, Some(retry_policy("connect-failure", 3))) }),
        )],
    ));
    vhosts.push(vs_vhost(
        "noretry.internal.com",
        80,
        vec![vs_route(
            "no-retries",
            "/",
            json!({ "route": to_cluster(&dead, Some(Value::Null)) }),
        )],
    ));
    let envoy = Resources::new(Mode::RegistryOnly)
        .listener(http_listener(80, vhosts, Mode::RegistryOnly))
        .cluster(static_cluster(80, "dead.internal.com", &[refusing]))
        .cluster(static_cluster(
            8080,
            "echo.internal.com",
            &[(EXTERNAL_IP, 8080)],
        ));
    let mut services = vec![
        static_services(&[
            ("dead.internal.com", 80, refusing.0, refusing.1),
            ("echo.internal.com", 8080, EXTERNAL_IP, 8080),
        ]),
        route_only_hosts(&[
            "fivexx.internal.com",
            "gateway.internal.com",
            "codes.internal.com",
            "plain.internal.com",
            "noretry.internal.com",
        ]),
    ];
    for (name, route, retries) in [
        (
            "fivexx",
            "fivexx",
            "\n    retries: {attempts: 2, retryOn: 5xx}",
        ),
        (
            "gateway",
            "gateway",
            "\n    retries: {attempts: 1, retryOn: gateway-error}",
        ),
        (
            "codes",
            "codes",
            "\n    retries: {attempts: 1, retryOn: '503'}",
        ),
        ("plain", "plain", ""),
        (
            "dead",
            "connect-retries",
            "\n    retries: {attempts: 3, retryOn: connect-failure}",
        ),
        ("noretry", "no-retries", "\n    retries: {attempts: 0}"),
    ] {
        let to = if matches!(name, "dead" | "noretry") {
            "dead.internal.com"
        } else {
            "echo.internal.com"
        };
        services.push(format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.internal.com]
  http:
  - name: {route}
    route: [{{destination: {{host: {to}}}}}]{retries}
---
"
        ));
    }
    let retry_stats = [ECHO_CLUSTER, &dead]
        .iter()
        .flat_map(|cluster| {
            ["", "_success", "_limit_exceeded", "_overflow"]
                .map(|stat| format!("cluster.{cluster}.upstream_rq_retry{stat}"))
        })
        .collect();
    let scenario = Scenario {
        name: "retries",
        files: vec![("retries.yaml".to_owned(), services.concat())],
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl(
                "5xx: a 503 every time",
                &["http://fivexx.internal.com/status/503"],
            ),
            Probe::curl(
                "5xx: a 503, then 200",
                &["http://fivexx.internal.com/flaky/503"],
            ),
            Probe::curl(
                "5xx: a 404 is not retried",
                &["http://fivexx.internal.com/status/404"],
            ),
            Probe::curl(
                "5xx over h2c",
                &[
                    "--http2-prior-knowledge",
                    "http://fivexx.internal.com/status/500",
                ],
            ),
            Probe::curl(
                "gateway-error: a 502",
                &["http://gateway.internal.com/status/502"],
            ),
            Probe::curl(
                "gateway-error: a 504, then 200",
                &["http://gateway.internal.com/flaky/504"],
            ),
            Probe::curl(
                "gateway-error: a 500 is not retried",
                &["http://gateway.internal.com/status/500"],
            ),
            Probe::curl(
                "status code 503: a 503",
                &["http://codes.internal.com/status/503"],
            ),
            Probe::curl(
                "status code 503: a 502 is not retried",
                &["http://codes.internal.com/status/502"],
            ),
            Probe::curl(
                "Istio's default policy: a 503 is retried",
                &["http://plain.internal.com/status/503"],
            ),
            Probe::curl(
                "Istio's default policy: POST, a 503",
                &["-d", "payload", "http://plain.internal.com/flaky/503"],
            ),
            Probe::curl(
                "Istio's default policy: POST with a streamed (chunked) body, a 503",
                &[
                    "-H",
                    "transfer-encoding: chunked",
                    "-d",
                    "payload",
                    "http://plain.internal.com/flaky/503",
                ],
            ),
            Probe::curl(
                "connect-failure, 3 retries, a refusing endpoint",
                &["http://dead.internal.com/"],
            ),
            Probe::curl(
                "no retries, a refusing endpoint",
                &["http://noretry.internal.com/"],
            ),
            Probe::stats("the retry stats the probes above left", retry_stats),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[
            "fivexx.internal.com",
            "gateway.internal.com",
            "codes.internal.com",
            "plain.internal.com",
            "dead.internal.com",
            "noretry.internal.com",
        ])?;
        lab.start_python_peer(Role::External, "echo", &["http-echo", EXTERNAL_IP, "8080"])
    });
}

/// `retriable-headers` over xDS (Istio's VirtualService has no field for the headers): a
/// response carrying `x-busy: yes` is retried, over HTTP/1.1 and h2c; a policy with
/// another condition delivers it.
#[test]
fn retriable_headers() {
    let mut policy = retry_policy("retriable-headers", 1);
    policy["retriable_headers"] = json!([{ "name": "x-busy", "string_match": { "exact": "yes" } }]);
    let mut other = retry_policy("5xx", 1);
    other["retriable_headers"] = policy["retriable_headers"].clone();
    let vhosts = vec![
        vs_vhost(
            "busy.internal.com",
            80,
            vec![vs_route(
                "busy",
                "/",
                json!({ "route": to_cluster(ECHO_CLUSTER, Some(policy)) }),
            )],
        ),
        vs_vhost(
            "other.internal.com",
            80,
            vec![vs_route(
                "other",
                "/",
                json!({ "route": to_cluster(ECHO_CLUSTER, Some(other)) }),
            )],
        ),
    ];
    let scenario = Scenario {
        name: "retriable-headers",
        files: Vec::new(),
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(80, vhosts, Mode::RegistryOnly))
            .cluster(static_cluster(
                8080,
                "echo.internal.com",
                &[(EXTERNAL_IP, 8080)],
            )),
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl(
                "x-busy: yes on the first attempt, retried",
                &["http://busy.internal.com/busy/200"],
            ),
            Probe::curl(
                "the same over h2c",
                &[
                    "--http2-prior-knowledge",
                    "http://busy.internal.com/busy/200",
                ],
            ),
            Probe::curl(
                "a response without it is delivered",
                &["http://busy.internal.com/status/200"],
            ),
            Probe::curl(
                "5xx only: the header is not read",
                &["http://other.internal.com/busy/200"],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&["busy.internal.com", "other.internal.com"])?;
        lab.start_python_peer(Role::External, "echo", &["http-echo", EXTERNAL_IP, "8080"])
    });
}

/// An upstream on the rogue host's port 84 that never answers `/hang`, sends `/stall`'s
/// response head and 3 of its 100 body bytes, then nothing, and answers the rest at once,
/// closing the connection (it serves one request per connection, so none may be pooled).
const STALLER: &str = "import socket, threading, time
def serve(c):
    data = b''
    while b'\\r\\n\\r\\n' not in data:
        d = c.recv(65536)
        if not d:
            return
        data += d
    path = data.split(b' ')[1]
    if path.startswith(b'/hang'):
        time.sleep(60)
    elif path.startswith(b'/stall'):
        c.sendall(b'HTTP/1.1 200 OK\\r\\ncontent-length: 100\\r\\n\\r\\nabc')
        time.sleep(60)
    else:
        c.sendall(b'HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\nconnection: close\\r\\n\\r\\nok')
    c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.50.3.3', 84))
s.listen(64)
print('ready', flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
";

/// The connection manager's stream timeouts, 1 s each: port 80 with `stream_idle_timeout`
/// (a complete request nobody answers: 504 `SI`; a request head or body that stops: 408;
/// a response body that stalls: closed), port 8080 with `request_timeout` alone (a request
/// body that stops: 408, no flag), and a route timeout shorter than the stream idle timeout
/// (504 `UT`).
#[test]
fn stream_timeouts() {
    let host = "slow.internal.com";
    let staller = [(ROGUE_IP, 84)];
    let with_timeouts = |port: u16, timeouts: Value| {
        let mut vhost = service_vhost(host, port, &[]);
        vhost["routes"].as_array_mut().expect("routes").insert(
            0,
            vs_route(
                "short",
                "/short",
                json!({"route": with(
                    to_cluster(&cluster_name(port, host), None),
                    json!({"timeout": "0.3s"}),
                )}),
            ),
        );
        let mut listener = http_listener(port, vec![vhost], Mode::RegistryOnly);
        let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
        for (key, value) in timeouts.as_object().expect("timeouts") {
            hcm[key] = value.clone();
        }
        listener
    };
    let envoy = Resources::new(Mode::RegistryOnly)
        .listener(with_timeouts(80, json!({"stream_idle_timeout": "1s"})))
        .listener(with_timeouts(
            8080,
            json!({"stream_idle_timeout": "0s", "request_timeout": "1s"}),
        ))
        .cluster(static_cluster(80, host, &staller))
        .cluster(static_cluster(8080, host, &staller));
    let partial_body =
        format!("POST /hang HTTP/1.1\r\nHost: {host}\r\ncontent-length: 10\r\n\r\nabc");
    let scenario = Scenario {
        name: "stream-timeouts",
        files: Vec::new(),
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl(
                "a complete request nobody answers",
                &[&format!("http://{host}/hang")],
            ),
            Probe::curl(
                "the same over h2c",
                &["--http2-prior-knowledge", &format!("http://{host}/hang")],
            ),
            Probe::curl(
                "the same with a chunked body (the general HTTP/1.1 path)",
                &[
                    "-H",
                    "transfer-encoding: chunked",
                    "--data-binary",
                    "abc",
                    &format!("http://{host}/hang"),
                ],
            ),
            Probe::curl(
                "the route timeout first",
                &[&format!("http://{host}/short/hang")],
            ),
            Probe::tcp(
                "a request body that stops",
                &format!("{APP_VIP}:80"),
                &partial_body,
            ),
            Probe::tcp(
                "a request head that stops",
                &format!("{APP_VIP}:80"),
                &format!("GET /hang HTTP/1.1\r\nHost: {host}\r\n"),
            ),
            Probe::curl(
                "a response body that stalls",
                &[&format!("http://{host}/stall")],
            ),
            Probe::curl(
                "a response body that stalls, over h2c (the stream is reset)",
                &["--http2-prior-knowledge", &format!("http://{host}/stall")],
            ),
            Probe::tcp(
                "a request body that stops, request_timeout alone",
                &format!("{APP_VIP}:8080"),
                &partial_body,
            ),
            Probe::curl(
                "a complete request, request_timeout alone",
                &[&format!("http://{host}:8080/ok")],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[host])?;
        lab.spawn_peer(
            Role::Rogue,
            "staller",
            "python3",
            &["-u", "-c", STALLER],
            "TERM",
        )?;
        poll("the stalling upstream", Duration::from_secs(10), || {
            Ok(lab.peer_stdout("staller")?.contains("ready").then_some(()))
        })
    });
}

/// The bytes 00 9f 92 96, base64 as in the VirtualService and in Envoy's JSON.
const BINARY_BODY: &str = "AJ+Slg==";

/// The fault filter's per-route config as istiod writes a VirtualService's `fault`
/// (percentages per million); an abort is its `error_type` field (`http_status`,
/// `grpc_status`), the code and the percentage.
fn fault_config(delay: Option<(&str, u32)>, abort: Option<(&str, u32, u32)>) -> Value {
    let mut fault =
        json!({ "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault" });
    if let Some((fixed, percent)) = delay {
        fault["delay"] = json!({
            "fixed_delay": fixed,
            "percentage": { "numerator": percent * 10_000, "denominator": "MILLION" }
        });
    }
    if let Some((error_type, code, percent)) = abort {
        fault["abort"] = json!({
            error_type: code,
            "percentage": { "numerator": percent * 10_000, "denominator": "MILLION" }
        });
    }
    json!({ "envoy.filters.http.fault": fault })
}

/// A VirtualService's `fault`: an abort, a gRPC abort (of gRPC over h2c and HTTP/1.1, and
/// of plain HTTP), a delay, both (the delay first), and a fault for no share of requests,
/// each in front of the echo peer; and a direct response with a binary body.
#[test]
fn faults() {
    let routes = [
        (
            "abort",
            "/abort",
            fault_config(None, Some(("http_status", 429, 100))),
        ),
        (
            "grpc",
            "/grpc",
            fault_config(None, Some(("grpc_status", 14, 100))),
        ),
        ("delay", "/delay", fault_config(Some(("0.3s", 100)), None)),
        (
            "both",
            "/both",
            fault_config(Some(("0.2s", 100)), Some(("http_status", 503, 100))),
        ),
        (
            "spared",
            "/",
            fault_config(None, Some(("http_status", 500, 0))),
        ),
    ];
    let mut routes: Vec<Value> = routes
        .into_iter()
        .map(|(name, prefix, config)| {
            let mut route = vs_route(name, prefix, route_to(ECHO_CLUSTER));
            route["typed_per_filter_config"] = config;
            route
        })
        .collect();
    // istiod writes `directResponse.body.bytes` as `inline_bytes` (base64 in JSON).
    let binary = json!({ "direct_response": {
        "status": 200,
        "body": { "inline_bytes": BINARY_BODY }
    }});
    routes.insert(0, vs_route("bytes", "/bytes", binary));
    let vhost = vs_vhost("fault.internal.com", 80, routes);
    let envoy = Resources::new(Mode::RegistryOnly)
        .listener(http_listener(80, vec![vhost], Mode::RegistryOnly))
        .cluster(static_cluster(
            8080,
            "echo.internal.com",
            &[(EXTERNAL_IP, 8080)],
        ));
    let services = [
        static_services(&[("echo.internal.com", 8080, EXTERNAL_IP, 8080)]),
        route_only_hosts(&["fault.internal.com"]),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: fault, namespace: default}
spec:
  hosts: [fault.internal.com]
  http:
  - name: bytes
    match: [{uri: {prefix: /bytes}}]
    directResponse: {status: 200, body: {bytes: 'AJ+Slg=='}}
  - name: abort
    match: [{uri: {prefix: /abort}}]
    route: [{destination: {host: echo.internal.com}}]
    fault: {abort: {httpStatus: 429, percentage: {value: 100}}}
  - name: grpc
    match: [{uri: {prefix: /grpc}}]
    route: [{destination: {host: echo.internal.com}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
  - name: delay
    match: [{uri: {prefix: /delay}}]
    route: [{destination: {host: echo.internal.com}}]
    fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}
  - name: both
    match: [{uri: {prefix: /both}}]
    route: [{destination: {host: echo.internal.com}}]
    fault:
      delay: {fixedDelay: 0.2s, percentage: {value: 100}}
      abort: {httpStatus: 503, percentage: {value: 100}}
  - name: spared
    route: [{destination: {host: echo.internal.com}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 0}}}
"
        .to_owned(),
    ];
    let scenario = Scenario {
        name: "faults",
        files: vec![("faults.yaml".to_owned(), services.concat())],
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl("an abort", &["http://fault.internal.com/abort"]),
            Probe::curl(
                "an abort over h2c",
                &["--http2-prior-knowledge", "http://fault.internal.com/abort"],
            ),
            Probe::curl(
                "an abort of a POST",
                &["-d", "payload", "http://fault.internal.com/abort"],
            ),
            // The h2c calls send no body: an answer that ends the stream while the client
            // still sends resets the rest, which curl reports as an error or not at random,
            // with Envoy as with portcullis.
            Probe::curl(
                "an abort of a gRPC call over h2c",
                &[
                    "--http2-prior-knowledge",
                    "-H",
                    "content-type: application/grpc",
                    "-X",
                    "POST",
                    "http://fault.internal.com/abort",
                ],
            ),
            Probe::curl(
                "a gRPC abort of a gRPC call over h2c",
                &[
                    "--http2-prior-knowledge",
                    "-H",
                    "content-type: application/grpc",
                    "-X",
                    "POST",
                    "http://fault.internal.com/grpc",
                ],
            ),
            Probe::curl(
                "a gRPC abort of a gRPC call over HTTP/1.1",
                &[
                    "-H",
                    "content-type: application/grpc+proto",
                    "-d",
                    "call",
                    "http://fault.internal.com/grpc",
                ],
            ),
            Probe::curl(
                "a gRPC abort of a plain HTTP/1.1 request",
                &["http://fault.internal.com/grpc"],
            ),
            Probe::curl(
                "a direct response with a binary body",
                &["http://fault.internal.com/bytes"],
            ),
            Probe::curl("a delay", &["http://fault.internal.com/delay"]),
            Probe::curl(
                "a delay, then an abort",
                &["http://fault.internal.com/both"],
            ),
            Probe::curl("a fault for no request", &["http://fault.internal.com/"]),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&["fault.internal.com"])?;
        lab.start_python_peer(Role::External, "echo", &["http-echo", EXTERNAL_IP, "8080"])
    });
}

/// `hashed.internal.com`: both nginx endpoints, a DestinationRule hashing on `x-user`.
const HASHED: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hashed, namespace: default}
spec:
  hosts: [hashed.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.50.0.1}
  - {address: 10.50.2.1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hashed, namespace: default}
spec:
  host: hashed.internal.com
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}
";

// DestinationRule consistentHash: istiod's RING_HASH cluster and the default route's header
// hash policy. Both proxies place the endpoints on Envoy's ring (xxHash64 of `IP:PORT_N`),
// so each user lands on the same endpoint in both.
#[test]
fn consistent_hash_by_header() {
    let host = "hashed.internal.com";
    let mut cluster = static_cluster(80, host, &[(EXTERNAL_IP, 80), (IN_CLUSTER_IP, 80)]);
    cluster["lb_policy"] = json!("RING_HASH");
    cluster["ring_hash_lb_config"] = json!({ "minimum_ring_size": "1024" });
    let mut vhost = service_vhost(host, 80, &[]);
    vhost["routes"][0]["route"]["hash_policy"] = json!([{ "header": { "header_name": "x-user" } }]);
    let url = format!("http://{host}/");
    let users = ["alice", "bob", "carol", "dave"];
    let headers: Vec<String> = users.iter().map(|u| format!("x-user: {u}")).collect();
    let mut probes: Vec<Probe> = headers
        .iter()
        .map(|h| Probe::spread(&format!("one user ({h})"), &["-H", h, &url], SPREAD))
        .collect();
    probes.push(Probe::spread("no user: at random", &[&url], SPREAD));
    let scenario = Scenario {
        name: "lbhash",
        files: vec![("hashed.yaml".to_owned(), HASHED.to_owned())],
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(80, vec![vhost], Mode::RegistryOnly))
            .cluster(cluster),
        portcullis_flags: vec![],
        probes,
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[host])?;
        Ok(())
    });
}

/// A cookie hash policy with a ttl, path and attributes: a client without the cookie gets
/// one in `set-cookie` (its value made from the client's address and port, so only its
/// name and attributes are compared, and one endpoint answers whatever it hashes to); one
/// that sends it back gets none.
#[test]
fn consistent_hash_by_a_generated_cookie() {
    let host = "hashed.internal.com";
    let mut cluster = static_cluster(80, host, &[(EXTERNAL_IP, 80)]);
    cluster["lb_policy"] = json!("RING_HASH");
    let mut vhost = service_vhost(host, 80, &[]);
    vhost["routes"][0]["route"]["hash_policy"] = json!([{ "cookie": {
        "name": "session",
        "ttl": "60s",
        "path": "/",
        "attributes": [{ "name": "SameSite", "value": "Strict" }, { "name": "Secure" }]
    } }]);
    let url = format!("http://{host}/");
    let scenario = Scenario {
        name: "lbcookie",
        files: Vec::new(),
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(80, vec![vhost], Mode::RegistryOnly))
            .cluster(cluster),
        portcullis_flags: vec![],
        probes: vec![
            Probe::curl("no cookie: one is set", &[&url]),
            Probe::curl(
                "the cookie sent back: none set",
                &["-H", "cookie: session=\"0123456789abcdef\"", &url],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[host])?;
        Ok(())
    });
}

/// The address of an nginx that answers every request with a 500.
const FAILING_IP: &str = "10.50.0.31";

/// istiod's outlier detection for `consecutive5xxErrors: n` (interval 1 s, a minute's
/// ejection, every endpoint ejectable) on `cluster`, with the panic threshold it turns off.
fn eject_on_5xx(cluster: &mut Value, n: u32) {
    cluster["outlier_detection"] = json!({
        "consecutive_5xx": n,
        "enforcing_consecutive_5xx": 100,
        "enforcing_success_rate": 0,
        "interval": "1s",
        "base_ejection_time": "60s",
        "max_ejection_percent": 100
    });
    cluster["common_lb_config"] = json!({ "healthy_panic_threshold": { "value": 0 } });
}

/// `host:80`'s virtual host with one VirtualService route `route` to `cluster` and no
/// retries (`attempts: 0`), so every answer reaches the client.
fn no_retries_vhost(host: &str, route: &str, cluster: &str) -> Value {
    vs_vhost(
        host,
        80,
        vec![vs_route(
            route,
            "/",
            json!({ "route": to_cluster(cluster, Some(Value::Null)) }),
        )],
    )
}

/// An nginx on [`FAILING_IP`]:80 that answers every request with a 500.
fn start_failing_endpoint(lab: &mut Lab) -> anyhow::Result<()> {
    lab.add_address(Role::External, FAILING_IP)?;
    let failing = format!(
        "    server {{ listen {FAILING_IP}:80; location / {{ return 500 \"failing endpoint\\n\"; }} }}\n"
    );
    lab.start_nginx_servers(Role::External, "failing", &failing, "unused\n", 8141)?;
    Ok(())
}

/// A DestinationRule for `NAME.internal.com` with `extra` traffic policy lines and outlier
/// detection ejecting at `n` consecutive 5xx (as [`eject_on_5xx`]), and a VirtualService
/// route `NAME` to it without retries (as [`no_retries_vhost`]).
fn ejecting_rules(name: &str, extra: &str, n: u32) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {name}.internal.com
  trafficPolicy:
{extra}    outlierDetection: {{consecutive5xxErrors: {n}, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.internal.com]
  http:
  - name: {name}
    route: [{{destination: {{host: {name}.internal.com}}}}]
    retries: {{attempts: 0}}
"
    )
}

// `retryRemoteLocalities` (Envoy's `previous_priorities` retry priority, updated every
// second attempt) over the priorities of the locality scenario without ejection: the local
// endpoint answers 500 to the first attempt and to the retry (its priority still takes all
// the load), the second retry leaves that priority and reaches the other region. Without
// the retry priority all three attempts stay local.
#[test]
fn retry_remote_localities() {
    let host = "geo.internal.com";
    let name = cluster_name(80, host);
    let mut cluster = geo_cluster();
    eject_on_5xx(&mut cluster, 1000);
    let mut remote = retry_policy("5xx", 2);
    remote["retry_priority"] = json!({
        "name": "envoy.retry_priorities.previous_priorities",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
            "update_frequency": 2
        }
    });
    let vhost = vs_vhost(
        host,
        80,
        vec![
            vs_route(
                "local",
                "/local",
                json!({ "route": to_cluster(&name, Some(retry_policy("5xx", 2))) }),
            ),
            vs_route(
                "remote",
                "/",
                json!({ "route": to_cluster(&name, Some(remote)) }),
            ),
        ],
    );
    let files = format!(
        "{GEO}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: geo, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1000, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: geo, namespace: default}}
spec:
  hosts: [{host}]
  http:
  - name: local
    match: [{{uri: {{prefix: /local}}}}]
    route: [{{destination: {{host: {host}}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
  - name: remote
    route: [{{destination: {{host: {host}}}}}]
    retries: {{attempts: 2, retryOn: 5xx, retryRemoteLocalities: true}}
"
    );
    let scenario = Scenario {
        name: "retry-remote-localities",
        files: vec![("geo.yaml".to_owned(), files)],
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(80, vec![vhost], Mode::RegistryOnly))
            .cluster(cluster),
        portcullis_flags: vec!["--locality", "us-east/zone1"],
        probes: vec![
            Probe::curl(
                "the second retry goes to the other region",
                &[&format!("http://{host}/")],
            ),
            Probe::curl(
                "without the retry priority every attempt stays local",
                &[&format!("http://{host}/local")],
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[host])?;
        start_failing_endpoint(lab)
    });
}

/// `flaky.internal.com`: its endpoints in turn.
const FLAKY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: flaky, namespace: default}
spec:
  hosts: [flaky.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.50.0.1}
  - {address: 10.50.0.31}
";

// DestinationRule outlierDetection: istiod's cluster (consecutive 5xx enforced, the panic
// threshold off) over two endpoints in turn, one answering 500 to everything. Its second
// 500 ejects it, within four requests in both proxies; after that only the healthy one
// answers (the ejection lasts a minute, longer than the scenario).
#[test]
fn outlier_detection_ejects_an_endpoint_answering_500() {
    let host = "flaky.internal.com";
    let name = cluster_name(80, host);
    let mut cluster = static_cluster(80, host, &[(EXTERNAL_IP, 80), (FAILING_IP, 80)]);
    cluster["lb_policy"] = json!("ROUND_ROBIN");
    eject_on_5xx(&mut cluster, 2);
    let vhost = no_retries_vhost(host, "flaky", &name);
    let url = format!("http://{host}/");
    let scenario = Scenario {
        name: "outlier",
        files: vec![(
            "flaky.yaml".to_owned(),
            format!(
                "{FLAKY}{}",
                ejecting_rules("flaky", "    loadBalancer: {simple: ROUND_ROBIN}\n", 2)
            ),
        )],
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(80, vec![vhost], Mode::RegistryOnly))
            .cluster(cluster),
        portcullis_flags: vec![],
        probes: vec![
            Probe::spread(
                "in turn: a 200, and the failing endpoint's 500s",
                &[&url],
                4,
            ),
            Probe::spread("the failing endpoint ejected", &[&url], SPREAD),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[host])?;
        start_failing_endpoint(lab)
    });
}

/// `geo.internal.com`: an endpoint in the proxy's zone and one in another region.
const GEO: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: geo, namespace: default}
spec:
  hosts: [geo.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.50.0.31, locality: us-east/zone1}
  - {address: 10.50.0.1, locality: eu-west/zone9}
";

/// [`GEO`]'s cluster as istiod gives it to a proxy in us-east/zone1: its own zone's
/// endpoint ([`FAILING_IP`]) at priority 0, the other region's at priority 1.
fn geo_cluster() -> Value {
    let group = |region: &str, zone: &str, priority: u32, ip: &str| {
        json!({
            "locality": { "region": region, "zone": zone },
            "priority": priority,
            "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": ip, "port_value": 80 }
            } } }]
        })
    };
    let mut cluster = static_cluster(80, "geo.internal.com", &[]);
    cluster["load_assignment"] = json!({
        "cluster_name": cluster_name(80, "geo.internal.com"),
        "endpoints": [
            group("us-east", "zone1", 0, FAILING_IP),
            group("eu-west", "zone9", 1, EXTERNAL_IP),
        ]
    });
    cluster
}

// Locality failover: the priorities istiod gives a proxy in us-east/zone1 (its own zone's
// endpoint first, the other region's next) over EDS-style locality groups, and outlier
// detection. The local endpoint answers 500 and is ejected at once; both proxies then send
// everything to the next priority. From files, portcullis computes the same priorities
// from `--locality` and the endpoints' localities.
#[test]
fn locality_priorities_fail_over_when_the_local_endpoint_is_ejected() {
    let host = "geo.internal.com";
    let name = cluster_name(80, host);
    let mut cluster = geo_cluster();
    eject_on_5xx(&mut cluster, 1);
    let vhost = no_retries_vhost(host, "geo", &name);
    let url = format!("http://{host}/");
    let scenario = Scenario {
        name: "locality",
        files: vec![(
            "geo.yaml".to_owned(),
            format!("{GEO}{}", ejecting_rules("geo", "", 1)),
        )],
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(80, vec![vhost], Mode::RegistryOnly))
            .cluster(cluster),
        portcullis_flags: vec!["--locality", "us-east/zone1"],
        probes: vec![
            Probe::curl("the local priority answers (a 500)", &[&url]),
            Probe::spread(
                "the local endpoint ejected: the next priority",
                &[&url],
                SPREAD,
            ),
        ],
    };
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[host])?;
        start_failing_endpoint(lab)
    });
}
