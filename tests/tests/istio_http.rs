//! The proxy's HTTP behaviour as an Istio sidecar, checked against Envoy 1.40 configured as
//! istiod configures a sidecar's outbound side: the loop guard, one access line per request
//! on an HTTP2 port, the headers Envoy adds upstream, and HTTP/1.0 when accepted.

use std::time::Duration;

use anyhow::ensure;
use portcullis_e2e::scenario::{EXTERNAL_IP, POD_IP, external_service};
use portcullis_e2e::{Lab, Role, poll, run};

/// The lines portcullis has written so far (its access log among them) holding every one
/// of `parts`.
fn log_lines(lab: &Lab, parts: &[&str]) -> Vec<String> {
    lab.portcullis_output()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}

const METRICS_PAGE: &str = "a real service on 15090\n";

/// A service on another host on the port of the proxy's own metrics listener (a wildcard
/// listener) is reachable; a connection to the pod's own outbound listener is closed
/// without a byte and nothing is forwarded.
#[test]
fn the_loop_guard_covers_only_the_pods_own_addresses() {
    run("loopguard", |lab| {
        let servers = format!("    server {{ listen {EXTERNAL_IP}:15090; root {{html}}; }}");
        let nginx =
            lab.start_nginx_servers(Role::External, "m15090", &servers, METRICS_PAGE, 8097)?;
        lab.start_with_services(
            &["metrics.internal.com"],
            &[(
                "metrics.yaml",
                external_service("metrics", &["metrics.internal.com"], 15090, "HTTP"),
            )],
            &[],
        )?;
        let reply = lab.curl(&["http://metrics.internal.com:15090/"])?;
        reply.expect_page("curl http://metrics.internal.com:15090/", "real service")?;

        let before = lab.nginx_accepts(&nginx)?;
        let seen = lab.connect(
            Role::Pod,
            &format!("{POD_IP}:15001"),
            "GET / HTTP/1.1\r\nHost: metrics.internal.com:15090\r\n\r\n",
            5,
        )?;
        ensure!(
            seen.connected && seen.received == 0 && seen.end != "timeout",
            "a connection to the pod's own 15001 must be closed without a byte: {seen:?}"
        );
        ensure!(
            lab.nginx_accepts(&nginx)? == before + 1,
            "the looping connection reached nginx"
        );
        poll("the loop in the access log", Duration::from_secs(5), || {
            let lines = log_lines(lab, &["BlackHoleCluster", &format!("{POD_IP}:15001")]);
            Ok((!lines.is_empty()).then_some(()))
        })
    });
}

const H2_PAGE: &str = "Welcome to the h2c host\n";

/// An HTTP/1.1 request to a port declared HTTP2 is one request: one access line and one
/// `istio_requests_total` sample, with its real status.
#[test]
fn an_http1_request_to_an_http2_port_is_logged_and_counted_once() {
    run("h2once", |lab| {
        let servers = format!("    server {{ listen {EXTERNAL_IP}:8080 http2; root {{html}}; }}");
        lab.start_nginx_servers(Role::External, "h2", &servers, H2_PAGE, 8099)?;
        lab.start_with_services(
            &["h2.internal.com"],
            &[(
                "h2.yaml",
                external_service("h2", &["h2.internal.com"], 8080, "HTTP2"),
            )],
            &[],
        )?;
        let reply = lab.curl(&["--http1.1", "http://h2.internal.com:8080/"])?;
        reply.expect_page("curl --http1.1 http://h2.internal.com:8080/", "h2c host")?;
        // The metrics listener on the pod's loopback is never redirected.
        let metrics = lab.curl(&["http://127.0.0.1:15090/stats/prometheus"])?;
        let samples: Vec<&str> = metrics
            .body
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        ensure!(
            samples.len() == 1
                && samples[0].contains("response_code=\"200\"")
                && samples[0].ends_with(" 1"),
            "one istio_requests_total sample, code 200, count 1: {samples:#?}"
        );
        // The access log is written in batches: the line comes within a flush.
        let lines = poll("the request's access line", Duration::from_secs(5), || {
            let lines = log_lines(lab, &["\"GET / HTTP/1.1\"", "h2.internal.com:8080"]);
            Ok((!lines.is_empty()).then_some(lines))
        })?;
        ensure!(
            lines.len() == 1 && lines[0].contains(" 200 "),
            "one access line, status 200: {lines:#?}"
        );
        Ok(())
    });
}

/// The value of `name` in the echo peer's `/headers` reply.
fn echoed<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .collect()
}

/// The upstream gets what Envoy sends as an Istio sidecar (`x-request-id`, kept when the
/// client sent one; `x-envoy-attempt-count`; `x-forwarded-proto`;
/// `x-envoy-expected-rq-timeout-ms` with a route timeout); with `--accept-http10`, HTTP/1.0
/// is served with a Host; without one, HTTP/1.0 and HTTP/1.1 are answered 400, never
/// forwarded.
#[test]
fn upstream_headers_and_accepted_http10() {
    run("istiohdr", |lab| {
        lab.start_python_peer(
            Role::External,
            "http-echo",
            &["http-echo", EXTERNAL_IP, "8090"],
        )?;
        lab.start_with_services(
            &["echo.internal.com"],
            &[(
                "echo.yaml",
                external_service("echo", &["echo.internal.com"], 8090, "HTTP"),
            )],
            &["--route-timeout", "5s", "--accept-http10"],
        )?;
        let url = "http://echo.internal.com:8090/headers";
        let mut ids = Vec::new();
        for args in [
            vec![url],
            // A chunked body takes the general path rather than the fast one.
            vec![
                "-H",
                "transfer-encoding: chunked",
                "--data-binary",
                "x",
                url,
            ],
        ] {
            let reply = lab.curl(&args)?;
            ensure!(reply.status == 200, "curl {args:?}: {reply}");
            let body = &reply.body;
            ensure!(
                echoed(body, "x-envoy-attempt-count") == ["1"]
                    && echoed(body, "x-forwarded-proto") == ["http"]
                    && echoed(body, "x-envoy-expected-rq-timeout-ms") == ["5000"],
                "curl {args:?}: Envoy's headers upstream: {body}"
            );
            let id = echoed(body, "x-request-id");
            ensure!(
                id.len() == 1 && id[0].len() == 36 && id[0].as_bytes()[14] == b'4',
                "curl {args:?}: a UUIDv4 x-request-id: {body}"
            );
            ids.push(id[0].to_owned());
        }
        ensure!(ids[0] != ids[1], "each request has its own id: {ids:?}");
        let reply = lab.curl(&["-H", "x-request-id: from-the-app", url])?;
        ensure!(
            echoed(&reply.body, "x-request-id") == ["from-the-app"],
            "the client's x-request-id is kept: {}",
            reply.body
        );

        let reply = lab.curl(&["--http1.0", url])?;
        ensure!(
            reply.status == 200 && echoed(&reply.body, "host") == ["echo.internal.com:8090"],
            "HTTP/1.0 with a Host is served with --accept-http10: {reply}"
        );
        // Without a Host, HTTP/1.0 and HTTP/1.1 alike get Envoy's empty 400 and the
        // connection is closed.
        for version in ["1.0", "1.1"] {
            let seen = lab.connect(
                Role::Pod,
                &format!("{EXTERNAL_IP}:8090"),
                &format!("GET /headers HTTP/{version}\r\n\r\n"),
                5,
            )?;
            ensure!(
                seen.line.contains(" 400 Bad Request")
                    && seen.line.contains("content-length: 0")
                    && seen.end == "eof",
                "HTTP/{version} without Host is an empty 400 and a close: {seen:?}"
            );
        }
        let log = lab.peer_stdout("http-echo")?;
        let served = log.lines().filter(|l| l.contains(" /headers HTTP")).count();
        ensure!(
            served == 4,
            "exactly the four routed requests reached the peer:\n{log}"
        );
        Ok(())
    });
}

/// DestinationRule `h2UpgradePolicy: UPGRADE` on a port declared HTTP: an HTTP/1.1 client's
/// request reaches an upstream that speaks only h2c as HTTP/2, as Envoy's upgraded
/// cluster sends it (without the rule it would go as HTTP/1.1, which that nginx refuses).
#[test]
fn h2_upgrade_policy_sends_http1_requests_upstream_as_http2() {
    run("h2up", |lab| {
        let servers = format!("    server {{ listen {EXTERNAL_IP}:8080 http2; root {{html}}; }}");
        let nginx = lab.start_nginx_servers(Role::External, "h2", &servers, H2_PAGE, 8099)?;
        let rule = "
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: h2, namespace: default}
spec:
  host: h2.internal.com
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE}}
";
        let service = external_service("h2", &["h2.internal.com"], 8080, "HTTP");
        lab.start_with_services(
            &["h2.internal.com"],
            &[("h2.yaml", format!("{service}{rule}"))],
            &[],
        )?;
        let reply = lab.curl(&["--http1.1", "http://h2.internal.com:8080/"])?;
        reply.expect_page("curl --http1.1 http://h2.internal.com:8080/", "h2c host")?;
        let served = std::fs::read_to_string(nginx.home.join("access.log"))?;
        ensure!(
            served.lines().count() == 1 && served.contains("proto=HTTP/2.0"),
            "one request, upstream as HTTP/2:\n{served}"
        );
        let unapplied: Vec<String> = log_lines(lab, &["not applied"]);
        ensure!(
            unapplied.is_empty(),
            "nothing reported as not applied: {unapplied:#?}"
        );
        Ok(())
    });
}
