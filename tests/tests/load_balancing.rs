//! DestinationRule consistent hashing from Istio YAML files, end to end: real curl in the
//! pod, three nginx endpoints on the external host, portcullis in between.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, ensure};
use portcullis_e2e::{Lab, Role, run};

/// The external host's extra addresses, one per endpoint.
const ENDPOINTS: [&str; 3] = ["10.50.0.21", "10.50.0.22", "10.50.0.23"];

/// Users hashed, and requests per user: bounded, one curl for all.
const USERS: usize = 24;
const REQUESTS_PER_USER: usize = 4;

/// `shop.internal.com:80` hashed on the `x-user` header over a Maglev table, and
/// `cart.internal.com:80` on a `session` cookie generated with a ttl, both on the three
/// endpoints (port 8080).
fn config() -> String {
    let endpoints: String = ENDPOINTS
        .iter()
        .map(|ip| format!("  - {{address: {ip}, ports: {{http: 8080}}}}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shop, namespace: default}}
spec:
  hosts: [shop.internal.com, cart.internal.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
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
"
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
        let unapplied: Vec<String> = lab
            .portcullis_output()
            .lines()
            .filter(|l| l.contains("DestinationRule") && l.contains("not applied"))
            .map(str::to_owned)
            .collect();
        ensure!(
            unapplied.is_empty(),
            "no DestinationRule warning: {unapplied:#?}"
        );
        Ok(())
    });
}
