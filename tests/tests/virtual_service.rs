//! VirtualServices and DestinationRule subsets from Istio YAML files, end to end: real curl
//! in the pod, real nginx backends on the external host, portcullis in between.

use std::collections::BTreeMap;

use anyhow::{Context, ensure};
use portcullis_e2e::{Lab, Role, run};

/// The external host's extra addresses, one per backend.
const V1_IP: &str = "10.50.0.11";
const V2_IP: &str = "10.50.0.12";
const TLS_BACKEND_IP: &str = "10.50.0.13";
const TCP_BACKEND_IP: &str = "10.50.0.14";

const V1_PAGE: &str = "shop v1\n";
const V2_PAGE: &str = "shop v2\n";

/// Requests of the weighted split: enough that a 70/30 split is told from 50/50 with a
/// bound a fair split breaks about once in a million runs, few enough for one curl.
const SPLIT_SAMPLE: usize = 200;

/// `shop.internal.com:80`, served by two nginx backends labelled v1 and v2 (port 8080),
/// with the subsets and the routes under test.
fn shop_config() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shop, namespace: default}}
spec:
  hosts: [shop.internal.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {V1_IP}, ports: {{http: 8080}}, labels: {{version: v1}}}}
  - {{address: {V2_IP}, ports: {{http: 8080}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shop, namespace: default}}
spec:
  host: shop.internal.com
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: default}}
spec:
  hosts: [shop.internal.com]
  http:
  - name: beta-testers
    match: [{{headers: {{x-beta: {{exact: 'yes'}}}}}}]
    route: [{{destination: {{host: shop.internal.com, subset: v2}}}}]
  - name: moved
    match: [{{uri: {{prefix: /old}}}}]
    redirect: {{uri: /new, authority: www.shop.test, redirectCode: 302}}
  - name: teapot
    match: [{{uri: {{exact: /teapot}}}}]
    directResponse: {{status: 418, body: {{string: short and stout}}}}
  - name: flaky
    match: [{{uri: {{prefix: /fail}}}}]
    route: [{{destination: {{host: shop.internal.com, subset: v1}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
  - name: fail-once
    match: [{{uri: {{prefix: /no-retry}}}}]
    route: [{{destination: {{host: shop.internal.com, subset: v1}}}}]
    rewrite: {{uri: /fail}}
    retries: {{attempts: 0}}
  - name: per-destination
    match: [{{uri: {{prefix: /dest}}}}]
    route:
    - destination: {{host: shop.internal.com, subset: v1}}
      weight: 50
      headers:
        request: {{set: {{x-dest: v1}}}}
        response: {{set: {{x-served-by: v1}}}}
    - destination: {{host: shop.internal.com, subset: v2}}
      weight: 50
      headers:
        request: {{set: {{x-dest: v2}}}}
        response: {{set: {{x-served-by: v2}}}}
  - name: split
    match: [{{uri: {{prefix: /}}}}]
    route:
    - {{destination: {{host: shop.internal.com, subset: v1}}, weight: 70}}
    - {{destination: {{host: shop.internal.com, subset: v2}}, weight: 30}}
"
    )
}

/// An nginx on `ip:8080` serving `page`, answering 500 under `/fail`, echoing the
/// `x-dest` it received and its own address under `/dest`, and logging each request's
/// `x-envoy-attempt-count` to `attempts.log` in its folder.
fn backend(
    lab: &mut Lab,
    name: &str,
    ip: &str,
    page: &str,
    status_port: u16,
) -> anyhow::Result<()> {
    lab.add_address(Role::External, ip)?;
    let servers = format!(
        "    log_format attempts '$request $status attempt=$http_x_envoy_attempt_count';
    server {{
        listen {ip}:8080;
        access_log {{html}}/../attempts.log attempts;
        root {{html}};
        location /fail {{ return 500; }}
        location /dest {{ return 200 \"$http_x_dest at $server_addr\\n\"; }}
    }}"
    );
    lab.start_nginx_servers(Role::External, name, &servers, page, status_port)?;
    Ok(())
}

/// The `attempt=` values nginx `name` logged for requests to `path`.
fn attempts(lab: &Lab, name: &str, path: &str) -> Vec<String> {
    let log = std::fs::read_to_string(lab.dir.join(format!("nginx-{name}/attempts.log")))
        .unwrap_or_default();
    log.lines()
        .filter(|l| l.starts_with(&format!("GET {path} ")))
        .filter_map(|l| l.rsplit_once("attempt=").map(|(_, a)| a.to_owned()))
        .collect()
}

#[test]
fn http_routes_split_match_redirect_answer_and_retry_as_istio() {
    run("vshttp", |lab| {
        backend(lab, "v1", V1_IP, V1_PAGE, 8101)?;
        backend(lab, "v2", V2_IP, V2_PAGE, 8102)?;
        lab.start_with_services(&["shop.internal.com"], &[("shop.yaml", shop_config())], &[])?;

        // A header match takes its subset, every time.
        for _ in 0..5 {
            let reply = lab.curl(&["-H", "x-beta: yes", "http://shop.internal.com/"])?;
            reply.expect_page("the beta testers' route", "shop v2")?;
        }

        // The weighted split, counted over one bounded sample on kept-alive connections.
        let url = "http://shop.internal.com/";
        let urls = vec![url; SPLIT_SAMPLE];
        let mut args = vec!["-sS", "--max-time", "30"];
        args.extend(urls);
        let bodies = lab.run(Role::Pod, "curl", &args)?;
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for line in bodies.lines() {
            *seen.entry(line).or_default() += 1;
        }
        let v1 = seen.get("shop v1").copied().unwrap_or(0);
        let v2 = seen.get("shop v2").copied().unwrap_or(0);
        ensure!(
            v1 + v2 == SPLIT_SAMPLE,
            "every request of the split answered by a subset: {seen:?}"
        );
        // 70% of 200 is 140 with a standard deviation of about 6.5: ±5 of them.
        ensure!(
            (108..=172).contains(&v1),
            "a 70/30 split over {SPLIT_SAMPLE} requests: {seen:?}"
        );

        // Each destination's headers go with its own requests and responses only, over
        // HTTP/1.1 and h2c.
        let mut answers = BTreeMap::new();
        for i in 0..16 {
            let mut args = vec!["http://shop.internal.com/dest"];
            if i % 2 == 1 {
                args.insert(0, "--http2-prior-knowledge");
            }
            let reply = lab.curl(&args)?;
            ensure!(reply.status == 200, "a per-destination route: {reply}");
            let served_by = reply.header("x-served-by").unwrap_or("(none)").to_owned();
            answers.insert(reply.body.trim().to_owned(), served_by);
        }
        let want = BTreeMap::from([
            (format!("v1 at {V1_IP}"), "v1".to_owned()),
            (format!("v2 at {V2_IP}"), "v2".to_owned()),
        ]);
        ensure!(
            answers == want,
            "each destination's request and response headers, only with it: {answers:?}"
        );

        // A redirect answers without reaching a backend; the query string is kept.
        let before = lab.nginx_requests(Role::External);
        let reply = lab.curl(&["http://shop.internal.com/old/page?q=1"])?;
        ensure!(
            reply.status == 302 && reply.header("location") == Some("http://www.shop.test/new?q=1"),
            "the redirect: {reply}"
        );
        // A direct response, likewise.
        let reply = lab.curl(&["http://shop.internal.com/teapot"])?;
        ensure!(
            reply.status == 418 && reply.body == "short and stout",
            "the direct response: {reply}"
        );
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "a redirect or direct response reached nginx"
        );

        // Retries: nginx answers 500; `retryOn: 5xx` with 3 attempts makes four in all,
        // each seen upstream with its attempt count; the client gets the last 500.
        let reply = lab.curl(&["http://shop.internal.com/fail/once"])?;
        ensure!(reply.status == 500, "the last attempt's answer: {reply}");
        let seen = attempts(lab, "v1", "/fail/once");
        ensure!(
            seen == ["1", "2", "3", "4"],
            "four attempts counted upstream: {seen:?}"
        );
        // `attempts: 0` turns Istio's default retries off: one attempt (rewritten to /fail).
        let reply = lab.curl(&["http://shop.internal.com/no-retry"])?;
        ensure!(reply.status == 500, "one attempt's answer: {reply}");
        let seen = attempts(lab, "v1", "/fail");
        ensure!(seen == ["1"], "a single attempt upstream: {seen:?}");

        // Nothing of this is reported as not applied.
        let unapplied: Vec<String> = lab
            .portcullis_output()
            .lines()
            .filter(|l| l.contains("VirtualService") && l.contains("not applied"))
            .map(str::to_owned)
            .collect();
        ensure!(
            unapplied.is_empty(),
            "no VirtualService warning: {unapplied:#?}"
        );
        Ok(())
    });
}

const TLS_BACKEND_PAGE: &str = "the TLS backend\n";
const TCP_BACKEND_PAGE: &str = "the TCP backend\n";

/// `front.internal.com:443` (TLS) and `db.internal.com:5432` (TCP) are registered with the
/// external host as their endpoint; their VirtualServices send them elsewhere.
fn l4_config() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: front, namespace: default}}
spec:
  hosts: [front.internal.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: 10.50.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tls-backend, namespace: default}}
spec:
  hosts: [tls-backend.internal.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: {TLS_BACKEND_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: default}}
spec:
  hosts: [front.internal.com]
  tls:
  - match: [{{sniHosts: [front.internal.com]}}]
    route: [{{destination: {{host: tls-backend.internal.com, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.internal.com]
  ports: [{{number: 5432, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 10.50.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db-replica, namespace: default}}
spec:
  hosts: [db-replica.internal.com]
  addresses: [{TCP_BACKEND_IP}]
  ports: [{{number: 5432, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: {TCP_BACKEND_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.internal.com]
  tcp:
  - match: [{{port: 5432}}]
    route: [{{destination: {{host: db-replica.internal.com}}}}]
"
    )
}

#[test]
fn tls_and_tcp_routes_send_connections_to_their_destinations() {
    run("vsl4", |lab| {
        let cert = lab.make_certificate(&["front.internal.com"])?;
        lab.add_address(Role::External, TLS_BACKEND_IP)?;
        let tls = cert.nginx_tls_server(&format!("{TLS_BACKEND_IP}:443"));
        lab.start_nginx_servers(Role::External, "tls", &tls, TLS_BACKEND_PAGE, 8103)?;
        lab.add_address(Role::External, TCP_BACKEND_IP)?;
        let tcp = format!("    server {{ listen {TCP_BACKEND_IP}:5432; root {{html}}; }}");
        lab.start_nginx_servers(Role::External, "tcp", &tcp, TCP_BACKEND_PAGE, 8104)?;
        lab.start_with_services(
            &["front.internal.com", "db.internal.com"],
            &[("l4.yaml", l4_config())],
            &[],
        )?;
        // The SNI route: the bytes go to the TLS backend, untouched (its certificate).
        let reply = lab.curl(&["-k", "https://front.internal.com/"])?;
        reply
            .expect_page("the TLS route", "TLS backend")
            .context("SNI front.internal.com through its VirtualService")?;
        // The TCP route: the port's connections go to the replica (plain HTTP is opaque
        // bytes on a TCP port).
        let reply = lab.curl(&["http://db.internal.com:5432/"])?;
        reply
            .expect_page("the TCP route", "TCP backend")
            .context("db.internal.com:5432 through its VirtualService")?;
        Ok(())
    });
}
