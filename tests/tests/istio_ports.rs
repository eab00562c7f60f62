//! Ports, protocols and precedence as Istio's listeners decide them (issue 9): TLS on a port
//! declared HTTP, HTTP beside a TCP ServiceEntry without addresses, the oldest of two TCP
//! entries on one port, resolution NONE with `targetPort`, and a Host naming another port.

use anyhow::ensure;
use portcullis_e2e::scenario::{
    self, APP_HOST, EXTERNAL_IP, EXTERNAL_MARK, IN_CLUSTER_IP, IN_CLUSTER_MARK, ROGUE_IP,
    SELECT_EXTERNAL, service_entry,
};
use portcullis_e2e::{Lab, Role, run};

/// The usual start (`Lab::start_with_services`) with no extra flags.
fn start(lab: &mut Lab, names: &[&str], services: &[(&str, String)]) -> anyhow::Result<()> {
    lab.start_with_services(names, services, &[])
}

/// A ServiceEntry `name` for `host` on TCP `port`, without addresses, created at `created`,
/// whose one endpoint `endpoint` listens on port 80.
fn tcp_entry(name: &str, host: &str, port: u16, created: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: default
  creationTimestamp: \"{created}\"
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  ports:
  - {{number: {port}, name: tcp-{port}, protocol: TCP, targetPort: 80}}
  resolution: STATIC
  endpoints:
  - address: {endpoint}
"
    )
}

const TLS_PAGE: &str = "Welcome to the TLS host\n";

/// TLS sent to a port declared HTTP gets no SNI route (Istio's HTTP listener has no TLS
/// filter chain): closed, nothing forwarded, even with the service's own name as SNI.
#[test]
fn tls_to_an_http_port_is_not_routed_by_sni() {
    run("ports-tls-on-http", |lab| {
        let host = "plain.internal.com";
        let cert = lab.make_certificate(&[host, "tls.internal.com"])?;
        let servers = cert.nginx_tls_server(&format!("{EXTERNAL_IP}:8443"));
        let nginx = lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8099)?;
        start(
            lab,
            &[host, "tls.internal.com"],
            &[
                (
                    "plain.yaml",
                    service_entry("plain", &[host], 8443, "HTTP", "STATIC", SELECT_EXTERNAL),
                ),
                (
                    "tls.yaml",
                    service_entry(
                        "tls",
                        &["tls.internal.com"],
                        8443,
                        "TLS",
                        "STATIC",
                        SELECT_EXTERNAL,
                    ),
                ),
            ],
        )?;
        let cacert = cert.cert.display().to_string();
        // A TLS service on the same port is still routed by its SNI.
        lab.curl(&["--cacert", &cacert, "https://tls.internal.com:8443/"])?
            .expect_page("TLS service on the shared port", "TLS host")?;
        let before = lab.nginx_accepts(&nginx)?;
        let reply = lab.curl(&["--cacert", &cacert, &format!("https://{host}:8443/")])?;
        ensure!(
            reply.status == 0 && reply.exit != 0,
            "TLS with SNI {host} on its HTTP port must be closed: {reply}"
        );
        let after = lab.nginx_accepts(&nginx)?;
        ensure!(
            after == before + 1,
            "nginx saw {} TLS connection(s) sent to an HTTP port",
            after - before - 1
        );
        lab.expect_logged(
            "the refused TLS connection in the access log",
            &[host, "BlackHoleCluster"],
        )?;
        lab.expect_running()
    });
}

/// A TCP ServiceEntry without addresses takes the port's non-HTTP traffic only: HTTP is
/// sniffed and routed by Host (unregistered Host: 502), as Istio's mixed listener does.
#[test]
fn tcp_without_addresses_leaves_http_to_the_http_services() {
    run("ports-tcp-and-http", |lab| {
        start(
            lab,
            &[APP_HOST, "db.internal.com"],
            &[
                ("serviceentry.yaml", scenario::SERVICE_ENTRY.to_string()),
                (
                    "db.yaml",
                    tcp_entry(
                        "db",
                        "db.internal.com",
                        80,
                        "2020-01-01T00:00:00Z",
                        IN_CLUSTER_IP,
                    ),
                ),
            ],
        )?;
        lab.curl(&[&format!("http://{APP_HOST}/")])?.expect_page(
            "HTTP to the HTTP service beside a port-wide TCP one",
            EXTERNAL_MARK,
        )?;
        lab.curl(&[&format!("http://{ROGUE_IP}/"), "-H", "Host: nobody.example"])?
            .expect_blocked("HTTP with an unregistered Host on the mixed port")?;
        // Not HTTP: the TCP service's.
        let seen = lab.connect(Role::Pod, &format!("{ROGUE_IP}:80"), "hello\r\n\r\n", 5)?;
        ensure!(
            seen.received > 0,
            "opaque bytes on the mixed port must reach the TCP service: {seen:?}"
        );
        lab.expect_logged(
            "opaque bytes logged to the TCP service",
            &[
                "outbound|80||db.internal.com",
                &format!("\"{IN_CLUSTER_IP}:80\""),
            ],
        )?;
        lab.expect_running()
    });
}

/// Two TCP ServiceEntries without addresses on one port: the oldest `creationTimestamp`
/// wins, not the first name.
#[test]
fn the_oldest_tcp_entry_wins_a_port() {
    run("ports-tcp-oldest", |lab| {
        start(
            lab,
            &[],
            &[
                (
                    "a.yaml",
                    tcp_entry(
                        "aaa",
                        "a.internal.com",
                        8080,
                        "2024-06-01T00:00:00Z",
                        EXTERNAL_IP,
                    ),
                ),
                (
                    "z.yaml",
                    tcp_entry(
                        "zzz",
                        "z.internal.com",
                        8080,
                        "2010-01-01T00:00:00Z",
                        IN_CLUSTER_IP,
                    ),
                ),
            ],
        )?;
        lab.curl(&[&format!("http://{ROGUE_IP}:8080/")])?
            .expect_page("the older TCP entry's endpoint", IN_CLUSTER_MARK)?;
        lab.expect_running()
    });
}

/// Resolution NONE forwards to the original destination's address on `targetPort`, as
/// Istio's ORIGINAL_DST cluster with an upstream port override does.
#[test]
fn none_resolution_uses_the_target_port() {
    run("ports-none-target", |lab| {
        let entry = |name: &str, port: u16, protocol: &str| {
            format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.internal.com]
  addresses: [{EXTERNAL_IP}]
  location: MESH_EXTERNAL
  ports:
  - {{number: {port}, name: {}-{port}, protocol: {protocol}, targetPort: 80}}
  resolution: NONE
",
                protocol.to_ascii_lowercase()
            )
        };
        start(
            lab,
            &[],
            &[
                ("web.yaml", entry("web", 8081, "HTTP")),
                ("raw.yaml", entry("raw", 8082, "TCP")),
            ],
        )?;
        lab.curl(&[&format!("http://{EXTERNAL_IP}:8081/")])?
            .expect_page("HTTP, resolution NONE, targetPort 80", EXTERNAL_MARK)?;
        lab.curl(&[&format!("http://{EXTERNAL_IP}:8082/")])?
            .expect_page("TCP, resolution NONE, targetPort 80", EXTERNAL_MARK)?;
        let (_, dump) = lab.admin_get("/config_dump")?;
        ensure!(
            dump.contains("\"passthrough_port\": 80"),
            "/config_dump must show the target port of resolution NONE:\n{dump}"
        );
        lab.expect_logged(
            "the upstream on the target port",
            &[
                "outbound|8081||web.internal.com",
                &format!("\"{EXTERNAL_IP}:80\""),
            ],
        )?;
        lab.expect_running()
    });
}

/// A Host naming a port other than the one the request was sent to routes by its name, as
/// Istio's route tables ignore the port in host matching.
#[test]
fn a_host_with_another_port_is_routed_by_name() {
    run("ports-host-port", |lab| {
        start(
            lab,
            &[APP_HOST],
            &[("serviceentry.yaml", scenario::SERVICE_ENTRY.to_string())],
        )?;
        lab.curl(&[
            &format!("http://{APP_HOST}/"),
            "-H",
            &format!("Host: {APP_HOST}:12345"),
        ])?
        .expect_page("Host app.internal.com:12345 on port 80", EXTERNAL_MARK)?;
        lab.curl(&[
            &format!("http://{APP_HOST}/"),
            "-H",
            "Host: other.internal.com:80",
        ])?
        .expect_blocked("an unregistered name with a port")?;
        lab.expect_running()
    });
}

/// HTTP sent to the address of a service of undeclared protocol goes to that service
/// whatever its Host: Istio gives it its own sniffed listener whose route table holds only it.
#[test]
fn an_undeclared_service_takes_http_to_its_address() {
    run("ports-auto-vip", |lab| {
        let vip = "10.50.77.7";
        let entry = format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: auto, namespace: default}}
spec:
  hosts: [auto.internal.com]
  addresses: [{vip}]
  location: MESH_EXTERNAL
  ports:
  - {{number: 8090, name: web-8090, targetPort: 80}}
  resolution: STATIC
  endpoints:
  - address: {EXTERNAL_IP}
"
        );
        start(lab, &[], &[("auto.yaml", entry)])?;
        lab.curl(&[&format!("http://{vip}:8090/"), "-H", "Host: nobody.example"])?
            .expect_page("HTTP to the undeclared service's address", EXTERNAL_MARK)?;
        lab.curl(&[
            &format!("http://{ROGUE_IP}:8090/"),
            "-H",
            "Host: nobody.example",
        ])?
        .expect_blocked("the same Host to another address")?;
        lab.expect_running()
    });
}
