//! Istio's egress lock-down scenario, end to end, against the real `portcullis` binary.
//!
//! Each test builds its own lab (see `portcullis_e2e::Lab`) so they can run in parallel.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_e2e::scenario::{
    self, APP_HOST, EXTERNAL_IP, EXTERNAL_IP6, EXTERNAL_MARK, IN_CLUSTER_IP, IN_CLUSTER_MARK,
    ROGUE_IP,
};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Role, poll, run};

/// The explicit-proxy listener used by the forward-proxy test.
const HTTP_PROXY: &str = "127.0.0.1:15080";

fn app_url() -> String {
    format!("http://{APP_HOST}/")
}

fn external_url() -> String {
    format!("http://{EXTERNAL_IP}/")
}

fn external_url6() -> String {
    format!("http://[{EXTERNAL_IP6}]/")
}

/// Polls `curl args` in the pod until `accept` likes the reply.
fn curl_until(
    lab: &mut Lab,
    what: &str,
    args: &[&str],
    accept: impl Fn(&portcullis_e2e::Reply) -> bool,
) -> anyhow::Result<portcullis_e2e::Reply> {
    poll(what, RELOAD_DEADLINE, || {
        let reply = lab.curl(args)?;
        Ok(accept(&reply).then_some(reply))
    })
}

/// The usual start: REGISTRY_ONLY, rules installed, portcullis running as 1337.
fn start_locked_down(lab: &mut Lab) -> anyhow::Result<()> {
    lab.write_registry_only()?;
    lab.apply_iptables()?;
    lab.start_portcullis(&[])
}

/// The lab itself, with no proxy and no rules: every host reaches the others directly.
#[test]
fn lab_plumbing_without_proxy() {
    run("plumbing", |lab| {
        lab.curl(&[&external_url()])?
            .expect_page("pod -> external host, no rules", EXTERNAL_MARK)?;
        lab.curl(&[&format!("http://{IN_CLUSTER_IP}/")])?
            .expect_page("pod -> in-cluster pod, no rules", IN_CLUSTER_MARK)?;
        lab.curl(&["-g", &external_url6()])?
            .expect_page("pod -> external host over IPv6, no rules", EXTERNAL_MARK)?;
        // app.internal.com resolves, inside the pod only, to an address where nothing listens.
        let reply = lab.curl(&["--connect-timeout", "2", &app_url()])?;
        ensure!(
            reply.status == 0 && reply.exit != 0,
            "app.internal.com must not answer without the proxy: {reply}"
        );
        let resolved = lab.run(Role::Pod, "getent", &["hosts", APP_HOST])?;
        ensure!(
            resolved.split_whitespace().next() == Some(scenario::APP_VIP),
            "app.internal.com must resolve to {} in the pod, got {resolved:?}",
            scenario::APP_VIP
        );
        Ok(())
    });
}

/// `portcullis iptables --apply`: Istio's rules, idempotent, and uid 1337 is not captured.
#[test]
fn iptables_rules_capture_everyone_but_the_proxy() {
    run("iptables", |lab| {
        lab.apply_iptables()?;
        lab.apply_iptables()?;
        let rules = lab.pod_nat_rules()?;
        for want in [
            "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ] {
            let count = rules.lines().filter(|l| *l == want).count();
            ensure!(
                count == 1,
                "expected `{want}` once after two applies, found {count}:\n{rules}"
            );
        }
        let v6 = lab.run(Role::Pod, "ip6tables", &["-w", "-t", "nat", "-S"])?;
        ensure!(
            v6.contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN")
                && v6.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
            "IPv6 capture missing:\n{v6}"
        );
        // Root is redirected to 15001, where nothing listens yet: refused.
        let before = lab.nginx_requests(Role::External);
        let reply = lab.curl(&[&external_url()])?;
        ensure!(
            reply.exit == 7 && lab.nginx_requests(Role::External) == before,
            "root's traffic must be redirected to the (absent) proxy: {reply}"
        );
        // uid 1337 goes straight out.
        let id = "1337";
        let out = lab.run(
            Role::Pod,
            "setpriv",
            &[
                "--reuid",
                id,
                "--regid",
                id,
                "--clear-groups",
                "curl",
                "-sS",
                "--max-time",
                "5",
                &external_url(),
            ],
        )?;
        ensure!(
            out.contains(EXTERNAL_MARK),
            "uid 1337 must bypass the redirect and reach the external host, got {out:?}"
        );
        // Loopback is never captured: root reaches a listener on 127.0.0.1 directly.
        let local = lab.start_sink(Role::Pod, "127.0.0.1:9000")?;
        let seen = lab.connect(Role::Pod, &local.addr, "ping\n", 5)?;
        ensure!(
            seen.received > 0 && lab.sink_accepts(&local) == 1,
            "127.0.0.1 must not be redirected: {seen:?}"
        );
        Ok(())
    });
}

/// Issue 2, steps 1 to 5, in order, with hot reloads and no restart.
#[test]
fn scenario_steps_1_to_5() {
    run("scenario", |lab| {
        // Step 1: redirect installed, portcullis as uid 1337, REGISTRY_ONLY.
        start_locked_down(lab)?;
        let rules = lab.pod_nat_rules()?;
        ensure!(
            rules.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001")
                && rules.contains("--uid-owner 1337 -j RETURN"),
            "step 1: capture rules missing:\n{rules}"
        );
        ensure!(
            lab.portcullis_uid()? == 1337,
            "step 1: portcullis must run as uid 1337"
        );

        // Step 2: the external host is not registered.
        let before = lab.nginx_requests(Role::External);
        let reply = lab.curl(&["--head", &external_url()])?;
        reply.expect_blocked("step 2: curl --head http://10.50.0.1")?;
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "step 2: the blocked request reached the external host"
        );
        // `block_all` is a direct response: as in Envoy's log, no upstream cluster.
        poll(
            "step 2: an access log line with route block_all and no upstream cluster",
            Duration::from_secs(5),
            || {
                let log = lab.portcullis_output();
                Ok(log
                    .lines()
                    .any(|l| l.contains(" - 10.50.0.1:80 ") && l.ends_with(" block_all"))
                    .then_some(()))
            },
        )?;

        // Step 3: WorkloadEntry + ServiceEntry, picked up without restart.
        lab.write_app_service()?;
        let reply = curl_until(lab, "step 3: app.internal.com serves", &[&app_url()], |r| {
            r.status == 200
        })?;
        reply.expect_page("step 3: curl http://app.internal.com", EXTERNAL_MARK)?;
        ensure!(
            reply.header("server") == Some("envoy"),
            "step 3: a routed response carries `server: envoy` like Envoy's: {reply}"
        );
        lab.curl(&[&external_url()])?
            .expect_blocked("step 3: the endpoint's own IP is still not a registered host")?;

        // Step 4: a ready in-cluster pod with the same label becomes a second endpoint.
        lab.write_config("pod.yaml", scenario::POD)?;
        let mut seen = BTreeSet::new();
        for attempt in 0..60 {
            let reply = lab.curl(&[&app_url()])?;
            ensure!(
                reply.status == 200,
                "step 4: attempt {attempt}: every request must be served: {reply}"
            );
            if reply.body.contains(EXTERNAL_MARK) {
                seen.insert("external host");
            } else if reply.body.contains(IN_CLUSTER_MARK) {
                seen.insert("in-cluster pod");
            } else {
                anyhow::bail!("step 4: unexpected body: {reply}");
            }
            if seen.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            seen.len() == 2,
            "step 4: 60 requests should reach both endpoints, saw only {seen:?}"
        );

        // Step 5: removing the ServiceEntry blocks the hostname again.
        lab.remove_config("serviceentry.yaml")?;
        let reply = curl_until(
            lab,
            "step 5: app.internal.com blocked",
            &[&app_url()],
            |r| r.status == 502,
        )?;
        reply.expect_blocked("step 5: curl http://app.internal.com")?;
        let before = (
            lab.nginx_requests(Role::External),
            lab.nginx_requests(Role::InCluster),
        );
        lab.curl(&[&app_url()])?.expect_blocked("step 5: again")?;
        let after = (
            lab.nginx_requests(Role::External),
            lab.nginx_requests(Role::InCluster),
        );
        ensure!(
            before == after,
            "step 5: a blocked request reached an endpoint"
        );
        lab.expect_running()
    });
}

/// Opaque TCP to an unregistered address:port is closed and nothing reaches the destination.
#[test]
fn opaque_tcp_to_unregistered_is_closed() {
    run("opaque-tcp", |lab| {
        let sink = lab.start_sink(Role::External, &format!("{EXTERNAL_IP}:9000"))?;
        // Prove the listener is reachable when nothing is in the way.
        let direct = lab.connect(Role::InCluster, &sink.addr, "ping\n", 5)?;
        ensure!(
            direct.received > 0 && lab.sink_accepts(&sink) == 1,
            "the listener must be reachable directly: {direct:?}"
        );
        start_locked_down(lab)?;
        // The external host is a registered endpoint on port 80; port 9000 still is not.
        lab.write_app_service()?;
        curl_until(lab, "app.internal.com serves", &[&app_url()], |r| {
            r.status == 200
        })?;
        let seen = lab.connect(Role::Pod, &sink.addr, "hello, not http\n", 20)?;
        ensure!(
            seen.received == 0 && (seen.end == "eof" || seen.end == "reset"),
            "opaque TCP to unregistered {} must be closed with nothing sent back, got {:?}",
            sink.addr,
            seen
        );
        ensure!(
            lab.sink_accepts(&sink) == 1,
            "the unregistered destination saw a connection through the proxy"
        );
        lab.expect_running()
    });
}

/// A malformed file changes nothing that was serving, and its error is in `/config_dump`.
#[test]
fn malformed_yaml_changes_nothing() {
    run("malformed", |lab| {
        start_locked_down(lab)?;
        lab.write_app_service()?;
        curl_until(lab, "app.internal.com serves", &[&app_url()], |r| {
            r.status == 200
        })?;

        lab.write_config("broken.yaml", scenario::MALFORMED_YAML)?;
        // The error names the file and its line (`broken.yaml:7`), not just the file.
        poll(
            "broken.yaml's error in /config_dump",
            RELOAD_DEADLINE,
            || {
                lab.expect_running()?;
                let (status, dump) = lab.admin_get("/config_dump")?;
                Ok((status == 200 && dump.contains("broken.yaml:")).then_some(()))
            },
        )?;
        lab.curl(&[&app_url()])?
            .expect_page("app.internal.com after a malformed new file", EXTERNAL_MARK)?;
        lab.curl(&[&external_url()])?
            .expect_blocked("10.50.0.1 after a malformed new file")?;

        // A registered resource's own file breaking keeps its last good content.
        lab.write_config("serviceentry.yaml", scenario::MALFORMED_YAML)?;
        poll(
            "serviceentry.yaml's error in /config_dump",
            RELOAD_DEADLINE,
            || {
                lab.expect_running()?;
                let (status, dump) = lab.admin_get("/config_dump")?;
                Ok((status == 200 && dump.contains("serviceentry.yaml:")).then_some(()))
            },
        )?;
        lab.curl(&[&app_url()])?.expect_page(
            "app.internal.com after its ServiceEntry file broke (last good content)",
            EXTERNAL_MARK,
        )?;
        lab.expect_running()
    });
}

/// `Host: app.internal.com` sent to an unregistered IP goes to the service, never to the IP.
#[test]
fn spoofed_host_lands_on_service_endpoints() {
    run("host-spoof", |lab| {
        let sink = lab.start_sink(Role::Rogue, &format!("{ROGUE_IP}:80"))?;
        let direct = lab.connect(Role::InCluster, &sink.addr, "GET / HTTP/1.0\r\n\r\n", 5)?;
        ensure!(
            direct.received > 0 && lab.sink_accepts(&sink) == 1,
            "the rogue listener must be reachable directly: {direct:?}"
        );
        start_locked_down(lab)?;
        lab.write_app_service()?;
        curl_until(lab, "app.internal.com serves", &[&app_url()], |r| {
            r.status == 200
        })?;

        let rogue_url = format!("http://{ROGUE_IP}/");
        lab.curl(&["-H", &format!("Host: {APP_HOST}"), &rogue_url])?
            .expect_page("Host: app.internal.com to 10.50.3.3", EXTERNAL_MARK)?;
        lab.curl(&[&rogue_url])?
            .expect_blocked("plain request to unregistered 10.50.3.3")?;
        // Odd spellings of the host may be served or blocked, but never reach the rogue IP.
        for host in [
            "APP.Internal.COM",
            "app.internal.com.",
            "app.internal.com:80",
        ] {
            let reply = lab.curl(&["-H", &format!("Host: {host}"), &rogue_url])?;
            ensure!(
                !reply.body.contains("sink")
                    && (reply.status == 502 || reply.body.contains(EXTERNAL_MARK)),
                "Host: {host} to 10.50.3.3 must be routed to the service or blocked: {reply}"
            );
        }
        ensure!(
            lab.sink_accepts(&sink) == 1,
            "a spoofed request reached the unregistered IP 10.50.3.3"
        );
        lab.expect_running()
    });
}

/// The explicit proxy (`--http-proxy`) gives the same answers, with no iptables at all.
#[test]
fn explicit_proxy_gives_the_same_answers() {
    run("http-proxy", |lab| {
        lab.write_registry_only()?;
        lab.write_app_service()?;
        lab.start_portcullis(&["--http-proxy", HTTP_PROXY])?;
        let proxy = format!("http://{HTTP_PROXY}");

        let reply = curl_until(
            lab,
            "app.internal.com via -x",
            &["-x", &proxy, &app_url()],
            |r| r.status == 200,
        )?;
        reply.expect_page("curl -x http://app.internal.com", EXTERNAL_MARK)?;

        let before = lab.nginx_requests(Role::External);
        lab.curl(&["-x", &proxy, &external_url()])?
            .expect_blocked("curl -x http://10.50.0.1")?;
        lab.curl(&["-x", &proxy, "--head", &external_url()])?
            .expect_blocked("curl -x --head http://10.50.0.1")?;
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "a blocked proxy request reached the external host"
        );

        let reply = lab.curl(&["-p", "-x", &proxy, &app_url()])?;
        ensure!(
            reply.connect_status == 200,
            "CONNECT app.internal.com:80 must be accepted: {reply}"
        );
        reply.expect_page(
            "curl -p -x http://app.internal.com (CONNECT)",
            EXTERNAL_MARK,
        )?;

        let before = lab.nginx_requests(Role::External);
        let reply = lab.curl(&["-p", "-x", &proxy, &external_url()])?;
        ensure!(
            reply.connect_status == 502 && reply.exit != 0 && reply.body.is_empty(),
            "CONNECT 10.50.0.1:80 must be refused with 502: {reply}"
        );
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "a refused CONNECT reached the external host"
        );
        lab.expect_running()
    });
}

/// ALLOW_ANY in the mesh ConfigMap lets unregistered traffic through to where it was going.
#[test]
fn allow_any_passes_unregistered_traffic_through() {
    run("allow-any", |lab| {
        let sink = lab.start_sink(Role::External, &format!("{EXTERNAL_IP}:9000"))?;
        start_locked_down(lab)?;
        lab.curl(&[&external_url()])?
            .expect_blocked("10.50.0.1 under REGISTRY_ONLY")?;

        lab.write_config("mesh.yaml", &scenario::mesh_config("ALLOW_ANY"))?;
        let reply = curl_until(lab, "ALLOW_ANY applied", &[&external_url()], |r| {
            r.status == 200
        })?;
        reply.expect_page("curl http://10.50.0.1 under ALLOW_ANY", EXTERNAL_MARK)?;
        ensure!(
            lab.nginx_requests(Role::External) >= 1,
            "the passthrough request never reached the external host"
        );

        let seen = lab.connect(Role::Pod, &sink.addr, "hello, not http\n", 10)?;
        ensure!(
            seen.received > 0 && lab.sink_accepts(&sink) == 1,
            "opaque TCP under ALLOW_ANY must pass through to {}: {seen:?}",
            sink.addr
        );
        lab.expect_running().context("after passthrough")
    });
}

/// IPv6 is captured too (ip6tables, original destination over IPv6): blocked, then passed
/// through under ALLOW_ANY.
#[test]
fn ipv6_is_captured_like_ipv4() {
    run("ipv6", |lab| {
        start_locked_down(lab)?;
        let before = lab.nginx_requests(Role::External);
        lab.curl(&["-g", &external_url6()])?
            .expect_blocked("curl http://[fd00:50::1]/ under REGISTRY_ONLY")?;
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "a blocked IPv6 request reached the external host"
        );
        lab.write_config("mesh.yaml", &scenario::mesh_config("ALLOW_ANY"))?;
        let reply = curl_until(lab, "ALLOW_ANY over IPv6", &["-g", &external_url6()], |r| {
            r.status == 200
        })?;
        reply.expect_page("curl http://[fd00:50::1]/ under ALLOW_ANY", EXTERNAL_MARK)?;
        lab.expect_running()
    });
}

/// Only running, ready pods are endpoints: a pod that is not ready gets no traffic until it
/// becomes ready.
#[test]
fn not_ready_pod_gets_no_traffic() {
    run("not-ready", |lab| {
        // Everything is in place before the start, so the first snapshot has the unready pod.
        lab.write_app_service()?;
        lab.write_config("pod.yaml", &scenario::pod_not_ready())?;
        start_locked_down(lab)?;
        let before = lab.nginx_requests(Role::InCluster);
        for attempt in 0..20 {
            lab.curl(&[&app_url()])?.expect_page(
                &format!(
                    "attempt {attempt}: only the external host serves while the pod is unready"
                ),
                EXTERNAL_MARK,
            )?;
        }
        ensure!(
            lab.nginx_requests(Role::InCluster) == before,
            "the unready pod received traffic"
        );
        lab.write_config("pod.yaml", scenario::POD)?;
        curl_until(lab, "the ready pod serves", &[&app_url()], |r| {
            r.body.contains(IN_CLUSTER_MARK)
        })?;
        lab.expect_running()
    });
}

/// Loop guard: a connection whose original destination is the proxy's own listener is never
/// forwarded to it again, even under ALLOW_ANY, and the proxy keeps serving.
#[test]
fn connection_to_own_listener_is_not_forwarded() {
    run("loop-guard", |lab| {
        lab.write_config("mesh.yaml", &scenario::mesh_config("ALLOW_ANY"))?;
        lab.apply_iptables()?;
        lab.start_portcullis(&[])?;
        for url in [
            format!("http://{}:15001/", scenario::POD_IP),
            "http://127.0.0.1:15001/".to_owned(),
        ] {
            let reply = lab.curl(&[&url])?;
            ensure!(
                reply.exit != 28 && reply.status != 200,
                "{url}: the proxy must refuse a connection to itself promptly: {reply}"
            );
        }
        lab.curl(&[&external_url()])?.expect_page(
            "passthrough still works after the loop attempts",
            EXTERNAL_MARK,
        )?;
        lab.expect_running()
    });
}

/// A Kubernetes ConfigMap mount (`..data` symlink swapped by the kubelet) reloads on every
/// update: a new key, a changed key, a removed key.
#[test]
fn configmap_symlink_swap_reloads() {
    run("configmap", |lab| {
        let mesh = scenario::mesh_config("REGISTRY_ONLY");
        let base = [
            ("mesh.yaml", mesh.as_str()),
            ("workloadentry.yaml", scenario::WORKLOAD_ENTRY),
        ];
        lab.publish_configmap(&base)?;
        lab.apply_iptables()?;
        lab.start_portcullis(&[])?;
        lab.curl(&[&app_url()])?
            .expect_blocked("app.internal.com before the ServiceEntry key exists")?;

        lab.publish_configmap(&[
            base[0],
            base[1],
            ("serviceentry.yaml", scenario::SERVICE_ENTRY),
        ])?;
        curl_until(
            lab,
            "the new ServiceEntry key applied",
            &[&app_url()],
            |r| r.status == 200,
        )?
        .expect_page(
            "app.internal.com after the ConfigMap gained the key",
            EXTERNAL_MARK,
        )?;

        let renamed = scenario::SERVICE_ENTRY.replace("app.internal.com", "app2.internal.com");
        lab.publish_configmap(&[base[0], base[1], ("serviceentry.yaml", renamed.as_str())])?;
        let app2 = ["-H", "Host: app2.internal.com", &app_url()];
        curl_until(lab, "the changed ServiceEntry key applied", &app2, |r| {
            r.status == 200
        })?
        .expect_page("app2.internal.com after the key changed", EXTERNAL_MARK)?;
        lab.curl(&[&app_url()])?
            .expect_blocked("app.internal.com after the key changed to app2")?;

        lab.publish_configmap(&base)?;
        curl_until(lab, "the removed ServiceEntry key applied", &app2, |r| {
            r.status == 502
        })?
        .expect_blocked("app2.internal.com after the key was removed")?;
        lab.expect_running()
    });
}
