//! DestinationRule load balancing from Istio YAML files, end to end: real curl in the pod,
//! nginx endpoints on the external host, portcullis in between. Consistent hashing over
//! three endpoints, outlier detection ejecting an endpoint that answers 500, slow start
//! of an endpoint added by a file update, and locality: from WorkloadEntries' and from the
//! Kubernetes Nodes pods run on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use portcullis_e2e::{Lab, Role, poll, run};

/// The external host's extra addresses, one per endpoint.
const ENDPOINTS: [&str; 3] = ["10.50.0.21", "10.50.0.22", "10.50.0.23"];

/// Users hashed, and requests per user: bounded, one curl for all.
const USERS: usize = 24;
const REQUESTS_PER_USER: usize = 4;

/// A STATIC ServiceEntry `name` for `hosts` on port 80 (HTTP), its endpoints `ips` on
/// port 8080, and the document separator after it.
fn service(name: &str, hosts: &str, ips: &[&str]) -> String {
    let endpoints: String = ips
        .iter()
        .map(|ip| format!("  - {{address: {ip}, ports: {{http: 8080}}}}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{hosts}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
"
    )
}

/// `shop.internal.com:80` hashed on the `x-user` header over a Maglev table, and
/// `cart.internal.com:80` on a `session` cookie generated with a ttl, both on the three
/// endpoints (port 8080).
fn config() -> String {
    format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shop, namespace: default}}
spec:
  host: shop.internal.com
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpHeaderName: x-user, maglev: {{tableSize: 65537}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: cart, namespace: default}}
spec:
  host: cart.internal.com
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {{name: session, path: /, ttl: 3600s}}
        ringHash: {{minimumRingSize: 1024}}
",
        service("shop", "shop.internal.com, cart.internal.com", &ENDPOINTS)
    )
}

/// One nginx answering `endpoint N` on each endpoint address.
fn endpoints(lab: &mut Lab) -> anyhow::Result<()> {
    let mut servers = String::new();
    for (i, ip) in ENDPOINTS.iter().enumerate() {
        lab.add_address(Role::External, ip)?;
        servers.push_str(&format!(
            "    server {{ listen {ip}:8080; location / {{ return 200 \"endpoint {}\\n\"; }} }}\n",
            i + 1
        ));
    }
    lab.start_nginx_servers(Role::External, "hashed", &servers, "unused\n", 8121)?;
    Ok(())
}

#[test]
fn consistent_hash_keeps_a_key_on_one_endpoint_and_spreads_keys() {
    run("lbhash", |lab| {
        endpoints(lab)?;
        lab.start_with_services(
            &["shop.internal.com", "cart.internal.com"],
            &[("shop.yaml", config())],
            &[],
        )?;

        // Every user's requests in one curl: `--next` starts each user's header set.
        let url = "http://shop.internal.com/";
        let headers: Vec<String> = (0..USERS).map(|u| format!("x-user: user-{u}")).collect();
        let mut args: Vec<&str> = Vec::new();
        for header in &headers {
            args.extend(["-sS", "--max-time", "20", "-H", header]);
            args.extend([url; REQUESTS_PER_USER]);
            args.push("--next");
        }
        args.pop();
        let bodies = lab.run(Role::Pod, "curl", &args)?;
        let lines: Vec<&str> = bodies.lines().collect();
        ensure!(
            lines.len() == USERS * REQUESTS_PER_USER,
            "every request answered: {bodies}"
        );
        let mut by_user: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
        for (i, line) in lines.iter().enumerate() {
            by_user
                .entry(i / REQUESTS_PER_USER)
                .or_default()
                .insert(line);
        }
        for (user, seen) in &by_user {
            ensure!(
                seen.len() == 1,
                "user-{user}'s requests all on one endpoint: {seen:?}"
            );
        }
        // Keys spread: with three endpoints, all 24 users on one has odds of 3^-23.
        let used: BTreeSet<&str> = lines.iter().copied().collect();
        ensure!(used.len() >= 2, "users spread over the endpoints: {used:?}");

        // A cookie policy with a ttl and no cookie: the proxy makes one up.
        let reply = lab.curl(&["http://cart.internal.com/"])?;
        ensure!(reply.status == 200, "the cart: {reply}");
        let set_cookie = reply
            .header("set-cookie")
            .with_context(|| format!("a generated session cookie: {reply}"))?
            .to_owned();
        let (cookie, attributes) = set_cookie
            .split_once("; ")
            .with_context(|| format!("cookie attributes: {set_cookie}"))?;
        ensure!(
            cookie.starts_with("session=\"") && attributes == "Max-Age=3600; Path=/; HttpOnly",
            "Envoy's set-cookie: {set_cookie}"
        );
        let first = reply.body.clone();
        // The cookie sent back keeps the client on the endpoint that answered, and is not
        // set again.
        let header = format!("cookie: {cookie}");
        for _ in 0..REQUESTS_PER_USER {
            let again = lab.curl(&["-H", &header, "http://cart.internal.com/"])?;
            ensure!(
                again.body == first && again.header("set-cookie").is_none(),
                "the session stays on {first:?}: {again}"
            );
        }

        // consistentHash is applied, not reported otherwise.
        nothing_unapplied(lab)
    });
}

/// The slow start window of `warm.internal.com`.
const WINDOW: Duration = Duration::from_secs(8);
/// Requests per sample of `warm.internal.com`'s spread.
const SAMPLE: usize = 60;

/// `warm.internal.com:80` round robin over `ips` (port 8080), new endpoints warming up over
/// [`WINDOW`] from 10% of their weight.
fn warm_config(ips: &[&str]) -> String {
    format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: warm, namespace: default}}
spec:
  host: warm.internal.com
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      warmup: {{duration: {}s, minimumPercent: 10}}
",
        service("warm", "warm.internal.com", ips),
        WINDOW.as_secs()
    )
}

/// How many of [`SAMPLE`] requests to `warm.internal.com`, from one curl, the third
/// endpoint answered.
fn third_endpoint_answers(lab: &mut Lab) -> anyhow::Result<usize> {
    let mut args = vec!["-sS", "--max-time", "20"];
    args.extend(["http://warm.internal.com/"; SAMPLE]);
    let bodies = lab.run(Role::Pod, "curl", &args)?;
    let lines: Vec<&str> = bodies.lines().collect();
    ensure!(lines.len() == SAMPLE, "every request answered: {bodies}");
    Ok(lines.iter().filter(|l| **l == "endpoint 3").count())
}

#[test]
fn slow_start_ramps_up_an_endpoint_added_by_a_file_update() {
    run("lbwarm", |lab| {
        endpoints(lab)?;
        lab.start_with_services(
            &["warm.internal.com"],
            &[("warm.yaml", warm_config(&ENDPOINTS[..2]))],
            &[],
        )?;
        // The first two endpoints warm up together from the start; let them finish.
        std::thread::sleep(WINDOW);
        lab.write_config("warm.yaml", &warm_config(&ENDPOINTS))?;
        let third = format!("outbound|80||warm.internal.com::{}:8080::", ENDPOINTS[2]);
        poll(
            "the third endpoint in /clusters",
            Duration::from_secs(10),
            || {
                let (_, clusters) = lab.admin_get("/clusters")?;
                Ok(clusters.contains(&third).then_some(()))
            },
        )?;
        let added = Instant::now();
        // In its first second it weighs about an eighth of the others' (10% to 12.5%):
        // about 3 of 60 requests; more than 12 has odds below one in a thousand.
        let early = third_endpoint_answers(lab)?;
        let early_took = added.elapsed();
        ensure!(
            early <= 12,
            "the new endpoint got {early} of {SAMPLE} in its first {early_took:?}"
        );
        // After the window, round robin gives it its full third.
        std::thread::sleep(WINDOW.saturating_sub(added.elapsed()) + Duration::from_secs(1));
        let late = third_endpoint_answers(lab)?;
        ensure!(
            late >= 15,
            "the warm endpoint got {late} of {SAMPLE} after the window (early: {early})"
        );
        println!(
            "slow start: the third endpoint answered {early}/{SAMPLE} in its first {early_took:?}, {late}/{SAMPLE} after the window"
        );
        nothing_unapplied(lab)
    });
}

/// The healthy endpoints of `flaky.internal.com` and the one that answers every request
/// with a 500.
const HEALTHY: [&str; 2] = ["10.50.0.31", "10.50.0.32"];
const FAILING: &str = "10.50.0.33";

/// `flaky.internal.com:80` over its three endpoints in turn, with outlier detection that
/// ejects an endpoint after two consecutive 5xx for a minute (longer than the test), and
/// no retries, so that every 500 reaches the client.
fn flaky_config() -> String {
    let ips = [HEALTHY[0], HEALTHY[1], FAILING];
    format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flaky, namespace: default}}
spec:
  host: flaky.internal.com
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 100
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: flaky, namespace: default}}
spec:
  hosts: [flaky.internal.com]
  http:
  - route: [{{destination: {{host: flaky.internal.com}}}}]
    retries: {{attempts: 0}}
",
        service("flaky", "flaky.internal.com", &ips)
    )
}

/// Status codes of `n` requests to `url`, in order, from one curl in the pod.
fn statuses(lab: &mut Lab, url: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut args = vec!["-sS", "--max-time", "20", "-w", "%{http_code}\\n"];
    // Each URL needs an `-o` of its own.
    for _ in 0..n {
        args.extend(["-o", "/dev/null", url]);
    }
    let out = lab.run(Role::Pod, "curl", &args)?;
    let codes: Vec<String> = out.lines().map(str::to_owned).collect();
    ensure!(codes.len() == n, "{n} status codes: {out}");
    Ok(codes)
}

/// Fails when portcullis reported any part of its config as not applied.
fn nothing_unapplied(lab: &Lab) -> anyhow::Result<()> {
    let unapplied: Vec<String> = lab
        .portcullis_output()
        .lines()
        .filter(|l| l.contains("not applied"))
        .map(str::to_owned)
        .collect();
    ensure!(
        unapplied.is_empty(),
        "nothing reported as not applied: {unapplied:#?}"
    );
    Ok(())
}

#[test]
fn outlier_detection_ejects_the_endpoint_answering_500() {
    run("lboutlier", |lab| {
        let mut healthy = String::new();
        for ip in HEALTHY.iter().chain([&FAILING]) {
            lab.add_address(Role::External, ip)?;
        }
        for ip in HEALTHY {
            healthy.push_str(&format!(
                "    server {{ listen {ip}:8080; location / {{ return 200 \"healthy {ip}\\n\"; }} }}\n"
            ));
        }
        lab.start_nginx_servers(Role::External, "healthy", &healthy, "unused\n", 8131)?;
        let failing = lab.start_nginx_servers(
            Role::External,
            "failing",
            &format!("    server {{ listen {FAILING}:8080; location / {{ return 500; }} }}\n"),
            "unused\n",
            8132,
        )?;
        lab.start_with_services(
            &["flaky.internal.com"],
            &[("flaky.yaml", flaky_config())],
            &[],
        )?;
        let url = "http://flaky.internal.com/";

        // In turn over three endpoints, the failing one answers the 2nd or 3rd request and
        // then three later: its second 500 ejects it, within the first six requests.
        let first = statuses(lab, url, 12)?;
        let failures = first.iter().filter(|c| *c == "500").count();
        ensure!(
            failures == 2 && first[6..].iter().all(|c| c == "200"),
            "two 500s, then only 200s: {first:?}"
        );
        let again = statuses(lab, url, 12)?;
        ensure!(
            again.iter().all(|c| c == "200"),
            "the ejected endpoint gets no more requests: {again:?}"
        );
        let served = std::fs::read_to_string(failing.home.join("access.log"))?;
        ensure!(
            served.lines().count() == 2,
            "the failing nginx saw exactly the two requests before its ejection:\n{served}"
        );

        // Envoy's admin views of it.
        let (_, clusters) = lab.admin_get("/clusters")?;
        let flag = format!(
            "outbound|80||flaky.internal.com::{FAILING}:8080::health_flags::/failed_outlier_check"
        );
        ensure!(
            clusters.lines().any(|l| l == flag),
            "{flag} in /clusters:\n{clusters}"
        );
        for ip in HEALTHY {
            let line = format!("outbound|80||flaky.internal.com::{ip}:8080::health_flags::healthy");
            ensure!(clusters.lines().any(|l| l == line), "{line} in /clusters");
        }
        let (_, metrics) = lab.admin_get("/stats/prometheus")?;
        let cluster = "{cluster_name=\"outbound|80||flaky.internal.com\"}";
        for sample in [
            format!("envoy_cluster_outlier_detection_ejections_enforced_total{cluster} 1"),
            format!(
                "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{cluster} 1"
            ),
            format!("envoy_cluster_outlier_detection_ejections_active{cluster} 1"),
        ] {
            ensure!(
                metrics.lines().any(|l| l == sample),
                "{sample} in /stats/prometheus:\n{}",
                metrics
                    .lines()
                    .filter(|l| l.contains("outlier"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        nothing_unapplied(lab)
    });
}

/// `geo.internal.com`'s endpoints: one in the proxy's own zone, one in another region.
const LOCAL: &str = "10.50.0.41";
const REMOTE: &str = "10.50.0.42";

/// `geo.internal.com:80` over an endpoint in `us-east/zone1` (the proxy's locality) and one
/// in `eu-west/zone9`, with outlier detection (which istiod requires before it fails over
/// by locality) ejecting an endpoint at its first 5xx, and no retries.
fn geo_config() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: geo, namespace: default}}
spec:
  hosts: [geo.internal.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {LOCAL}, locality: us-east/zone1, ports: {{http: 8080}}}}
  - {{address: {REMOTE}, locality: eu-west/zone9, ports: {{http: 8080}}}}
---
{}",
        failover_rules("geo", "geo.internal.com")
    )
}

/// DestinationRule and VirtualService `name` for `host`: outlier detection (which istiod
/// requires before it fails over by locality) ejecting an endpoint at its first 5xx, and
/// no retries.
fn failover_rules(name: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  http:
  - route: [{{destination: {{host: {host}}}}}]
    retries: {{attempts: 0}}
"
    )
}

/// One nginx answering `NAME` on `IP:8080` for each `(IP, NAME)`, and a 500 `NAME failed`
/// on `/fail`.
fn start_named_endpoints(
    lab: &mut Lab,
    nginx: &str,
    status_port: u16,
    endpoints: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut servers = String::new();
    for (ip, name) in endpoints {
        lab.add_address(Role::External, ip)?;
        servers.push_str(&format!(
            "    server {{ listen {ip}:8080; location /fail {{ return 500 \"{name} failed\\n\"; }} location / {{ return 200 \"{name}\\n\"; }} }}\n"
        ));
    }
    lab.start_nginx_servers(Role::External, nginx, &servers, "unused\n", status_port)?;
    Ok(())
}

/// Bodies of `n` requests to `url`, in order, from one curl in the pod.
fn bodies(lab: &mut Lab, url: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut args = vec!["-sS", "--max-time", "20"];
    args.extend(std::iter::repeat_n(url, n));
    let out = lab.run(Role::Pod, "curl", &args)?;
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    ensure!(lines.len() == n, "{n} answers: {out}");
    Ok(lines)
}

#[test]
fn locality_failover_keeps_traffic_local_until_the_local_endpoint_is_ejected() {
    run("lblocality", |lab| {
        start_named_endpoints(lab, "geo", 8151, &[(LOCAL, "local"), (REMOTE, "remote")])?;
        lab.start_with_services(
            &["geo.internal.com"],
            &[("geo.yaml", geo_config())],
            &["--locality", "us-east/zone1"],
        )?;
        let url = "http://geo.internal.com/";
        // The remote region is a lower priority: while the local endpoint is healthy it
        // takes everything.
        let before = bodies(lab, url, 12)?;
        ensure!(
            before.iter().all(|b| b == "local"),
            "all local while it is healthy: {before:?}"
        );
        // Its first 500 ejects it; the load fails over to the other region.
        let failed = bodies(lab, "http://geo.internal.com/fail", 1)?;
        ensure!(
            failed == ["local failed"],
            "the local endpoint fails: {failed:?}"
        );
        let after = bodies(lab, url, 12)?;
        ensure!(
            after.iter().all(|b| b == "remote"),
            "all remote once the local endpoint is ejected: {after:?}"
        );
        nothing_unapplied(lab)
    });
}

/// The two pods of Service `web`: one on each node.
const POD_ON_A: &str = "10.50.0.51";
const POD_ON_B: &str = "10.50.0.52";

/// Nodes `node-a` in zone `zone_a` and `node-b` in zone `zone_b` of region `us-east`.
fn nodes(zone_a: &str, zone_b: &str) -> String {
    let node = |name: &str, zone: &str| {
        format!(
            "apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{topology.kubernetes.io/region: us-east, topology.kubernetes.io/zone: {zone}, kubernetes.io/hostname: {name}}}
spec: {{podCIDR: 10.244.0.0/24}}
---
"
        )
    };
    [node("node-a", zone_a), node("node-b", zone_b)].concat()
}

/// Kubernetes Service `web` (port 80 to 8080) over a pod on each node, with
/// [`failover_rules`].
fn web_config() -> String {
    let pod = |name: &str, ip: &str, node: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: {node}, containers: [{{name: web, image: nginx}}]}}
status: {{podIP: {ip}, phase: Running}}
---
"
        )
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.50
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
{}{}{}",
        pod("web-1", POD_ON_A, "node-a"),
        pod("web-2", POD_ON_B, "node-b"),
        failover_rules("web", "web.default.svc.cluster.local"),
    )
}

#[test]
fn a_pods_node_zone_keeps_traffic_in_the_clients_zone_and_follows_a_relabelled_node() {
    run("lbnodes", |lab| {
        start_named_endpoints(
            lab,
            "nodes",
            8161,
            &[(POD_ON_A, "pod on node-a"), (POD_ON_B, "pod on node-b")],
        )?;
        let host = "web.default.svc.cluster.local";
        lab.start_with_services(
            &[host],
            &[
                ("web.yaml", web_config()),
                ("nodes.yaml", nodes("us-east-1a", "us-east-1b")),
            ],
            &["--locality", "us-east/us-east-1a"],
        )?;
        let url = format!("http://{host}/");
        // The pod whose node is in the client's zone takes everything; the other zone is
        // the next priority.
        let before = bodies(lab, &url, 12)?;
        ensure!(
            before.iter().all(|b| b == "pod on node-a"),
            "all to the pod in the client's zone: {before:?}"
        );
        // The nodes' zones swapped in the file: the pods' localities follow their nodes.
        lab.write_config("nodes.yaml", &nodes("us-east-1b", "us-east-1a"))?;
        let after = poll(
            "traffic to the pod on the node now in the client's zone",
            Duration::from_secs(10),
            || {
                let answers = bodies(lab, &url, 6)?;
                Ok(answers
                    .iter()
                    .all(|b| b == "pod on node-b")
                    .then_some(answers))
            },
        )?;
        let settled = bodies(lab, &url, 12)?;
        ensure!(
            settled.iter().all(|b| b == "pod on node-b"),
            "all to the pod on node-b once it is in the client's zone: {after:?} then {settled:?}"
        );
        // `portcullis check` reads the Nodes without a finding.
        let check = lab.run_portcullis_as_root(&[
            "check",
            "--config",
            &lab.config_dir().display().to_string(),
        ])?;
        ensure!(
            !check.contains("Node"),
            "no finding about the Nodes: {check}"
        );
        nothing_unapplied(lab)
    });
}
