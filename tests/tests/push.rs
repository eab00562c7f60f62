//! Issue 10, item 6: config pushes under load. portcullis runs as the pod's sidecar with its
//! config from a control plane over ADS (the control plane lives in this process and listens
//! on the pod's loopback), wrk loads it through the iptables redirect, and the control plane
//! pushes 100 changes of endpoints (EDS) and of the loaded host's route (RDS), then 10,000
//! EDS clusters with their endpoints, then a new service (its cluster, endpoints and virtual
//! host). Every push must be ACKed, every request must succeed, after each push the host must
//! be served by the cluster its route names now, and the new host once its pushes are ACKed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use portcullis_control_plane::ControlPlane;
use portcullis_control_plane::sidecar::{Color, HOST, Push, Sidecar, bulk};
use portcullis_e2e::lab::Role;
use portcullis_e2e::scenario::{
    EXTERNAL_IP, EXTERNAL_IP6, EXTERNAL_PAGE, IN_CLUSTER_IP, IN_CLUSTER_IP6, IN_CLUSTER_PAGE,
};
use portcullis_e2e::{Lab, run};
use tokio::runtime::Runtime;

/// Small pushes, alternating endpoints and routes.
const SMALL_PUSHES: usize = 100;
/// EDS clusters in the bulk push.
const BULK_CLUSTERS: usize = 10_000;
/// How long one push may take to be ACKed.
const ACK_DEADLINE: Duration = Duration::from_secs(60);
/// wrk's bound; it is stopped as soon as the pushes are done.
const WRK_BOUND_SECS: u64 = 80;

fn addr(ip: &str) -> SocketAddr {
    // An IPv6 literal needs brackets in a socket address.
    let text = if ip.contains(':') {
        format!("[{ip}]:80")
    } else {
        format!("{ip}:80")
    };
    text.parse().expect("a lab address")
}

/// The page the nginx behind each cluster serves.
fn page(color: Color) -> &'static str {
    match color {
        Color::Blue => EXTERNAL_PAGE,
        Color::Green => IN_CLUSTER_PAGE,
    }
}

/// Sends `pushes` and waits until portcullis has ACKed each; a NACK fails.
fn push_and_wait(
    rt: &Runtime,
    cp: &ControlPlane,
    node: &str,
    pushes: &[Push],
) -> anyhow::Result<Duration> {
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        for push in pushes {
            push.send(cp)?;
        }
        let mut last = start;
        for push in pushes {
            let acked = tokio::time::timeout(
                ACK_DEADLINE,
                cp.wait_acked(node, push.type_url, &push.names, start),
            )
            .await
            .with_context(|| {
                format!(
                    "no ACK of the {} push within {ACK_DEADLINE:?}",
                    push.type_url
                )
            })??;
            last = last.max(acked);
        }
        Ok(last - start)
    })
}

/// One request for [`HOST`] from the pod (redirected to portcullis): the body, which names
/// the upstream that answered.
fn served_by(lab: &mut Lab) -> anyhow::Result<String> {
    let reply = lab.curl(&[
        "-H",
        &format!("Host: {HOST}"),
        &format!("http://{EXTERNAL_IP}/"),
    ])?;
    ensure!(reply.status == 200, "{HOST} answered {reply}");
    Ok(reply.body)
}

/// wrk's totals: requests, socket errors, non-2xx/3xx responses.
fn wrk_totals(report: &str) -> anyhow::Result<(u64, u64, u64)> {
    let mut requests = None;
    let mut errors = 0;
    let mut non_2xx = 0;
    for line in report.lines().map(str::trim) {
        if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = rest.trim().parse()?;
        }
    }
    let requests =
        requests.with_context(|| format!("no request count in wrk's report:\n{report}"))?;
    Ok((requests, errors, non_2xx))
}

#[test]
fn pushes_under_load_fail_no_request_and_route_at_once() {
    run("pushes_under_load", |lab| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let sidecar = Sidecar::new(
            vec![addr(EXTERNAL_IP), addr(EXTERNAL_IP6)],
            vec![addr(IN_CLUSTER_IP), addr(IN_CLUSTER_IP6)],
        );
        let pod = lab.ns(Role::Pod);
        let cp = rt.block_on(ControlPlane::start_in_netns(
            &pod,
            "127.0.0.1:0".parse()?,
            None,
        ))?;
        for push in sidecar.initial() {
            push.send(&cp)?;
        }
        lab.apply_iptables()?;
        lab.start_portcullis_xds(&format!("http://{}", cp.local_addr()), &[])?;
        let node = cp
            .events()
            .into_iter()
            .find(|e| !e.node_id.is_empty())
            .map(|e| e.node_id)
            .context("portcullis never said who it is")?;
        ensure!(
            served_by(lab)? == page(Color::Blue),
            "the first route is blue"
        );

        lab.spawn_peer(
            Role::Pod,
            "wrk",
            "wrk",
            &[
                "-t1",
                "-c4",
                "-d",
                &format!("{WRK_BOUND_SECS}s"),
                "--timeout",
                "5s",
                "-H",
                &format!("Host: {HOST}"),
                &format!("http://{EXTERNAL_IP}/"),
            ],
            "INT",
        )?;
        std::thread::sleep(Duration::from_millis(500));

        let mut slowest = Duration::ZERO;
        for i in 0..SMALL_PUSHES {
            let small = sidecar.small(i);
            let took = push_and_wait(&rt, &cp, &node, std::slice::from_ref(&small.push))
                .with_context(|| format!("push {i}"))?;
            slowest = slowest.max(took);
            // ACK comes after the new config is in use: the next request follows it.
            let body = served_by(lab).with_context(|| format!("after push {i}"))?;
            if body != page(small.serving) {
                bail!(
                    "after push {i} ({}) {HOST} should be served by {:?} but got {body:?}",
                    if small.route { "route" } else { "endpoints" },
                    small.serving
                );
            }
        }
        lab.note(format!("{SMALL_PUSHES} pushes ACKed; slowest {slowest:?}"));

        let bulk_took =
            push_and_wait(&rt, &cp, &node, &bulk(BULK_CLUSTERS)).context("the bulk push")?;
        lab.note(format!(
            "{BULK_CLUSTERS} EDS clusters ACKed in {bulk_took:?}"
        ));
        let last = sidecar.small(SMALL_PUSHES - 1).serving;
        ensure!(
            served_by(lab)? == page(last),
            "after the bulk push {HOST} is still served by {last:?}"
        );
        let (status, clusters) = lab.admin_get("/clusters")?;
        ensure!(status == 200, "/clusters answered {status}");
        ensure!(
            clusters.contains("outbound|80||svc-9999.bulk.push.test"),
            "/clusters lists the bulk push's last cluster"
        );

        let new = sidecar.new_service(0, last);
        push_and_wait(&rt, &cp, &node, &new.pushes).context("the new service's pushes")?;
        let reply = lab.curl(&[
            "-H",
            &format!("Host: {}", new.host),
            &format!("http://{EXTERNAL_IP}/"),
        ])?;
        ensure!(
            reply.status == 200 && reply.body == page(Color::Blue),
            "{} once its pushes are ACKed answered {reply}",
            new.host
        );

        lab.expect_running()?;
        lab.stop_peer("wrk")?;
        let report = std::fs::read_to_string(lab.dir.join("wrk.stdout"))?;
        let (requests, errors, non_2xx) = wrk_totals(&report)?;
        lab.note(format!(
            "wrk: {requests} requests, {errors} socket errors, {non_2xx} non-2xx"
        ));
        ensure!(requests > 0, "wrk made no request:\n{report}");
        ensure!(
            errors == 0 && non_2xx == 0,
            "requests failed during the pushes:\n{report}"
        );
        // The load followed the route back and forth: each upstream served more than the
        // checks above sent it (one request per push, plus two).
        let (external, in_cluster) = (
            lab.nginx_requests(Role::External),
            lab.nginx_requests(Role::InCluster),
        );
        ensure!(
            external > SMALL_PUSHES + 2 && in_cluster > SMALL_PUSHES + 2,
            "both upstreams served the load: {external} and {in_cluster} requests"
        );
        drop(cp);
        Ok(())
    });
}
