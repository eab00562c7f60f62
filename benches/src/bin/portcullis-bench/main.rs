//! `portcullis-bench`: the end-to-end comparison of issue 4.
//!
//! `portcullis-bench run` builds four network namespaces, starts one nginx upstream and
//! every proxy (HAProxy, nginx, Envoy, portcullis as the explicit proxy and as the
//! transparent sidecar, HAProxy as a transparent sidecar too), pins them all and wrk to
//! vCPU 0, and measures each target back to back in every repetition, as BENCHMARKING.md
//! prescribes. It then measures opaque TCP
//! throughput, portcullis's memory (idle, under load, with 10,000 idle connections) and a
//! load run across 100 registry reloads, and prints one markdown report.
//!
//! `scripts/bench.sh` installs the peers, builds, runs the criterion benchmarks and this.

mod lab;
mod measure;
mod push;
mod report;
mod tools;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::lab::{Lab, Ns, signal};
use crate::measure::{cpu_ns, finish_wrk, median, rss_anon_kib, rss_kib};
use crate::report::Sample;

#[derive(Parser)]
#[command(about = "portcullis benchmarks against real peers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole end-to-end comparison (root; creates network namespaces).
    Run(RunArgs),
    /// Config pushes under load, portcullis beside Envoy (root; creates network namespaces).
    Push(push::PushArgs),
    /// Prints criterion's results as tables by registry size.
    CriterionTable {
        /// criterion's output folder (`target/criterion`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// A fixed busy loop; prints milliseconds (the parallelism check).
    Spin {
        /// Iterations.
        #[arg(default_value_t = 300_000_000)]
        iterations: u64,
    },
    /// Bulk TCP source for the throughput test.
    Source {
        /// Listen address.
        listen: SocketAddr,
    },
    /// Reads `bytes` from a `source`; prints `bytes=N secs=S`.
    Fetch {
        /// The source's address.
        addr: SocketAddr,
        /// How many bytes to ask for.
        bytes: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Opens connections, one request each, and holds them idle.
    Hold {
        /// Where to connect.
        addr: SocketAddr,
        /// How many connections.
        count: usize,
        /// Host header of the one request per connection.
        host: String,
        /// Release them after this many seconds even if standard input stays open.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Validate the harness: one repetition, 2 s per run, fewer reloads, a smaller transfer.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every case (default 5; 1 with --quick).
    #[arg(long)]
    repetitions: Option<usize>,
    /// Seconds per wrk run (default 10; 2 with --quick).
    #[arg(long)]
    duration: Option<u64>,
    /// The portcullis binary (a release build).
    #[arg(long)]
    portcullis: PathBuf,
    /// Envoy's binary; Envoy is left out when not given.
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// Unrelated ServiceEntries in portcullis's registry, the size of a real mesh's.
    #[arg(long, default_value_t = 1_000)]
    fillers: usize,
    /// Registry reloads during the reload run (default 100; 20 with --quick).
    #[arg(long)]
    reloads: Option<usize>,
    /// Idle client connections for the memory test.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// MiB per opaque TCP transfer (default 1024; 128 with --quick).
    #[arg(long)]
    tcp_mib: Option<u64>,
    /// criterion's output folder, to include the micro-benchmarks in the report.
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    /// Also write the report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Replace the README's bench section with the report.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Keep the run folder (configs and logs) even on success.
    #[arg(long)]
    keep: bool,
    /// Only these HTTP cases (e.g. `keepalive-c50`); all when not given.
    #[arg(long = "case")]
    cases: Vec<String>,
    /// Only the HTTP comparison: no TCP throughput, memory or reload runs.
    #[arg(long)]
    http_only: bool,
    /// portcullis writes its access log to `<DIR>/<name>.log` (DIR writable by uid 1337);
    /// off when not given, as every peer's log is.
    #[arg(long)]
    access_log_dir: Option<PathBuf>,
    /// The access log's format with `--access-log-dir`: `text` or `json`.
    #[arg(long, default_value = "text")]
    access_log_format: String,
}

/// What a run measures, resolved from the flags.
struct Plan {
    reps: usize,
    secs: u64,
    reloads: usize,
    tcp_bytes: u64,
}

/// The HTTP load cases: (name, title, connections, connection-per-request, TLS to the
/// upstream).
const CASES: [(&str, &str, u32, bool, bool); 4] = [
    (
        "keepalive-c1",
        "HTTP/1.1 keep-alive, 1 connection",
        1,
        false,
        false,
    ),
    (
        "keepalive-c50",
        "HTTP/1.1 keep-alive, 50 connections",
        50,
        false,
        false,
    ),
    (
        "close-c50",
        "New connection per request (`Connection: close`), 50 connections",
        50,
        true,
        false,
    ),
    (
        "tls-origination-c50",
        "TLS origination: plain HTTP/1.1 keep-alive in, TLS (verified, pooled) to the upstream, 50 connections; `direct` is wrk over TLS",
        50,
        false,
        true,
    ),
];

/// One thing wrk is pointed at.
struct Target {
    name: &'static str,
    ns: Ns,
    url: String,
    headers: Vec<String>,
    script: Option<PathBuf>,
    pid: Option<u32>,
}

impl Target {
    /// A transparent sidecar: the client in `ns` asks for the upstream's own address, which
    /// the pod's iptables redirect sends through the proxy `pid`.
    fn sidecar(name: &'static str, ns: Ns, upstream: &str, pid: u32) -> Target {
        Target {
            name,
            ns,
            url: format!("http://{upstream}/"),
            headers: vec![format!("Host: {}", lab::SIDECAR_HOST)],
            script: None,
            pid: Some(pid),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::Push(args) => std::env::current_exe()
            .map_err(anyhow::Error::from)
            .and_then(|exe| push::run(&args, &exe)),
        Cmd::CriterionTable { dir } => report::criterion_table(&dir).map(|t| print!("{t}")),
        Cmd::Spin { iterations } => {
            tools::spin(iterations);
            Ok(())
        }
        Cmd::Source { listen } => tools::source(listen),
        Cmd::Fetch {
            addr,
            bytes,
            timeout,
        } => tools::fetch(addr, bytes, Duration::from_secs(timeout)),
        Cmd::Hold {
            addr,
            count,
            host,
            seconds,
        } => tools::hold(addr, count, &host, Duration::from_secs(seconds)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let plan = Plan {
        reps: args.repetitions.unwrap_or(if args.quick { 1 } else { 5 }),
        secs: args.duration.unwrap_or(if args.quick { 2 } else { 10 }),
        reloads: args.reloads.unwrap_or(if args.quick { 20 } else { 100 }),
        tcp_bytes: args.tcp_mib.unwrap_or(if args.quick { 128 } else { 1024 }) << 20,
    };
    let exe = std::env::current_exe()?;
    let limit = open_files_limit()?;
    // The holder and the sidecar each need a descriptor per idle connection; the limit is
    // inherited, since raising it may not be permitted here.
    if limit < args.idle_connections as u64 + 1_000 {
        bail!(
            "open files limit {limit} is too low for {} idle connections: raise `ulimit -n`",
            args.idle_connections
        );
    }
    let mut out = String::from(
        "## Benchmarks\n\n\
         One run of `scripts/bench.sh`: wrk against a direct connection, HAProxy, nginx, \
         Envoy and portcullis (explicit proxy and transparent sidecar), and HAProxy as a \
         transparent sidecar behind the same iptables redirect, with one nginx upstream, every process pinned to one vCPU (on 2-vCPU machines the steadiest \
         layout: throughput is 1 / the CPU per request of client + proxy + upstream, what a \
         sidecar costs its pod); then opaque TCP, memory, reloads under load, and the \
         criterion micro-benchmarks.\n\n",
    );
    let _ = writeln!(out, "{}", machine(args, &plan));
    let _ = writeln!(out, "Parallelism at start: {}", parallelism(&exe)?);
    eprintln!("{out}");

    let mut lab = Lab::new()?;
    let started = Instant::now();
    let body = measure_all(&mut lab, args, &plan, &exe)?;
    out.push_str(&body);
    let _ = writeln!(out, "\nParallelism at end: {}", parallelism(&exe)?);
    let _ = writeln!(
        out,
        "\nLoad phase took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    lab.keep_dir = args.keep;
    drop(lab);

    if let Some(dir) = &args.criterion_dir {
        match report::criterion_table(dir) {
            Ok(table) => {
                let _ = writeln!(
                    out,
                    "\n### Micro-benchmarks (criterion medians, `cargo bench -p portcullis-benches`)\n{table}"
                );
            }
            Err(e) => eprintln!("no criterion table: {e:#}"),
        }
    }
    println!("{out}");
    if let Some(path) = &args.report {
        std::fs::write(path, &out)?;
    }
    if let Some(readme) = &args.readme {
        report::update_readme(readme, &out)?;
    }
    Ok(())
}

/// The soft limit on open files this process (and so every child) has.
fn open_files_limit() -> anyhow::Result<u64> {
    std::fs::read_to_string("/proc/self/limits")?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("no open files limit in /proc/self/limits")
}

/// Where and how this ran, and the command that reproduces it.
fn machine(args: &RunArgs, plan: &Plan) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Counted from cpuinfo: the harness runs under `taskset -c 1`, which would make
    // available_parallelism say 1.
    let cpus = std::fs::read_to_string("/proc/cpuinfo").map_or(0, |c| {
        c.lines().filter(|l| l.starts_with("processor")).count()
    });
    let first_line = |program: &str, flag: &str| {
        Command::new(program)
            .arg(flag)
            .output()
            .ok()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_else(|| "missing".to_owned())
    };
    // Envoy prints `<path>  version: <sha>/<version>/Clean/RELEASE/BoringSSL`.
    let envoy = args.envoy.as_ref().map_or("not run".to_owned(), |e| {
        let line = first_line(&e.display().to_string(), "--version");
        line.split("version: ")
            .nth(1)
            .and_then(|v| v.split('/').nth(1))
            .unwrap_or(&line)
            .to_owned()
    });
    // HAProxy prints `HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/`.
    let haproxy = first_line("haproxy", "-v")
        .split(" - ")
        .next()
        .unwrap_or_default()
        .to_owned();
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "Measured {date} on {cpus} vCPUs ({cpu}), Linux {}, portcullis {rev}; \
         {} repetition(s) × {} s per run{}.\n\n\
         Peers: {}; {}; {}; Envoy {envoy}; client {}.\n\n\
         Reproduce: `scripts/bench.sh{}` (as root).",
        kernel.trim(),
        plan.reps,
        plan.secs,
        if args.quick {
            ", --quick (harness check, not a result)"
        } else {
            ""
        },
        first_line("nginx", "-v"),
        haproxy,
        "nginx upstream with a 100-byte static page",
        first_line("wrk", "-v")
            .split(" [")
            .next()
            .unwrap_or_default(),
        if args.quick { " --quick" } else { "" },
    )
}

/// One busy loop alone on vCPU 0, then one on each vCPU at once (BENCHMARKING.md: the two
/// vCPUs are not always two real cores).
fn parallelism(exe: &Path) -> anyhow::Result<String> {
    let spin = |cpu: &str| {
        Command::new("taskset")
            .args(["-c", cpu])
            .arg(exe)
            .args(["spin"])
            .stdout(Stdio::piped())
            .spawn()
    };
    let ms = |child: std::process::Child| -> anyhow::Result<f64> {
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    let alone = ms(spin("0")?)?;
    let (a, b) = (spin("0")?, spin("1")?);
    let (a, b) = (ms(a)?, ms(b)?);
    Ok(format!(
        "one busy loop alone {alone:.0} ms; two at once {a:.0} ms and {b:.0} ms: slowdown ×{:.2} \
         (×1.00 means two real cores); load average {}",
        a.max(b) / alone,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// Starts everything, runs every measurement, returns the report's body.
fn measure_all(lab: &mut Lab, args: &RunArgs, plan: &Plan, exe: &Path) -> anyhow::Result<String> {
    let tls = lab.mkdir("tls")?;
    lab::make_test_ca(&tls)?;
    let ca = tls.join("ca.pem");
    let upstream = start_upstream(lab, exe, &tls)?;
    let mut targets = vec![Target {
        name: "direct",
        ns: Ns::Peers,
        url: format!("http://{}/", lab::UP_FROM_PEERS),
        headers: Vec::new(),
        script: None,
        pid: None,
    }];
    let (peers, mut tls_targets) = start_peers(lab, args, &ca)?;
    targets.extend(peers);
    let (explicit, sidecar, sidecar_config) = start_portcullis(lab, args, &ca)?;
    let explicit_script = lab.dir.join("absolute-form.lua");
    lab.write(
        &explicit_script,
        &format!("wrk.path = \"http://{}/\"\n", lab::EXPLICIT_HOST),
    )?;
    targets.push(Target {
        name: "portcullis explicit",
        ns: Ns::Peers,
        url: format!("http://127.0.0.1:{}/", lab::EXPLICIT_PORT),
        headers: vec![format!("Host: {}", lab::EXPLICIT_HOST)],
        script: Some(explicit_script),
        pid: Some(explicit),
    });
    targets.push(Target::sidecar(
        "portcullis sidecar",
        Ns::Pod,
        lab::UP_FROM_POD,
        sidecar,
    ));
    let tls_script = lab.dir.join("absolute-form-tls.lua");
    lab.write(
        &tls_script,
        &format!("wrk.path = \"http://{}/\"\n", lab::TLS_HOST),
    )?;
    tls_targets.push(Target {
        name: "portcullis explicit",
        ns: Ns::Peers,
        url: format!("http://127.0.0.1:{}/", lab::EXPLICIT_PORT),
        headers: vec![format!("Host: {}", lab::TLS_HOST)],
        script: Some(tls_script),
        pid: Some(explicit),
    });
    for t in targets.iter().chain(&tls_targets) {
        let mut curl_args: Vec<String> = t
            .headers
            .iter()
            .flat_map(|h| ["-H".to_owned(), h.clone()])
            .collect();
        if let Some(host) = t.headers.iter().find_map(|h| h.strip_prefix("Host: "))
            && t.script.is_some()
        {
            curl_args.extend(["-x".to_owned(), t.url.clone(), format!("http://{host}/")]);
        } else if t.url.starts_with("https:") {
            // wrk does not verify the upstream's certificate either.
            curl_args.extend(["-k".to_owned(), t.url.clone()]);
        } else {
            curl_args.push(t.url.clone());
        }
        let refs: Vec<&str> = curl_args.iter().map(String::as_str).collect();
        let ns = t.ns;
        lab.wait_for(
            &format!("{} serves the page", t.name),
            Duration::from_secs(20),
            |l| l.serves_page(ns, &refs),
        )?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = (rss_kib(sidecar), rss_anon_kib(sidecar));

    let mut samples = Vec::new();
    for rep in 0..plan.reps {
        let cases = CASES
            .iter()
            .filter(|c| args.cases.is_empty() || args.cases.iter().any(|n| n == c.0));
        for &(case, _, conns, close, tls) in cases {
            let targets = if tls { &tls_targets } else { &targets };
            for t in targets {
                eprintln!("rep {}/{} {case} {}", rep + 1, plan.reps, t.name);
                let s = http_run(lab, t, case, conns, close, plan.secs, upstream, rep)?;
                eprintln!(
                    "  {:.0} req/s p50 {:.0} µs proxy {:.1} µs/req failed {}",
                    s.wrk.rps,
                    s.wrk.p50,
                    s.proxy_cpu_us.unwrap_or(f64::NAN),
                    s.wrk.failures()
                );
                samples.push(s);
                lab.check_running()?;
                // Lets the previous run's connections finish closing before the next.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    let mut out = String::from(
        "\n### HTTP through each proxy (wrk -t1, everything pinned to vCPU 0, medians)\n\n\
         ⚠ p99 from wrk is unreliable on this machine (coordinated-omission correction turns \
         host stalls into milliseconds; BENCHMARKING.md). CPU is each process tree's \
         on-CPU time (schedstat) over the run ÷ requests; proxy/upstream CPU divides by the \
         upstream nginx's, which normalises host speed.\n",
    );
    let titles: Vec<(&'static str, &'static str)> = CASES
        .iter()
        .filter(|c| samples.iter().any(|s| s.case == c.0))
        .map(|c| (c.0, c.1))
        .collect();
    out.push_str(&report::http_tables(&samples, &titles));

    if args.http_only {
        return Ok(out);
    }
    out.push_str(&tcp_throughput(lab, plan, exe, sidecar)?);
    let loaded_rss = median(
        &samples
            .iter()
            .filter(|s| s.target == "portcullis sidecar" && s.case == "keepalive-c50")
            .filter_map(|s| s.rss_kib.map(|k| k as f64))
            .collect::<Vec<_>>(),
    );
    out.push_str(&memory(lab, args, exe, sidecar, idle_rss, loaded_rss)?);
    out.push_str(&reload_run(lab, plan, sidecar, &sidecar_config)?);
    Ok(out)
}

/// The nginx upstream and the bulk TCP source in the up namespace; returns nginx's PID.
fn start_upstream(lab: &mut Lab, exe: &Path, tls: &Path) -> anyhow::Result<u32> {
    let home = lab.mkdir("upstream")?;
    lab.mkdir("upstream/html")?;
    lab.mkdir("upstream/tmp")?;
    lab.write(&home.join("html/index.html"), lab::PAGE)?;
    let conf = home.join("nginx.conf");
    lab.write(&conf, &lab::upstream_nginx_conf(&home, tls))?;
    let h = home.display().to_string();
    let mut cmd = lab.pinned(Ns::Up, "nginx");
    cmd.args(["-p", &h, "-e", &format!("{h}/error.log"), "-c"])
        .arg(&conf);
    let pid = lab.spawn("upstream-nginx", &mut cmd)?;
    let mut cmd = lab.pinned(Ns::Up, &exe.display().to_string());
    cmd.args(["source", &format!("0.0.0.0:{}", lab::BULK_PORT)]);
    lab.spawn("bulk-source", &mut cmd)?;
    let url = format!("http://{}/", lab::UP_FROM_PEERS);
    lab.wait_for("upstream nginx", Duration::from_secs(10), |l| {
        l.serves_page(Ns::Peers, &[&url])
    })?;
    Ok(pid)
}

/// HAProxy, nginx and Envoy as reverse proxies in the peers namespace; returns the
/// targets of the plain HTTP cases and those of TLS origination (verifying against `ca`).
fn start_peers(
    lab: &mut Lab,
    args: &RunArgs,
    ca: &Path,
) -> anyhow::Result<(Vec<Target>, Vec<Target>)> {
    let mut targets = Vec::new();
    let mut tls_targets = vec![Target {
        name: "direct",
        ns: Ns::Peers,
        url: format!("https://{}/", lab::UP_FROM_PEERS),
        headers: Vec::new(),
        script: None,
        pid: None,
    }];
    let target = |name, port: u16, pid| Target {
        name,
        ns: Ns::Peers,
        url: format!("http://127.0.0.1:{port}/"),
        headers: Vec::new(),
        script: None,
        pid: Some(pid),
    };

    let conf = lab.dir.join("haproxy.cfg");
    lab.write(&conf, &lab::haproxy_conf(ca))?;
    let mut cmd = lab.pinned(Ns::Peers, "haproxy");
    cmd.args(["-db", "-f"]).arg(&conf);
    let pid = lab.spawn("haproxy", &mut cmd)?;
    targets.push(target("HAProxy", lab::HAPROXY_PORT, pid));
    tls_targets.push(target("HAProxy", lab::HAPROXY_TLS_PORT, pid));

    let home = lab.mkdir("nginx-proxy")?;
    lab.mkdir("nginx-proxy/tmp")?;
    let conf = home.join("nginx.conf");
    lab.write(&conf, &lab::proxy_nginx_conf(&home))?;
    let h = home.display().to_string();
    let mut cmd = lab.pinned(Ns::Peers, "nginx");
    cmd.args(["-p", &h, "-e", &format!("{h}/error.log"), "-c"])
        .arg(&conf);
    let pid = lab.spawn("nginx-proxy", &mut cmd)?;
    targets.push(target("nginx", lab::NGINX_PORT, pid));

    // The sidecar's peer: the same iptables redirect (installed by portcullis, which only
    // writes the rules here), HAProxy as uid 1337 on the redirected port.
    let conf = lab.dir.join("haproxy-sidecar.cfg");
    lab.write(&conf, &lab::haproxy_sidecar_conf())?;
    lab.run_in(
        Ns::HaproxyPod,
        &args.portcullis.display().to_string(),
        &["iptables", "--apply"],
    )?;
    let mut cmd = lab.pinned(Ns::HaproxyPod, "setpriv");
    cmd.args([
        "--reuid",
        lab::PROXY_UID,
        "--regid",
        lab::PROXY_UID,
        "--clear-groups",
        "haproxy",
        "-db",
        "-f",
    ])
    .arg(&conf);
    let pid = lab.spawn("haproxy-sidecar", &mut cmd)?;
    targets.push(Target::sidecar(
        "HAProxy sidecar",
        Ns::HaproxyPod,
        lab::UP_FROM_HAPROXY_POD,
        pid,
    ));

    if let Some(envoy) = &args.envoy {
        let conf = lab.dir.join("envoy.yaml");
        lab.write(&conf, &lab::envoy_conf(ca))?;
        let mut cmd = lab.pinned(Ns::Peers, &envoy.display().to_string());
        cmd.args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "error",
            "-c",
        ])
        .arg(&conf);
        let pid = lab.spawn("envoy", &mut cmd)?;
        targets.push(target("Envoy", lab::ENVOY_PORT, pid));
        tls_targets.push(target("Envoy", lab::ENVOY_TLS_PORT, pid));
    }
    Ok((targets, tls_targets))
}

/// portcullis as the explicit proxy (peers) and as the sidecar (pod, uid 1337, iptables);
/// returns their PIDs and the sidecar's config folder.
fn start_portcullis(
    lab: &mut Lab,
    args: &RunArgs,
    ca: &Path,
) -> anyhow::Result<(u32, u32, PathBuf)> {
    // A private copy that uid 1337 can surely read and execute.
    let bin = lab.dir.join("portcullis");
    std::fs::copy(&args.portcullis, &bin)
        .with_context(|| format!("copying {}", args.portcullis.display()))?;
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let bin = bin.display().to_string();
    let registry = lab::portcullis_conf(args.fillers, ca);
    let mut pids = Vec::new();
    let mut dirs = Vec::new();
    for (name, ns) in [
        ("portcullis-explicit", Ns::Peers),
        ("portcullis-sidecar", Ns::Pod),
    ] {
        let config = lab.mkdir(&format!("{name}-config"))?;
        lab.write(&config.join("registry.yaml"), &registry)?;
        lab.write(&config.join("reload.yaml"), &lab::reload_conf(0))?;
        if ns == Ns::Pod {
            lab.run_in(Ns::Pod, &bin, &["iptables", "--apply"])?;
        }
        let mut cmd = if ns == Ns::Pod {
            lab.pinned(ns, "setpriv")
        } else {
            lab.pinned(ns, &bin)
        };
        if ns == Ns::Pod {
            cmd.args([
                "--reuid",
                lab::PROXY_UID,
                "--regid",
                lab::PROXY_UID,
                "--clear-groups",
                &bin,
            ]);
        }
        cmd.args(["run", "--config"])
            .arg(&config)
            .args(["--concurrency", "1", "--log", "off"]);
        match &args.access_log_dir {
            Some(dir) => cmd
                .arg("--access-log")
                .arg(dir.join(format!("{name}.log")))
                .args(["--access-log-format", &args.access_log_format]),
            None => cmd.args(["--access-log", "off"]),
        };
        if ns == Ns::Peers {
            cmd.args(["--http-proxy", &format!("127.0.0.1:{}", lab::EXPLICIT_PORT)]);
        }
        pids.push(lab.spawn(name, &mut cmd)?);
        dirs.push(config);
        lab.wait_for(&format!("{name} /ready"), Duration::from_secs(30), |l| {
            l.curl(ns, &["http://127.0.0.1:15000/ready"])
                .is_ok_and(|(s, b)| s == 200 && b.trim() == "LIVE")
        })?;
    }
    let sidecar_config = dirs.pop().context("sidecar config")?;
    Ok((pids[0], pids[1], sidecar_config))
}

/// One wrk run against one target, with the proxy's and upstream's CPU and RSS.
#[allow(clippy::too_many_arguments)]
fn http_run(
    lab: &Lab,
    t: &Target,
    case: &'static str,
    conns: u32,
    close: bool,
    secs: u64,
    upstream: u32,
    rep: usize,
) -> anyhow::Result<Sample> {
    let mut cmd = wrk_command(lab, t, conns, close, secs);
    let proxy0 = t.pid.map(cpu_ns);
    let up0 = cpu_ns(upstream);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(secs * 500));
    let rss = t.pid.map(rss_kib);
    let wrk = finish_wrk(child, Duration::from_secs(secs + 30))?;
    let per_request = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 / 1_000.0 / wrk.requests as f64
    };
    Ok(Sample {
        case,
        target: t.name,
        rep,
        proxy_cpu_us: t
            .pid
            .zip(proxy0)
            .map(|(pid, before)| per_request(before, cpu_ns(pid))),
        upstream_cpu_us: per_request(up0, cpu_ns(upstream)),
        rss_kib: rss,
        wrk,
    })
}

fn wrk_command(lab: &Lab, t: &Target, conns: u32, close: bool, secs: u64) -> Command {
    let mut cmd = lab.pinned(t.ns, "wrk");
    cmd.args(["-t1", "-c", &conns.to_string(), "-d", &format!("{secs}s")])
        .args(["--timeout", "5s", "--latency"]);
    for h in &t.headers {
        cmd.args(["-H", h]);
    }
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    if let Some(script) = &t.script {
        cmd.arg("-s").arg(script);
    }
    cmd.arg(&t.url);
    cmd
}

/// Opaque TCP: one large transfer direct and through the sidecar, interleaved.
fn tcp_throughput(lab: &mut Lab, plan: &Plan, exe: &Path, sidecar: u32) -> anyhow::Result<String> {
    let exe = exe.display().to_string();
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    let mut cpu_per_gib = Vec::new();
    for rep in 0..plan.reps {
        for (ns, addr, into) in [
            (Ns::Peers, lab::UP_FROM_PEERS, &mut direct),
            (Ns::Pod, lab::UP_FROM_POD, &mut proxied),
        ] {
            eprintln!("rep {}/{} tcp {ns:?}", rep + 1, plan.reps);
            let cpu0 = cpu_ns(sidecar);
            let out = lab::run(lab.pinned(ns, &exe).args([
                "fetch",
                &format!("{addr}:{}", lab::BULK_PORT),
                &plan.tcp_bytes.to_string(),
                "--timeout",
                "25",
            ]))?;
            let secs: f64 = out
                .split_whitespace()
                .find_map(|f| f.strip_prefix("secs="))
                .context("fetch printed no secs=")?
                .parse()?;
            into.push(plan.tcp_bytes as f64 / f64::from(1u32 << 20) / secs);
            if ns == Ns::Pod {
                let gib = plan.tcp_bytes as f64 / f64::from(1u32 << 30);
                cpu_per_gib.push(cpu_ns(sidecar).saturating_sub(cpu0) as f64 / 1e6 / gib);
            }
        }
        lab.check_running()?;
    }
    let ratios: Vec<f64> = proxied.iter().zip(&direct).map(|(p, d)| p / d).collect();
    Ok(format!(
        "\n### Opaque TCP passthrough ({} MiB per transfer, client, proxy and source on vCPU 0)\n\n\
         | path | MiB/s | proxy CPU ms per GiB |\n|---|---:|---:|\n\
         | direct | {:.0} | – |\n| portcullis sidecar | {:.0} | {:.0} |\n\n\
         portcullis ÷ direct: {:.2}\n",
        plan.tcp_bytes >> 20,
        median(&direct),
        median(&proxied),
        median(&cpu_per_gib),
        median(&ratios),
    ))
}

/// The sidecar's memory idle, under load, and holding many idle client connections.
fn memory(
    lab: &mut Lab,
    args: &RunArgs,
    exe: &Path,
    sidecar: u32,
    idle_rss: (u64, u64),
    loaded_rss: f64,
) -> anyhow::Result<String> {
    eprintln!("memory: {} idle connections", args.idle_connections);
    let before = (rss_kib(sidecar), rss_anon_kib(sidecar));
    let mut holder = lab
        .command(Ns::Pod, &exe.display().to_string())
        .args([
            "hold",
            &format!("{}:80", lab::UP_FROM_POD),
            &args.idle_connections.to_string(),
            lab::SIDECAR_HOST,
            "--seconds",
            "120",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = holder.stdout.take().context("holder stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let held = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(line) if line.starts_with("held ") => line,
        other => {
            let _ = holder.kill();
            let out = holder.wait_with_output()?;
            bail!(
                "the holder did not open its connections ({other:?}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    // Lets the proxy settle into its idle state (detection timers, pool returns).
    std::thread::sleep(Duration::from_secs(2));
    let with_conns = (rss_kib(sidecar), rss_anon_kib(sidecar));
    let fds = std::fs::read_dir(format!("/proc/{sidecar}/fd")).map_or(0, Iterator::count);
    // Closing its standard input tells the holder to report and let go.
    drop(holder.stdin.take());
    let alive = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| "alive ?".to_owned());
    let status = holder.wait()?;
    if !status.success() {
        bail!("holder failed: {status}");
    }
    lab.check_running()?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per_conn = with_conns.0.saturating_sub(before.0) as f64 / args.idle_connections as f64;
    Ok(format!(
        "\n### portcullis sidecar memory\n\n\
         | state | RSS MiB | of which anonymous MiB |\n|---|---:|---:|\n\
         | idle, after start | {:.1} | {:.1} |\n\
         | under load (keep-alive, 50 connections) | {:.1} | |\n\
         | idle, after the load runs | {:.1} | {:.1} |\n\
         | {} idle keep-alive client connections ({held}, {alive} at the end; {fds} fds) | {:.1} | {:.1} |\n\n\
         Per idle client connection: {per_conn:.1} KiB (target < 16 KiB). Idle target < 10 MiB; \
         the rest of RSS is the mapped binary and libraries.\n",
        mib(idle_rss.0),
        mib(idle_rss.1),
        loaded_rss / 1024.0,
        mib(before.0),
        mib(before.1),
        args.idle_connections,
        mib(with_conns.0),
        mib(with_conns.1),
    ))
}

/// The sidecar's `server.registry_version` from its admin `/stats`.
fn registry_version(lab: &Lab) -> anyhow::Result<u64> {
    let (status, body) = lab.curl(Ns::Pod, &["http://127.0.0.1:15000/stats"])?;
    if status != 200 {
        bail!("/stats answered {status}");
    }
    body.lines()
        .find_map(|l| l.strip_prefix("server.registry_version:"))
        .context("no server.registry_version in /stats")?
        .trim()
        .parse()
        .context("registry version")
}

/// Load through the sidecar (keep-alive and connection-per-request at once) while the
/// registry is reloaded `plan.reloads` times; every request must succeed.
fn reload_run(lab: &mut Lab, plan: &Plan, sidecar: u32, config: &Path) -> anyhow::Result<String> {
    eprintln!("reloads: {} under load", plan.reloads);
    let target = Target {
        name: "portcullis sidecar",
        ns: Ns::Pod,
        url: format!("http://{}/", lab::UP_FROM_POD),
        headers: vec![format!("Host: {}", lab::SIDECAR_HOST)],
        script: None,
        pid: Some(sidecar),
    };
    // wrk is stopped with SIGINT once the reloads are done; its -d is only the bound.
    let bound = 300;
    let v0 = registry_version(lab)?;
    let spawn = |close: bool, conns: u32| {
        wrk_command(lab, &target, conns, close, bound)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let keepalive = spawn(false, 20)?;
    let fresh = spawn(true, 10)?;
    let pids = [keepalive.id(), fresh.id()];
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let mut applied = 0;
    let mut failure = None;
    for round in 1..=plan.reloads {
        if let Err(e) = lab.write(&config.join("reload.yaml"), &lab::reload_conf(round)) {
            failure = Some(e);
            break;
        }
        // SIGHUP applies the file at once instead of after the watcher's debounce.
        signal(sidecar, "HUP");
        let deadline = Instant::now() + Duration::from_secs(5);
        let want = v0 + round as u64;
        while registry_version(lab).unwrap_or(0) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if registry_version(lab).unwrap_or(0) >= want {
            applied += 1;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let elapsed = started.elapsed().as_secs_f64();
    for pid in pids {
        signal(pid, "INT");
    }
    let keepalive = finish_wrk(keepalive, Duration::from_secs(30))?;
    let fresh = finish_wrk(fresh, Duration::from_secs(30))?;
    if let Some(e) = failure {
        return Err(e);
    }
    lab.check_running()?;
    let failed = keepalive.failures() + fresh.failures();
    let verdict = if failed == 0 && applied == plan.reloads {
        "PASS"
    } else {
        "FAIL"
    };
    Ok(format!(
        "\n### Reload under load: {verdict}\n\n\
         {applied} of {} registry reloads applied (each a changed file plus SIGHUP, confirmed \
         by `server.registry_version`) in {elapsed:.1} s, while wrk ran keep-alive (20 \
         connections) and connection-per-request (10 connections) through the sidecar: \
         {} + {} requests, {} + {} failed (socket errors and non-2xx).\n",
        plan.reloads,
        keepalive.requests,
        fresh.requests,
        keepalive.failures(),
        fresh.failures(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
