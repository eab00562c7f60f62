//! Limits set by flags, upstream failures, reloads under load, draining and a lost config
//! folder, end to end: the real binary behind the pod's iptables capture, real nginx
//! upstreams, curl, wrk and the lab's own TCP client.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use portcullis_e2e::faults::{
    self, Background, curl_in_background, curl_result, wait_portcullis_exit, wrk_in_background,
    wrk_result,
};
use portcullis_e2e::scenario::{
    self, APP_HOST, EXTERNAL_IP, EXTERNAL_MARK, IN_CLUSTER_IP, IN_CLUSTER_MARK, ROGUE_IP,
    SELECT_EXTERNAL, service_entry,
};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Role, poll, run};

const BEFORE_HEADERS: &str = "upstream connect error or disconnect/reset before headers.";

/// Fails unless the access log gets a line holding every one of `parts`.
fn expect_logged(lab: &mut Lab, parts: &[&str]) -> anyhow::Result<()> {
    poll("an access log line", Duration::from_secs(5), || {
        let log = lab.portcullis_output();
        Ok(log
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)))
            .then_some(()))
    })
    .with_context(|| format!("no access log line with all of {parts:?}"))
}

/// A ServiceEntry for `host:port` served by the external host's WorkloadEntry.
fn external_service(name: &str, host: &str, port: u16) -> String {
    service_entry(name, &[host], port, "HTTP", "STATIC", SELECT_EXTERNAL)
}

/// REGISTRY_ONLY, the external host's WorkloadEntry, `files`, `names` resolving to the VIP
/// in the pod, the capture rules, and portcullis running with `extra` flags.
fn start(
    lab: &mut Lab,
    names: &[&str],
    files: &[(&str, String)],
    extra: &[&str],
) -> anyhow::Result<()> {
    lab.map_pod_names(names)?;
    lab.write_registry_only()?;
    lab.write_config("workloadentry.yaml", scenario::WORKLOAD_ENTRY)?;
    for (name, content) in files {
        lab.write_config(name, content)?;
    }
    lab.apply_iptables()?;
    lab.start_portcullis(extra)
}

/// Refused connection, connection closed without a response, stalled upstream, and a dead
/// endpoint among live ones, through the transparent listener.
#[test]
fn upstream_failures_answer_as_envoy_does() {
    run("upstream-failures", |lab| {
        let servers = format!(
            "server {{ listen {EXTERNAL_IP}:8081; root {{html}}; }}
server {{ listen {EXTERNAL_IP}:8080; return 444; }}"
        );
        lab.start_nginx_servers(
            Role::External,
            "faults",
            &servers,
            scenario::EXTERNAL_PAGE,
            8090,
        )?;
        faults::start_silent_server(lab, Role::External, "stall", EXTERNAL_IP, 9001)?;
        // A service whose endpoints are both nginx and an address with nothing listening.
        let several = service_entry(
            "several",
            &["several.internal.com"],
            80,
            "HTTP",
            "STATIC",
            &format!(
                "  endpoints:\n  - address: {EXTERNAL_IP}\n  - address: {ROGUE_IP}\n  - address: {IN_CLUSTER_IP}\n"
            ),
        );
        start(
            lab,
            &[
                "up.internal.com",
                "hangup.internal.com",
                "stall.internal.com",
                "several.internal.com",
            ],
            &[
                ("up.yaml", external_service("up", "up.internal.com", 8081)),
                (
                    "hangup.yaml",
                    external_service("hangup", "hangup.internal.com", 8080),
                ),
                (
                    "stall.yaml",
                    external_service("stall", "stall.internal.com", 9001),
                ),
                ("several.yaml", several),
            ],
            &["--route-timeout", "1s"],
        )?;
        lab.curl(&["http://up.internal.com:8081/"])?
            .expect_page("up.internal.com while nginx runs", EXTERNAL_MARK)?;

        // nginx's `return 444` closes the connection without a response. Istio's default
        // retry policy has no `reset`: neither a bodiless request nor one with a body is
        // sent again.
        let reply = lab.curl(&["http://hangup.internal.com:8080/"])?;
        ensure!(
            reply.status == 503
                && reply.header("server") == Some("envoy")
                && reply.body == format!("{BEFORE_HEADERS} reset reason: connection termination"),
            "an upstream closing before its response: {reply}"
        );
        expect_logged(lab, &["\"GET / HTTP/1.1\" 503 UC", "hangup.internal.com"])?;
        let reply = lab.curl(&["-d", "payload", "http://hangup.internal.com:8080/"])?;
        ensure!(
            reply.status == 503
                && reply.body == format!("{BEFORE_HEADERS} reset reason: connection termination"),
            "a POST to an upstream closing before its response: {reply}"
        );
        expect_logged(lab, &["\"POST / HTTP/1.1\" 503 UC", "hangup.internal.com"])?;

        // An upstream that accepts and never answers: 504 after the route timeout.
        let start = Instant::now();
        let reply = lab.curl(&["http://stall.internal.com:9001/"])?;
        let took = start.elapsed();
        ensure!(
            reply.status == 504
                && reply.body == "upstream request timeout"
                && took >= Duration::from_secs(1)
                && took < Duration::from_secs(4),
            "a stalled upstream with --route-timeout 1s, after {took:?}: {reply}"
        );
        expect_logged(lab, &["504 UT", "stall.internal.com"])?;
        // The client giving up first: status 0 and DC in the access log.
        let reply = lab.curl(&["--max-time", "0.5", "http://stall.internal.com:9001/gone"])?;
        ensure!(reply.exit == 28, "curl must give up first: {reply}");
        expect_logged(lab, &["\"GET /gone HTTP/1.1\" 0 DC", "stall.internal.com"])?;

        // One dead endpoint among three costs no request.
        let mut marks = (0, 0);
        for i in 0..30 {
            let reply = lab.curl(&["http://several.internal.com/"])?;
            ensure!(
                reply.status == 200,
                "request {i} to a service with a dead endpoint failed: {reply}"
            );
            if reply.body.contains(EXTERNAL_MARK) {
                marks.0 += 1;
            } else if reply.body.contains(IN_CLUSTER_MARK) {
                marks.1 += 1;
            }
        }
        ensure!(
            marks.0 + marks.1 == 30 && marks.0 > 0 && marks.1 > 0,
            "30 requests should be served by both live endpoints: {marks:?}"
        );

        // nginx stopped: the connection is refused.
        lab.stop_peer("nginx-faults")?;
        let reply = lab.curl(&["http://up.internal.com:8081/"])?;
        ensure!(
            reply.status == 503
                && reply.body
                    == format!(
                        "{BEFORE_HEADERS} retried and the latest reset reason: remote connection failure"
                    ),
            "up.internal.com with nginx stopped: {reply}"
        );
        expect_logged(lab, &["503 URX,UF", "up.internal.com"])?;
        lab.expect_running()
    });
}

/// The registry version portcullis serves, from `/stats`.
fn registry_version(lab: &mut Lab) -> anyhow::Result<u64> {
    let (status, stats) = lab.admin_get("/stats")?;
    ensure!(status == 200, "/stats answered {status}");
    stats
        .lines()
        .find_map(|l| l.strip_prefix("server.registry_version: "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| "no server.registry_version in /stats".to_owned())
}

/// The ServiceEntry of app.internal.com, with a second host on odd `i`: a different
/// registry every time, app.internal.com always registered.
fn alternating_service_entry(i: usize) -> String {
    if i.is_multiple_of(2) {
        scenario::SERVICE_ENTRY.to_owned()
    } else {
        scenario::SERVICE_ENTRY.replace(
            "  - app.internal.com\n",
            "  - app.internal.com\n  - also.internal.com\n",
        )
    }
}

/// 100 registry reloads during a wrk run fail no request and drop no connection; then the
/// config folder made unreadable, and deleted, leaves the last good registry serving.
#[test]
fn reloads_under_load_and_a_lost_config_folder() {
    if !faults::have_wrk().unwrap_or_else(|e| panic!("{e:#}")) {
        let banner = "\n!!!!!!!!!! SKIPPED: reloads under load: wrk is missing !!!!!!!!!!\n\n";
        let _ = std::io::stderr().write_all(banner.as_bytes());
        return;
    }
    run("reload-load", |lab| {
        let app = format!("http://{APP_HOST}/");
        start(
            lab,
            &[],
            &[
                ("serviceentry.yaml", scenario::SERVICE_ENTRY.to_owned()),
                ("pod.yaml", scenario::POD.to_owned()),
            ],
            &["--rescan-interval", "1s"],
        )?;
        lab.curl(&[&app])?.expect_page("before the load", "")?;
        let before = registry_version(lab)?;

        let wrk = wrk_in_background(lab, &app, 5, 16);
        std::thread::sleep(Duration::from_millis(300));
        let reloads = 100;
        for i in 1..=reloads {
            lab.write_config("serviceentry.yaml", &alternating_service_entry(i))?;
            faults::signal_portcullis(lab, "HUP")?;
            std::thread::sleep(Duration::from_millis(40));
        }
        let summary = wrk_result(lab, wrk)?;
        let after = registry_version(lab)?;
        // Changes that arrive while a build runs fold into the next build (by design), so on
        // a loaded machine a few of the 100 land together.
        ensure!(
            after >= before + reloads as u64 / 2,
            "expected about {reloads} reloads during the run, the registry went from version {before} to {after}"
        );
        ensure!(
            summary.requests >= 1000 && summary.non_2xx == 0 && summary.socket_errors.is_none(),
            "wrk during {reloads} reloads: {summary:?}"
        );

        // The folder unreadable for the proxy's uid: the last good registry keeps serving.
        set_mode(lab, 0o000)?;
        let error = path_error_shown(lab)?;
        lab.curl(&[&app])?
            .expect_page("with the config folder unreadable", "")?;
        set_mode(lab, 0o755)?;
        poll("path_error cleared", RELOAD_DEADLINE, || {
            let (_, dump) = lab.admin_get("/config_dump")?;
            Ok(dump.contains("\"path_error\": null").then_some(()))
        })?;

        // The folder deleted. Moved out of the way first, so it goes in one step: `rm -rf`
        // empties it file by file, and a rescan in between rightly applies the removals.
        let gone = lab.dir.join("config-deleted");
        std::fs::rename(&lab.config_dir, &gone)?;
        std::fs::remove_dir_all(&gone)?;
        lab.note("deleted the config folder".into());
        path_error_shown(lab)?;
        for attempt in 0..5 {
            lab.curl(&[&app])?.expect_page(
                &format!("attempt {attempt} with the config folder deleted"),
                "",
            )?;
        }
        lab.curl(&[&format!("http://{EXTERNAL_IP}/")])?
            .expect_blocked("an unregistered address with the config folder deleted")?;
        let log = lab.portcullis_output();
        ensure!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains("UNREADABLE_PATH")),
            "the log must say the config path cannot be read (first seen: {error})"
        );
        lab.expect_running()
    });
}

fn set_mode(lab: &mut Lab, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&lab.config_dir, std::fs::Permissions::from_mode(mode))?;
    lab.note(format!("config folder mode {mode:o}"));
    Ok(())
}

/// Waits until `/config_dump` shows a `path_error`; returns the dump's line with it.
fn path_error_shown(lab: &mut Lab) -> anyhow::Result<String> {
    poll("path_error in /config_dump", RELOAD_DEADLINE, || {
        let (status, dump) = lab.admin_get("/config_dump")?;
        ensure!(status == 200, "/config_dump answered {status}");
        Ok(dump
            .lines()
            .find(|l| l.contains("\"path_error\"") && l.contains("UNREADABLE_PATH"))
            .map(|l| l.trim().to_owned()))
    })
}

/// Bytes of the slow nginx's small file: about 1.5 s at its rate limit.
const SLOW_SIZE: usize = 300 * 1024;
/// Bytes of its large file: about 10 s, longer than any drain deadline here.
const HUGE_SIZE: usize = 2 * 1024 * 1024;

/// An nginx on the external host's port 8080 sending at 200 KiB/s, serving `/slow.bin` and
/// `/huge.bin`, registered as slow.internal.com:8080; portcullis running with `extra`.
fn start_slow(lab: &mut Lab, extra: &[&str]) -> anyhow::Result<()> {
    let servers =
        format!("server {{ listen {EXTERNAL_IP}:8080; root {{html}}; limit_rate 200k; }}");
    let nginx = lab.start_nginx_servers(
        Role::External,
        "slow",
        &servers,
        scenario::EXTERNAL_PAGE,
        8090,
    )?;
    for (name, size) in [("slow.bin", SLOW_SIZE), ("huge.bin", HUGE_SIZE)] {
        use std::os::unix::fs::PermissionsExt;
        let path = nginx.home.join("html").join(name);
        std::fs::write(&path, vec![b'x'; size])?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    start(
        lab,
        &["slow.internal.com"],
        &[(
            "slow.yaml",
            external_service("slow", "slow.internal.com", 8080),
        )],
        extra,
    )
}

/// Waits until portcullis has `n` requests in flight to slow.internal.com.
fn wait_in_flight(lab: &mut Lab, n: u64) -> anyhow::Result<()> {
    let stat = format!("outbound|8080||slow.internal.com::{EXTERNAL_IP}:8080::rq_active::");
    poll(
        &format!("{n} requests in flight"),
        Duration::from_secs(10),
        || {
            let (_, clusters) = lab.admin_get("/clusters")?;
            let active = clusters
                .lines()
                .find_map(|l| l.strip_prefix(stat.as_str()))
                .and_then(|v| v.trim().parse::<u64>().ok());
            Ok((active == Some(n)).then_some(()))
        },
    )
}

/// Polls a new connection until the proxy refuses it (curl exit 7).
fn wait_refused(lab: &mut Lab, what: &str) -> anyhow::Result<()> {
    poll(what, Duration::from_secs(3), || {
        let reply = lab.curl(&["http://slow.internal.com:8080/"])?;
        Ok((reply.exit == 7).then_some(()))
    })
    .map(drop)
}

fn slow_url(file: &str) -> String {
    format!("http://slow.internal.com:8080/{file}")
}

/// SIGTERM with requests in flight: no new connections, every request that finishes
/// within the drain deadline completes, the one that would not is cut at the deadline,
/// and the process exits 0.
#[test]
fn sigterm_drains_in_flight_requests_then_exits_0() {
    run("sigterm-drain", |lab| {
        start_slow(lab, &["--drain-timeout", "4s"])?;
        let curls: Vec<Background> = (0..8)
            .map(|_| curl_in_background(lab, &slow_url("slow.bin"), 20))
            .collect();
        let huge = curl_in_background(lab, &slow_url("huge.bin"), 20);
        wait_in_flight(lab, 9)?;

        faults::signal_portcullis(lab, "TERM")?;
        let signalled = Instant::now();
        lab.note("sent SIGTERM to portcullis".into());
        wait_refused(lab, "new connections refused after SIGTERM")?;
        for (i, curl) in curls.into_iter().enumerate() {
            let (exit, status, size) = curl_result(lab, curl)?;
            ensure!(
                exit == 0 && status == 200 && size == SLOW_SIZE as u64,
                "in-flight request {i}: curl exit {exit}, status {status}, {size} of {SLOW_SIZE} bytes"
            );
        }
        let (status, took) = wait_portcullis_exit(lab, Duration::from_secs(10))?;
        let after_signal = signalled.elapsed();
        ensure!(
            status == "exit status: 0",
            "portcullis must exit 0 after draining: {status}"
        );
        ensure!(
            after_signal >= Duration::from_secs(3) && after_signal < Duration::from_secs(6),
            "with a request still open portcullis must exit at the 4 s drain deadline, \
             exited {after_signal:?} after SIGTERM ({took:?} of waiting)"
        );
        let (exit, _, size) = curl_result(lab, huge)?;
        ensure!(
            exit != 0 && size < HUGE_SIZE as u64,
            "the request outliving the drain deadline is cut: curl exit {exit}, {size} bytes"
        );
        let log = lab.portcullis_output();
        let completed = log
            .lines()
            .filter(|l| l.contains("\"GET /slow.bin HTTP/1.1\" 200"))
            .count();
        ensure!(
            completed == 8,
            "8 access log lines for the drained requests, found {completed}"
        );
        Ok(())
    });
}

/// `POST /drain_listeners`: readiness turns 503 DRAINING, new connections are refused, an
/// open request finishes, the process keeps running; `POST /quitquitquit` then exits 0.
#[test]
fn drain_listeners_drains_without_exiting() {
    run("drain-listeners", |lab| {
        start_slow(lab, &[])?;
        let open = curl_in_background(lab, &slow_url("slow.bin"), 20);
        wait_in_flight(lab, 1)?;

        let reply = lab.curl(&["-X", "POST", "http://127.0.0.1:15000/drain_listeners"])?;
        ensure!(reply.status == 200, "POST /drain_listeners: {reply}");
        let reply = lab.curl(&["http://127.0.0.1:15021/healthz/ready"])?;
        ensure!(
            reply.status == 503 && reply.body.trim() == "DRAINING",
            "/healthz/ready while draining: {reply}"
        );
        let (status, body) = lab.admin_get("/ready")?;
        ensure!(
            status == 503 && body.trim() == "DRAINING",
            "/ready while draining: {status} {body:?}"
        );
        wait_refused(lab, "new connections refused after /drain_listeners")?;

        let (exit, status, size) = curl_result(lab, open)?;
        ensure!(
            exit == 0 && status == 200 && size == SLOW_SIZE as u64,
            "the open request: curl exit {exit}, status {status}, {size} of {SLOW_SIZE} bytes"
        );
        std::thread::sleep(Duration::from_millis(500));
        lab.expect_running()
            .context("portcullis must keep running after /drain_listeners")?;
        let (status, _) = lab.admin_get("/config_dump")?;
        ensure!(status == 200, "the admin port must keep answering");

        let reply = lab.curl(&["-X", "POST", "http://127.0.0.1:15000/quitquitquit"])?;
        ensure!(reply.status == 200, "POST /quitquitquit: {reply}");
        let (status, took) = wait_portcullis_exit(lab, Duration::from_secs(8))?;
        ensure!(
            status == "exit status: 0" && took < Duration::from_secs(2),
            "nothing open: /quitquitquit must exit 0 at once, got {status} after {took:?}"
        );
        Ok(())
    });
}

/// Counter `name` from the metrics port (15090), 0 when absent.
fn counter(lab: &mut Lab, name: &str) -> anyhow::Result<u64> {
    let reply = lab.curl(&["http://127.0.0.1:15090/stats/prometheus"])?;
    ensure!(reply.status == 200, "/stats/prometheus: {reply}");
    Ok(reply
        .body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0))
}

/// The limits as the binary's flags set them, with real clients: an oversized head, a head
/// that never ends, an idle keep-alive connection, and the connection limit.
#[test]
fn limits_set_by_flags() {
    run("limits", |lab| {
        start_slow(
            lab,
            &[
                "--request-headers-timeout",
                "1s",
                "--idle-timeout",
                "3s",
                "--max-connections",
                "2",
            ],
        )?;
        let vip = format!("{}:8080", scenario::APP_VIP);

        let big = format!("x-big: {}", "a".repeat(70 * 1024));
        let reply = lab.curl(&["-H", &big, &slow_url("")])?;
        ensure!(reply.status == 431, "a 70 KiB request head: {reply}");
        ensure!(
            counter(lab, "envoy_http_downstream_cx_protocol_error")? == 1,
            "the 431 is counted as a protocol error"
        );

        // A head that never ends is cut at the request-headers timeout (1 s), well before
        // the idle timeout (3 s).
        let start = Instant::now();
        let partial = "GET / HTTP/1.1\r\nHost: slow.internal.com:8080\r\n";
        let seen = lab.connect(Role::Pod, &vip, partial, 8)?;
        let took = start.elapsed();
        ensure!(
            seen.connected
                && seen.end != "timeout"
                && took >= Duration::from_secs(1)
                && took < Duration::from_millis(2500),
            "an unfinished head must be closed after 1 s, took {took:?}: {}",
            seen.line
        );
        ensure!(
            counter(lab, "envoy_http_downstream_rq_header_timeout")? == 1,
            "the cut head is counted"
        );

        // A keep-alive connection idle after its response is closed at the idle timeout.
        let start = Instant::now();
        let whole = "GET / HTTP/1.1\r\nHost: slow.internal.com:8080\r\n\r\n";
        let seen = lab.connect(Role::Pod, &vip, whole, 8)?;
        let took = start.elapsed();
        ensure!(
            seen.line.contains("200 OK")
                && seen.end == "eof"
                && took >= Duration::from_secs(3)
                && took < Duration::from_secs(6),
            "an idle keep-alive connection must be closed after 3 s, took {took:?}: {}",
            seen.line
        );
        ensure!(
            counter(lab, "envoy_http_downstream_cx_idle_timeout")? == 1,
            "the idle close is counted"
        );

        // Two connections open: the third is closed at once, the two finish.
        let open: Vec<Background> = (0..2)
            .map(|_| curl_in_background(lab, &slow_url("slow.bin"), 20))
            .collect();
        wait_in_flight(lab, 2)?;
        let reply = lab.curl(&[&slow_url("")])?;
        ensure!(
            reply.status == 0 && matches!(reply.exit, 52 | 56),
            "a third connection beyond --max-connections 2 must be closed unanswered: {reply}"
        );
        ensure!(
            counter(lab, "envoy_listener_downstream_cx_overflow")? == 1,
            "the refused connection is counted"
        );
        for (i, curl) in open.into_iter().enumerate() {
            let (exit, status, size) = curl_result(lab, curl)?;
            ensure!(
                exit == 0 && status == 200 && size == SLOW_SIZE as u64,
                "open connection {i}: curl exit {exit}, status {status}, {size} bytes"
            );
        }
        let reply = poll("a place freed", Duration::from_secs(5), || {
            let reply = lab.curl(&[&slow_url("")])?;
            Ok((reply.status == 200).then_some(reply))
        })?;
        reply.expect_page("a new connection once the others closed", EXTERNAL_MARK)?;
        lab.expect_running()
    });
}
