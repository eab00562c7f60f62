//! Resolution modes against a real DNS server: dnsmasq in the lab answers the pod (and
//! portcullis in it), and its answers change during the tests.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::ensure;
use portcullis_e2e::scenario::{
    self, APP_VIP, EXTERNAL_IP, EXTERNAL_MARK, IN_CLUSTER_IP, IN_CLUSTER_MARK, ROGUE_IP,
    service_entry,
};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Reply, poll, run};

/// A ServiceEntry for one host on port 80 (HTTP) with `resolution` and no endpoints.
fn resolved_service(name: &str, host: &str, resolution: &str) -> String {
    service_entry(name, &[host], 80, "HTTP", resolution, "")
}

/// `curl` for `host` on port 80, dialled at the VIP where nothing listens, so only the
/// proxy's own resolution can decide where the request goes.
fn via_vip(lab: &mut Lab, host: &str) -> anyhow::Result<Reply> {
    lab.curl(&[
        "--resolve",
        &format!("{host}:80:{APP_VIP}"),
        &format!("http://{host}/"),
    ])
}

/// Which lab host served `reply`, if any.
fn served_by(reply: &Reply) -> Option<&'static str> {
    if reply.status != 200 {
        None
    } else if reply.body.contains(EXTERNAL_MARK) {
        Some("external")
    } else if reply.body.contains(IN_CLUSTER_MARK) {
        Some("in-cluster")
    } else {
        None
    }
}

/// REGISTRY_ONLY, `services`, rules, then portcullis with `extra` flags (after dnsmasq, so
/// its resolv.conf is the lab's).
fn start(lab: &mut Lab, services: &[(&str, String)], extra: &[&str]) -> anyhow::Result<()> {
    lab.write_registry_only()?;
    for (file, yaml) in services {
        lab.write_config(file, yaml)?;
    }
    lab.apply_iptables()?;
    lab.start_portcullis(extra)
}

/// DNS resolution follows the server's answers: a changed answer moves the traffic within a
/// few TTLs, a dead server keeps the last good answer, a name that never resolves gets `503
/// no healthy upstream`; DNS_ROUND_ROBIN uses one address, DNS uses them all.
#[test]
fn dns_resolution_follows_the_answers() {
    run("dns", |lab| {
        let hosts = |dns_ip: &str| {
            format!(
                "{dns_ip} dns.internal.com\n\
                 {EXTERNAL_IP} rr.internal.com\n{IN_CLUSTER_IP} rr.internal.com\n\
                 {EXTERNAL_IP} both.internal.com\n{IN_CLUSTER_IP} both.internal.com\n"
            )
        };
        lab.start_dnsmasq(&hosts(EXTERNAL_IP), "dns.internal.com", EXTERNAL_IP)?;
        start(
            lab,
            &[
                (
                    "dns.yaml",
                    resolved_service("dns", "dns.internal.com", "DNS"),
                ),
                (
                    "never.yaml",
                    resolved_service("never", "never.internal.com", "DNS"),
                ),
                (
                    "rr.yaml",
                    resolved_service("rr", "rr.internal.com", "DNS_ROUND_ROBIN"),
                ),
                (
                    "both.yaml",
                    resolved_service("both", "both.internal.com", "DNS"),
                ),
            ],
            // The lab's addresses are private, which the SSRF guard refuses for these
            // MESH_EXTERNAL services: off, every answer is used, as Istio uses them.
            &["--ssrf-guard", "off"],
        )?;

        let reply = poll("dns.internal.com resolved", RELOAD_DEADLINE, || {
            let reply = via_vip(lab, "dns.internal.com")?;
            Ok((reply.status == 200).then_some(reply))
        })?;
        reply.expect_page("dns.internal.com -> 10.50.0.1", EXTERNAL_MARK)?;

        // A name the server does not know never resolves: no endpoints.
        let reply = via_vip(lab, "never.internal.com")?;
        ensure!(
            reply.status == 503 && reply.body == "no healthy upstream",
            "a DNS host that never resolved must get `503 no healthy upstream`: {reply}"
        );
        // The access log is written in batches: the line comes within a flush.
        lab.expect_logged(
            "the 503 logged with flag UH",
            &["never.internal.com", " 503 UH "],
        )?;

        let (_, clusters) = lab.admin_get("/clusters")?;
        ensure!(
            !clusters.contains("ssrf_guard"),
            "with the guard off no answer is rejected:\n{clusters}"
        );

        // DNS_ROUND_ROBIN: one address at a time, so every request lands on the same host;
        // plain DNS with the same two records uses both.
        let mut rr = BTreeSet::new();
        let mut both = BTreeSet::new();
        for _ in 0..12 {
            let reply = via_vip(lab, "rr.internal.com")?;
            rr.insert(served_by(&reply).unwrap_or("neither"));
            let reply = via_vip(lab, "both.internal.com")?;
            both.insert(served_by(&reply).unwrap_or("neither"));
        }
        ensure!(
            rr.len() == 1 && !rr.contains("neither"),
            "DNS_ROUND_ROBIN must send every request to one address, saw {rr:?}"
        );
        ensure!(
            both == BTreeSet::from(["external", "in-cluster"]),
            "DNS with two A records must use both, saw {both:?}"
        );

        // The answer changes: within a bounded wait the traffic follows.
        lab.set_dns_hosts(&hosts(IN_CLUSTER_IP))?;
        let changed = Instant::now();
        poll(
            "dns.internal.com follows the new answer",
            Duration::from_secs(10),
            || {
                let reply = via_vip(lab, "dns.internal.com")?;
                Ok((served_by(&reply) == Some("in-cluster")).then_some(()))
            },
        )?;
        lab.note(format!(
            "traffic followed the new answer after {:?}",
            changed.elapsed()
        ));

        // The server goes away: refreshes fail, the last good answer keeps serving, past
        // several TTLs.
        lab.stop_peer("dnsmasq")?;
        let stopped = Instant::now();
        while stopped.elapsed() < Duration::from_secs(4) {
            let reply = via_vip(lab, "dns.internal.com")?;
            ensure!(
                served_by(&reply) == Some("in-cluster"),
                "with the DNS server gone the last good answer must keep serving: {reply}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        lab.expect_running()
    });
}

/// dnsmasq answering none.internal.com with the external host, and a listener on the rogue.
fn none_lab(lab: &mut Lab, extra: &[&str]) -> anyhow::Result<portcullis_e2e::lab::Sink> {
    let sink = lab.start_sink(portcullis_e2e::Role::Rogue, &format!("{ROGUE_IP}:80"))?;
    lab.start_dnsmasq(
        &format!("{EXTERNAL_IP} none.internal.com\n"),
        "none.internal.com",
        EXTERNAL_IP,
    )?;
    start(
        lab,
        &[(
            "none.yaml",
            resolved_service("none", "none.internal.com", "NONE"),
        )],
        extra,
    )?;
    Ok(sink)
}

/// Resolution NONE forwards to the original destination only when it is one of the host's
/// current DNS answers: `Host: none.internal.com` sent to another address is refused.
#[test]
fn none_resolution_is_confined_to_the_hosts_addresses() {
    run("none-strict", |lab| {
        let sink = none_lab(lab, &[])?;
        let reply = poll("none.internal.com served", RELOAD_DEADLINE, || {
            let reply = lab.curl(&["http://none.internal.com/"])?;
            Ok((reply.status == 200).then_some(reply))
        })?;
        reply.expect_page(
            "curl http://none.internal.com/ (resolved to 10.50.0.1)",
            EXTERNAL_MARK,
        )?;
        lab.curl(&[
            "-H",
            "Host: none.internal.com",
            &format!("http://{ROGUE_IP}/"),
        ])?
        .expect_blocked("Host: none.internal.com sent to the rogue's address")?;
        ensure!(
            lab.sink_accepts(&sink) == 0,
            "a spoofed Host with resolution NONE reached the rogue"
        );
        let rogue = format!("{ROGUE_IP}:80");
        lab.expect_logged(
            "the refusal logged with the host and the original destination",
            &["\"none.internal.com\"", &rogue, "block_all"],
        )?;
        lab.expect_running()
    });
}

/// `--permissive-none-resolution` restores Istio's behaviour: resolution NONE forwards to any
/// original destination, the spoofing hole Istio documents.
#[test]
fn permissive_none_resolution_matches_istio() {
    run("none-permissive", |lab| {
        let sink = none_lab(lab, &["--permissive-none-resolution"])?;
        let reply = lab.curl(&[
            "-H",
            "Host: none.internal.com",
            &format!("http://{ROGUE_IP}/"),
        ])?;
        ensure!(
            reply.status == 200 && reply.body == "sink\n" && lab.sink_accepts(&sink) == 1,
            "with --permissive-none-resolution the original destination is used: {reply}"
        );
        lab.curl(&[&format!("http://{}/", scenario::EXTERNAL_IP)])?
            .expect_blocked("an unregistered Host is still refused")?;
        lab.expect_running()
    });
}

/// The SSRF guard (on by default): an external service whose name resolves to a private lab
/// address or to loopback has no endpoints, `503 no healthy upstream` (UH) as Envoy answers
/// for a cluster without hosts, and the reason is logged and shown on the admin port; the
/// ServiceEntry's own `addresses` allow the address they name.
#[test]
fn ssrf_guard_refuses_non_public_answers() {
    run("ssrf-guard", |lab| {
        let hosts = format!(
            "{EXTERNAL_IP} private.internal.com\n127.0.0.1 loop.internal.com\n\
             {EXTERNAL_IP} allowed.internal.com\n"
        );
        lab.start_dnsmasq(&hosts, "private.internal.com", EXTERNAL_IP)?;
        let own_address = format!("  addresses:\n  - {EXTERNAL_IP}\n");
        start(
            lab,
            &[
                (
                    "private.yaml",
                    resolved_service("private", "private.internal.com", "DNS"),
                ),
                (
                    "loop.yaml",
                    resolved_service("loop", "loop.internal.com", "DNS_ROUND_ROBIN"),
                ),
                (
                    "allowed.yaml",
                    service_entry(
                        "allowed",
                        &["allowed.internal.com"],
                        80,
                        "HTTP",
                        "DNS",
                        &own_address,
                    ),
                ),
            ],
            &[],
        )?;

        let reply = poll("allowed.internal.com resolved", RELOAD_DEADLINE, || {
            let reply = via_vip(lab, "allowed.internal.com")?;
            Ok((reply.status == 200).then_some(reply))
        })?;
        reply.expect_page("allowed.internal.com -> its own address", EXTERNAL_MARK)?;

        let private = format!(
            r#"DNS answer {EXTERNAL_IP} for "private.internal.com" is private (RFC 1918) (SSRF guard)"#
        );
        let loopback = r#"DNS answer 127.0.0.1 for "loop.internal.com" is loopback (SSRF guard)"#;
        let clusters = poll("both rejections on /clusters", RELOAD_DEADLINE, || {
            let (_, clusters) = lab.admin_get("/clusters")?;
            Ok((clusters.contains(&private) && clusters.contains(loopback)).then_some(clusters))
        })?;
        ensure!(
            clusters.contains(&format!(
                "outbound|80||private.internal.com::{EXTERNAL_IP}::ssrf_guard::{private}"
            )),
            "the rejection must be listed under its cluster:\n{clusters}"
        );
        for host in ["private.internal.com", "loop.internal.com"] {
            let reply = via_vip(lab, host)?;
            ensure!(
                reply.status == 503 && reply.body == "no healthy upstream",
                "{host}: a name resolving only to non-public addresses must get `503 no healthy upstream`: {reply}"
            );
            lab.expect_logged(&format!("{host} refused with UH"), &[host, " 503 UH "])?;
        }
        let log = lab.portcullis_output();
        ensure!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains(&format!("DNS answer {EXTERNAL_IP}"))
                && l.contains("private (RFC 1918) (SSRF guard)")),
            "the rejection must be logged as a warning:\n{}",
            portcullis_e2e::cmd::tail(&log, 20)
        );
        let (_, dump) = lab.admin_get("/config_dump")?;
        ensure!(
            dump.contains(r#""reason": "loopback""#),
            "the reason must be in /config_dump"
        );
        let (_, metrics) = lab.admin_get("/stats/prometheus")?;
        let gauge = r#"envoy_cluster_ssrf_guard_dns_answers_rejected{cluster_name="outbound|80||private.internal.com"} 1"#;
        ensure!(
            metrics.contains(gauge),
            "the rejected answers must be counted: want {gauge}"
        );
        lab.expect_running()
    });
}
