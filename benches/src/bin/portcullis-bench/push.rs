//! `portcullis-bench push`: config pushes under load, portcullis beside Envoy (issue 10,
//! item 6).
//!
//! For each repetition and each proxy in turn: a fresh control plane (in this process,
//! listening on the pod's loopback), the proxy started in the pod as a sidecar (uid 1337,
//! the iptables redirect, vCPU 0) with config over ADS (Delta, as istiod prefers), wrk
//! through it, then the same pushes to both: `small` pushes alternating endpoint (EDS) and
//! route (RDS) changes, each waited for until ACKed, then one push of `bulk` EDS clusters and
//! their endpoints. Push-to-ACK is the control plane's clock from just before the push to the
//! ACK of the last response that carried it (`ControlPlane::wait_acked`); RSS is read after
//! the bulk push is ACKed and the proxy has settled for a second. With the bulk clusters held,
//! more small pushes, then (issue 13) new services one at a time, each timed from just before
//! its pushes until a request from the pod to its new host first gets the upstream's page.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use portcullis_control_plane::ControlPlane;
use portcullis_control_plane::sidecar::{self, Color, HOST, NewService, Push, Sidecar};
use tokio::runtime::Runtime;
use tokio::time::Instant;

use crate::lab::{self, Lab, Ns, signal};
use crate::measure::{Wrk, finish, median, parse_wrk, rss_kib};

/// The pod's second address on the upstream's link, so that endpoint changes switch
/// between real, distinct endpoints.
const UP_FROM_POD_2: &str = "10.251.2.3";
/// How long one push may take to be ACKed before the run fails.
const ACK_DEADLINE: Duration = Duration::from_secs(120);
/// wrk's connections during the pushes.
const WRK_CONNECTIONS: u32 = 10;
/// The pause between two polls of a new host: short beside the times measured, long enough
/// that the polls add little to the proxy's load.
const POLL_GAP: Duration = Duration::from_millis(1);
/// How long a new host may take to be served before the run fails.
const SERVE_DEADLINE: Duration = Duration::from_secs(60);
/// How long one poll may wait for the proxy.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// The flags of `portcullis-bench push`.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The portcullis binary (a release build); also installs the pod's iptables rules.
    #[arg(long)]
    pub portcullis: PathBuf,
    /// Envoy's binary; Envoy is left out when not given.
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Leave portcullis out (measure Envoy alone).
    #[arg(long)]
    pub skip_portcullis: bool,
    /// Repetitions (each proxy once per repetition, fresh each time; default 3, 1 with
    /// --quick).
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Validate the harness: one repetition.
    #[arg(long)]
    pub quick: bool,
    /// Small pushes (endpoints and routes, alternating).
    #[arg(long, default_value_t = 100)]
    pub small: usize,
    /// EDS clusters in the bulk push.
    #[arg(long, default_value_t = 10_000)]
    pub bulk: usize,
    /// Small pushes after the bulk push, with its clusters held (the steady state of a
    /// large mesh).
    #[arg(long, default_value_t = 20)]
    pub after_bulk: usize,
    /// New services added one at a time after those, each timed until its host is served.
    #[arg(long, default_value_t = 10)]
    pub new_services: usize,
    /// Also write the report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Keep the run folder (configs and logs) even on success.
    #[arg(long)]
    pub keep: bool,
}

/// What one proxy did in one repetition.
#[derive(Debug, Clone)]
struct Sample {
    proxy: &'static str,
    /// Push-to-ACK of each small push, in milliseconds.
    small_ms: Vec<f64>,
    /// Push-to-ACK of the bulk push, in milliseconds.
    bulk_ms: f64,
    /// Push-to-ACK of each small push after the bulk push, in milliseconds.
    after_ms: Vec<f64>,
    /// The proxy's CPU time per small push after the bulk push, in milliseconds.
    after_cpu_ms: f64,
    rss_ready_kib: u64,
    rss_before_bulk_kib: u64,
    rss_after_bulk_kib: u64,
    /// The proxy's CPU time over the bulk push, in milliseconds.
    bulk_cpu_ms: f64,
    /// Each new service's push-to-ACK (its three pushes), in milliseconds.
    new_ack_ms: Vec<f64>,
    /// Each new service's change-to-serving, in milliseconds.
    new_serve_ms: Vec<f64>,
    /// Each new service's poll window ([`Served::window`]), in milliseconds.
    new_window_ms: Vec<f64>,
    wrk: Wrk,
}

/// Which proxy a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Portcullis,
    Envoy,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Portcullis => "portcullis",
            Proxy::Envoy => "Envoy",
        }
    }
}

/// Runs the comparison and prints (and optionally writes) its report.
pub fn run(args: &PushArgs, exe: &Path) -> anyhow::Result<()> {
    let repetitions = args.repetitions.unwrap_or(if args.quick { 1 } else { 3 });
    let mut proxies = Vec::new();
    if !args.skip_portcullis {
        proxies.push(Proxy::Portcullis);
    }
    if args.envoy.is_some() {
        proxies.push(Proxy::Envoy);
    }
    if proxies.is_empty() {
        bail!("nothing to measure: give --envoy or drop --skip-portcullis");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut lab = Lab::new()?;
    let started = std::time::Instant::now();
    // The upstream's TLS port is not used here, but its nginx needs a certificate.
    let tls = lab.mkdir("tls")?;
    crate::lab::make_test_ca(&tls)?;
    crate::start_upstream(&mut lab, exe, &tls)?;
    lab.run_in(
        Ns::Up,
        "ip",
        &[
            "addr",
            "add",
            &format!("{UP_FROM_POD_2}/24"),
            "dev",
            "v-pod",
        ],
    )?;
    let bin = lab.private_copy(&args.portcullis, "portcullis")?;
    lab.run_in(
        Ns::Pod,
        &bin.display().to_string(),
        &["iptables", "--apply"],
    )?;
    let envoy = args
        .envoy
        .as_ref()
        .map(|e| lab.private_copy(e, "envoy"))
        .transpose()?;

    let mut samples = Vec::new();
    for rep in 0..repetitions {
        for &proxy in &proxies {
            eprintln!("rep {}/{repetitions} {}", rep + 1, proxy.name());
            let binary = match proxy {
                Proxy::Portcullis => &bin,
                Proxy::Envoy => envoy.as_ref().context("no Envoy")?,
            };
            let sample = one(&mut lab, &rt, args, proxy, binary, rep)?;
            eprintln!(
                "  small push→ACK median {:.1} ms max {:.1} ms; bulk {:.0} ms; after it {:.1} ms ({:.1} ms CPU); RSS {:.1} → {:.1} MiB; new host push→ACK median {:.1} ms, served median {:.1} ms max {:.1} ms (poll window median {:.2} ms); {} requests, {} failed",
                median(&sample.small_ms),
                max(&sample.small_ms),
                sample.bulk_ms,
                median(&sample.after_ms),
                sample.after_cpu_ms,
                sample.rss_before_bulk_kib as f64 / 1024.0,
                sample.rss_after_bulk_kib as f64 / 1024.0,
                median(&sample.new_ack_ms),
                median(&sample.new_serve_ms),
                max(&sample.new_serve_ms),
                median(&sample.new_window_ms),
                sample.wrk.requests,
                sample.wrk.failures(),
            );
            let each: Vec<String> = sample
                .new_serve_ms
                .iter()
                .map(|ms| format!("{ms:.1}"))
                .collect();
            eprintln!(
                "  each new service's change→serving, ms: {}",
                each.join(" ")
            );
            samples.push((rep, sample));
        }
    }
    let out = report(args, repetitions, &samples, started.elapsed());
    lab.keep_dir = args.keep;
    drop(lab);
    println!("{out}");
    if let Some(path) = &args.report {
        std::fs::write(path, &out)?;
    }
    let failed: u64 = samples.iter().map(|(_, s)| s.wrk.failures()).sum();
    if failed > 0 {
        bail!("{failed} requests failed during the pushes");
    }
    Ok(())
}

/// One proxy, fresh, through the whole push sequence under load.
fn one(
    lab: &mut Lab,
    rt: &Runtime,
    args: &PushArgs,
    proxy: Proxy,
    binary: &Path,
    rep: usize,
) -> anyhow::Result<Sample> {
    let port =
        |ip: &str| -> anyhow::Result<std::net::SocketAddr> { Ok(format!("{ip}:80").parse()?) };
    let sidecar = Sidecar::new(
        vec![port(lab::UP_FROM_POD)?, port(UP_FROM_POD_2)?],
        vec![port(UP_FROM_POD_2)?],
    );
    let netns = lab.ns(Ns::Pod);
    let cp = rt.block_on(ControlPlane::start_in_netns(
        &netns,
        "127.0.0.1:0".parse()?,
        None,
    ))?;
    let cp_addr = cp.local_addr();
    for push in sidecar.initial() {
        push.send(&cp)?;
    }
    let name = format!("push-{}-{rep}", proxy.name().to_lowercase());
    let pid = match proxy {
        Proxy::Portcullis => start_portcullis(lab, binary, &name, cp_addr)?,
        Proxy::Envoy => start_envoy(lab, binary, &name, cp_addr)?,
    };
    let url = format!("http://{}/", lab::UP_FROM_POD);
    let host = format!("Host: {HOST}");
    lab.wait_for(
        &format!("{name} serves {HOST}"),
        Duration::from_secs(30),
        |l| l.serves_page(Ns::Pod, &["-H", &host, &url]),
    )?;
    let node_id = cp
        .events()
        .into_iter()
        .find(|e| !e.node_id.is_empty())
        .map(|e| e.node_id)
        .context("the proxy never said who it is")?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_ready_kib = rss_kib(pid);

    let mut wrk = lab.pinned(Ns::Pod, "wrk");
    wrk.args(["-t1", "-c", &WRK_CONNECTIONS.to_string(), "-d", "600s"])
        .args(["--timeout", "5s", "--latency", "-H", &host, &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let wrk = wrk.spawn()?;
    let wrk_pid = wrk.id();
    let measured = pushes(lab, rt, &cp, &sidecar, &node_id, args, pid);
    signal(wrk_pid, "INT");
    let wrk = finish(wrk, Duration::from_secs(30), parse_wrk);
    let Measured {
        small_ms,
        bulk_ms,
        rss_before_bulk_kib,
        rss_after_bulk_kib,
        bulk_cpu_ms,
        after_ms,
        after_cpu_ms,
        new_ack_ms,
        new_serve_ms,
        new_window_ms,
    } = measured?;
    let wrk = wrk?;
    lab.check_running()?;
    if !lab.serves_page(Ns::Pod, &["-H", &host, &url]) {
        bail!("{name} no longer serves {HOST} after the pushes");
    }
    lab.stop(pid);
    drop(cp);
    Ok(Sample {
        proxy: proxy.name(),
        small_ms,
        bulk_ms,
        after_ms,
        after_cpu_ms,
        rss_ready_kib,
        rss_before_bulk_kib,
        rss_after_bulk_kib,
        bulk_cpu_ms,
        new_ack_ms,
        new_serve_ms,
        new_window_ms,
        wrk,
    })
}

/// What [`pushes`] measures.
struct Measured {
    /// Push-to-ACK of each small push (ms).
    small_ms: Vec<f64>,
    /// Push-to-ACK of the bulk push (ms).
    bulk_ms: f64,
    /// RSS before and after the bulk push (KiB).
    rss_before_bulk_kib: u64,
    rss_after_bulk_kib: u64,
    /// The proxy's CPU time over the bulk push (ms).
    bulk_cpu_ms: f64,
    /// Push-to-ACK of each small push after the bulk push (ms).
    after_ms: Vec<f64>,
    /// The proxy's CPU time per small push after the bulk push (ms; wrk's load included).
    after_cpu_ms: f64,
    /// Per new service: push-to-ACK, change-to-serving and the poll window (ms).
    new_ack_ms: Vec<f64>,
    new_serve_ms: Vec<f64>,
    new_window_ms: Vec<f64>,
}

fn pushes(
    lab: &mut Lab,
    rt: &Runtime,
    cp: &ControlPlane,
    sidecar: &Sidecar,
    node_id: &str,
    args: &PushArgs,
    pid: u32,
) -> anyhow::Result<Measured> {
    // Lets wrk's connections open before the first push.
    std::thread::sleep(Duration::from_millis(500));
    let mut small_ms = Vec::with_capacity(args.small);
    for i in 0..args.small {
        let small = sidecar.small(i);
        let took = timed(rt, cp, node_id, std::slice::from_ref(&small.push))
            .with_context(|| format!("small push {i}"))?;
        small_ms.push(took.as_secs_f64() * 1e3);
        if i % 10 == 9 {
            lab.check_running()?;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kib(pid);
    let cpu_before = crate::measure::cpu_ns(pid);
    let bulk = sidecar::bulk(args.bulk);
    let took = timed(rt, cp, node_id, &bulk).context("the bulk push")?;
    let cpu_ms = crate::measure::cpu_ns(pid).saturating_sub(cpu_before) as f64 / 1e6;
    // Lets the proxy finish what follows the ACK (freeing the old config, warming).
    std::thread::sleep(Duration::from_secs(1));
    lab.check_running()?;
    let rss_after = rss_kib(pid);
    let mut after_ms = Vec::with_capacity(args.after_bulk);
    let after_cpu = crate::measure::cpu_ns(pid);
    for i in args.small..args.small + args.after_bulk {
        let small = sidecar.small(i);
        let took = timed(rt, cp, node_id, std::slice::from_ref(&small.push))
            .with_context(|| format!("small push {i}, after the bulk push"))?;
        after_ms.push(took.as_secs_f64() * 1e3);
    }
    let after_cpu_ms = crate::measure::cpu_ns(pid).saturating_sub(after_cpu) as f64
        / 1e6
        / args.after_bulk.max(1) as f64;
    let serving = (args.small + args.after_bulk)
        .checked_sub(1)
        .map_or(Color::Blue, |last| sidecar.small(last).serving);
    let pod = Path::new("/run/netns").join(lab.ns(Ns::Pod));
    let target: SocketAddr = format!("{}:80", lab::UP_FROM_POD).parse()?;
    let mut new_ack_ms = Vec::with_capacity(args.new_services);
    let mut new_serve_ms = Vec::with_capacity(args.new_services);
    let mut new_window_ms = Vec::with_capacity(args.new_services);
    for n in 0..args.new_services {
        let new = sidecar.new_service(n, serving);
        let (acked, served, window) = new_service(rt, cp, node_id, &new, &pod, target)
            .with_context(|| format!("new service {}", new.host))?;
        new_ack_ms.push(acked.as_secs_f64() * 1e3);
        new_serve_ms.push(served.as_secs_f64() * 1e3);
        new_window_ms.push(window.as_secs_f64() * 1e3);
    }
    lab.check_running()?;
    Ok(Measured {
        small_ms,
        bulk_ms: took.as_secs_f64() * 1e3,
        rss_before_bulk_kib: rss_before,
        rss_after_bulk_kib: rss_after,
        bulk_cpu_ms: cpu_ms,
        after_cpu_ms,
        after_ms,
        new_ack_ms,
        new_serve_ms,
        new_window_ms,
    })
}

/// Adds `new` (its CDS, EDS and RDS pushes back to back) while a thread in the pod polls
/// its host: (push-to-ACK, change-to-serving, the poll window), all from just before the
/// first push.
fn new_service(
    rt: &Runtime,
    cp: &ControlPlane,
    node_id: &str,
    new: &NewService,
    pod: &Path,
    target: SocketAddr,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (ready, in_pod) = mpsc::channel();
        let poller = scope.spawn(|| poll_served(pod, target, &new.host, &stop, ready));
        let polling = in_pod.recv();
        let acked = polling
            .map_err(anyhow::Error::from)
            .and_then(|()| timed_from(rt, cp, node_id, &new.pushes));
        if acked.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let served = poller
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the poller panicked")));
        let (start, acked) = acked?;
        let served = served?;
        let took = served
            .at
            .checked_duration_since(start)
            .context("served before the push")?;
        Ok((acked, took, served.window))
    })
}

/// When a new host was first served.
struct Served {
    /// The end of the first poll that got the page.
    at: std::time::Instant,
    /// From the start of the poll before it (which did not) to `at`: the change took
    /// effect inside this window, the measurement's resolution.
    window: Duration,
}

/// Polls `host` through the pod's iptables redirect until it answers 200 with the page, from
/// this thread moved into the pod's network namespace (`pod`, a `/run/netns` path), so that
/// a poll costs a connection and a request, no process. Each poll is a new connection: one
/// that is open keeps the config it was accepted with. Signals `ready` once in the
/// namespace; gives up when `stop` is set or after [`SERVE_DEADLINE`].
fn poll_served(
    pod: &Path,
    target: SocketAddr,
    host: &str,
    stop: &AtomicBool,
    ready: mpsc::Sender<()>,
) -> anyhow::Result<Served> {
    use std::os::fd::AsFd as _;
    let ns = std::fs::File::open(pod).with_context(|| format!("{}", pod.display()))?;
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .context("entering the pod's network namespace")?;
    ready.send(())?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let deadline = std::time::Instant::now() + SERVE_DEADLINE;
    let mut previous = std::time::Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let began = std::time::Instant::now();
        if gets_page(target, request.as_bytes()) {
            let at = std::time::Instant::now();
            return Ok(Served {
                at,
                window: at - previous,
            });
        }
        if stop.load(Ordering::Relaxed) {
            bail!("stopped polling {host}");
        }
        if began > deadline {
            bail!("{host} not served within {SERVE_DEADLINE:?} ({attempts} polls)");
        }
        previous = began;
        std::thread::sleep(POLL_GAP);
    }
}

/// One request on a new connection: whether it got 200 and the page.
fn gets_page(target: SocketAddr, request: &[u8]) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&target, POLL_TIMEOUT) else {
        return false;
    };
    if stream.set_read_timeout(Some(POLL_TIMEOUT)).is_err()
        || stream.set_nodelay(true).is_err()
        || stream.write_all(request).is_err()
    {
        return false;
    }
    let mut reply = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // A reply is whole when its body has the length its head gives; the page is small.
    while reply.len() < 64 * 1024 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
        }
        if let Some((_, body, length)) = split_reply(&reply)
            && body.len() >= length
        {
            break;
        }
    }
    split_reply(&reply).is_some_and(|(head, body, _)| {
        head.starts_with("HTTP/1.1 200 ") && body == lab::PAGE.as_bytes()
    })
}

/// A reply's head, its body so far and the body's length from `content-length` (0 without).
fn split_reply(reply: &[u8]) -> Option<(&str, &[u8], usize)> {
    let end = reply.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&reply[..end]).ok()?;
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    Some((head, &reply[end + 4..], length))
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// Sends `pushes` back to back and waits until every one is ACKed; returns the time from
/// just before the first to the last ACK.
fn timed(
    rt: &Runtime,
    cp: &ControlPlane,
    node_id: &str,
    pushes: &[Push],
) -> anyhow::Result<Duration> {
    timed_from(rt, cp, node_id, pushes).map(|(_, took)| took)
}

/// [`timed`], also giving when it started.
fn timed_from(
    rt: &Runtime,
    cp: &ControlPlane,
    node_id: &str,
    pushes: &[Push],
) -> anyhow::Result<(std::time::Instant, Duration)> {
    rt.block_on(async {
        let start = Instant::now();
        for push in pushes {
            push.send(cp)?;
        }
        let mut last = start;
        for push in pushes {
            let acked = tokio::time::timeout(
                ACK_DEADLINE,
                cp.wait_acked(node_id, push.type_url, &push.names, start),
            )
            .await
            .with_context(|| format!("no ACK of {} within {ACK_DEADLINE:?}", push.type_url))??;
            last = last.max(acked);
        }
        Ok((start.into_std(), last - start))
    })
}

/// Istio's injected environment for a pod named `name` in the bench pod.
fn pod_env(name: &str) -> [(&'static str, String); 4] {
    [
        ("POD_NAME", name.to_owned()),
        ("POD_NAMESPACE", "default".to_owned()),
        ("INSTANCE_IP", "10.251.2.2".to_owned()),
        ("SERVICE_ACCOUNT", "default".to_owned()),
    ]
}

fn start_portcullis(
    lab: &mut Lab,
    bin: &Path,
    name: &str,
    cp: std::net::SocketAddr,
) -> anyhow::Result<u32> {
    let mut cmd = lab.pinned_as_proxy(Ns::Pod, bin);
    cmd.args(["run", "--xds-address", &format!("http://{cp}")])
        .args(["--concurrency", "1", "--log", "off"])
        .envs(pod_env(name));
    let pid = lab.spawn(name, &mut cmd)?;
    wait_ready(lab, name)?;
    Ok(pid)
}

fn start_envoy(
    lab: &mut Lab,
    bin: &Path,
    name: &str,
    cp: std::net::SocketAddr,
) -> anyhow::Result<u32> {
    let bootstrap = lab.dir.join(format!("{name}.json"));
    lab.write(&bootstrap, &envoy_bootstrap(name, cp).to_string())?;
    let mut cmd = lab.pinned_as_proxy(Ns::Pod, bin);
    cmd.arg("-c").arg(&bootstrap).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "error",
    ]);
    let pid = lab.spawn(name, &mut cmd)?;
    wait_ready(lab, name)?;
    Ok(pid)
}

fn wait_ready(lab: &mut Lab, name: &str) -> anyhow::Result<()> {
    lab.wait_for(&format!("{name} /ready"), Duration::from_secs(60), |l| {
        l.curl(Ns::Pod, &["http://127.0.0.1:15000/ready"])
            .is_ok_and(|(s, b)| s == 200 && b.trim() == "LIVE")
    })
}

/// Envoy's bootstrap as istio-agent shapes it for ADS, trimmed to what plain Envoy loads:
/// the node, admin on the pod's loopback, Delta ADS to `cp`, LDS and CDS over ADS.
fn envoy_bootstrap(name: &str, cp: std::net::SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "node": {
            "id": format!("sidecar~10.251.2.2~{name}.default~default.svc.cluster.local"),
            "cluster": format!("{name}.default"),
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": cp.ip().to_string(), "port_value": cp.port()},
            }}}]}]},
        }]},
    })
}

fn report(
    args: &PushArgs,
    repetitions: usize,
    samples: &[(usize, Sample)],
    elapsed: std::time::Duration,
) -> String {
    let mut out = format!(
        "\n### Config pushes under load (`portcullis-bench push`)\n\n\
         Each proxy fresh as a sidecar in the bench pod (uid 1337, iptables redirect, one \
         worker, vCPU 0), config over Delta ADS from a control plane in the harness (vCPU 1), \
         wrk -t1 -c{WRK_CONNECTIONS} keep-alive through it the whole time; then {} pushes \
         alternating one cluster's endpoints (EDS) and the route of the loaded host (RDS), each \
         waited for until ACKed, then one push of {} EDS clusters with their endpoints. \
         Push→ACK is from just before the push to the ACK of the last response that carried \
         it. Then {} more small pushes with the bulk clusters held. {} repetition(s), \
         medians; took {:.0} s.\n\n\
         | proxy | small push→ACK median ms | small max ms | {} clusters push→ACK ms | CPU over it ms | RSS ready MiB | RSS before bulk MiB | RSS after bulk MiB | small push→ACK after bulk, median ms | max ms | proxy CPU per push after bulk ms | requests | failed |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        args.small,
        args.bulk,
        args.after_bulk,
        repetitions,
        elapsed.as_secs_f64(),
        args.bulk,
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let proxies: Vec<&str> = {
        let mut p: Vec<&str> = samples.iter().map(|(_, s)| s.proxy).collect();
        p.dedup();
        p.truncate(2);
        p
    };
    let of = |proxy: &str, f: &dyn Fn(&Sample) -> f64| {
        median(
            &samples
                .iter()
                .filter(|(_, s)| s.proxy == proxy)
                .map(|(_, s)| f(s))
                .collect::<Vec<_>>(),
        )
    };
    let small_median = |s: &Sample| median(&s.small_ms);
    let small_max = |s: &Sample| s.small_ms.iter().copied().fold(0.0, f64::max);
    let after_median = |s: &Sample| median(&s.after_ms);
    let after_max = |s: &Sample| s.after_ms.iter().copied().fold(0.0, f64::max);
    for proxy in &proxies {
        let requests: u64 = samples
            .iter()
            .filter(|(_, s)| s.proxy == *proxy)
            .map(|(_, s)| s.wrk.requests)
            .sum();
        let failed: u64 = samples
            .iter()
            .filter(|(_, s)| s.proxy == *proxy)
            .map(|(_, s)| s.wrk.failures())
            .sum();
        let _ = writeln!(
            out,
            "| {proxy} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {requests} | {failed} |",
            of(proxy, &small_median),
            of(proxy, &small_max),
            of(proxy, &|s| s.bulk_ms),
            of(proxy, &|s| s.bulk_cpu_ms),
            of(proxy, &|s| mib(s.rss_ready_kib)),
            of(proxy, &|s| mib(s.rss_before_bulk_kib)),
            of(proxy, &|s| mib(s.rss_after_bulk_kib)),
            of(proxy, &after_median),
            of(proxy, &after_max),
            of(proxy, &|s| s.after_cpu_ms),
        );
    }
    let reps: Vec<usize> = {
        let mut r: Vec<usize> = samples.iter().map(|(r, _)| *r).collect();
        r.dedup();
        r
    };
    let ratio = |f: &dyn Fn(&Sample) -> f64| {
        let per_rep: Vec<f64> = reps
            .iter()
            .filter_map(|rep| {
                let get = |proxy: &str| {
                    samples
                        .iter()
                        .find(|(r, s)| r == rep && s.proxy == proxy)
                        .map(|(_, s)| f(s))
                };
                Some(get("portcullis")? / get("Envoy")?)
            })
            .collect();
        median(&per_rep)
    };
    if proxies.len() == 2 {
        let _ = write!(
            out,
            "\n| portcullis ÷ Envoy (median of per-repetition ratios; < 1: portcullis is faster or smaller) | |\n|---|---:|\n\
             | small push→ACK, median | {:.2} |\n\
             | small push→ACK, max | {:.2} |\n\
             | {} clusters push→ACK | {:.2} |\n\
             | CPU over the bulk push | {:.2} |\n\
             | RSS after the bulk push | {:.2} |\n\
             | small push→ACK after the bulk push, median | {:.2} |\n\
             | proxy CPU per small push after the bulk push | {:.2} |\n",
            ratio(&small_median),
            ratio(&small_max),
            args.bulk,
            ratio(&|s| s.bulk_ms),
            ratio(&|s| s.bulk_cpu_ms),
            ratio(&|s| s.rss_after_bulk_kib as f64),
            ratio(&after_median),
            ratio(&|s| s.after_cpu_ms),
        );
    }
    let _ = write!(
        out,
        "\n#### A new service with {} clusters held (issue 13)\n\n\
         Then {} new services one at a time, each as istiod adds a ServiceEntry: its EDS \
         cluster (CDS), its endpoints (EDS, the loaded upstream) and route `80` with its \
         virtual host (RDS), sent back to back. Change→serving is from just before the first \
         of the three pushes until a request from the pod to the new host first gets 200 and \
         the upstream's page (a new connection per poll, polls {} ms apart, from a thread in \
         the pod's network namespace); the poll window, from the start of the poll before that \
         one to its end, bounds the error. Per proxy the median over repetitions of each \
         repetition's median (or max).\n\n\
         | proxy | RSS after the {} clusters push MiB | new service push→ACK median ms | change→serving median ms | change→serving max ms | poll window median ms |\n\
         |---|---:|---:|---:|---:|---:|\n",
        args.bulk,
        args.new_services,
        POLL_GAP.as_millis(),
        args.bulk,
    );
    let new_ack = |s: &Sample| median(&s.new_ack_ms);
    let serve_median = |s: &Sample| median(&s.new_serve_ms);
    let serve_max = |s: &Sample| max(&s.new_serve_ms);
    for proxy in &proxies {
        let _ = writeln!(
            out,
            "| {proxy} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            of(proxy, &|s| mib(s.rss_after_bulk_kib)),
            of(proxy, &new_ack),
            of(proxy, &serve_median),
            of(proxy, &serve_max),
            of(proxy, &|s| median(&s.new_window_ms)),
        );
    }
    if proxies.len() == 2 {
        let _ = writeln!(
            out,
            "| portcullis ÷ Envoy (median of per-repetition ratios) | {:.2} | {:.2} | {:.2} | {:.2} | |",
            ratio(&|s| s.rss_after_bulk_kib as f64),
            ratio(&new_ack),
            ratio(&serve_median),
            ratio(&serve_max),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_splits_into_head_body_and_length() {
        let page = format!(
            "HTTP/1.1 200 OK\r\nServer: envoy\r\nContent-Length: {}\r\n\r\n{}",
            lab::PAGE.len(),
            lab::PAGE
        );
        let (head, body, length) = split_reply(page.as_bytes()).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "));
        assert_eq!(body, lab::PAGE.as_bytes());
        assert_eq!(length, lab::PAGE.len());

        let blocked = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n";
        let (head, body, length) = split_reply(blocked).unwrap();
        assert!(head.starts_with("HTTP/1.1 502 "));
        assert!(body.is_empty());
        assert_eq!(length, 0);

        assert!(split_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n").is_none());
    }
}
