//! `portcullis-bench`: the end-to-end comparison of issues 4 and 13.
//!
//! `portcullis-bench run` builds five network namespaces, starts one nginx upstream (HTTP,
//! h2c with a static gRPC reply, TLS) and every proxy (HAProxy, nginx, Envoy, portcullis
//! as the explicit proxy and as the transparent sidecar, HAProxy as a transparent sidecar
//! too, for HTTP and for TLS by SNI; HAProxy, Envoy and portcullis again with their access
//! logs on), pins them all and the load generators (wrk, h2load, oha) to vCPU 0, and
//! measures each target back to back in every repetition, as BENCHMARKING.md prescribes.
//! It then measures opaque TCP throughput (direct, and as sidecars the null relay, HAProxy
//! with and without splice, and portcullis), portcullis's memory (idle, under load, with
//! 10,000 idle connections) and a load run across 100 registry reloads, and prints one
//! markdown report.
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
use crate::measure::{
    Wrk, cpu_ns, finish, median, parse_h2load, parse_oha, parse_wrk, rss_anon_kib, rss_kib,
};
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
        /// Listen addresses.
        #[arg(required = true)]
        listen: Vec<SocketAddr>,
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
    /// Relays every connection to `upstream` byte for byte (the floor of the HTTP cases).
    Relay {
        /// Listen address.
        listen: SocketAddr,
        /// Where each connection is relayed to.
        upstream: SocketAddr,
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
    /// Only these cases (repeatable): keepalive-c1, keepalive-c50, close-c50,
    /// tls-origination-c50, access-log-c50, h2c, grpc-unary, tls-passthrough-c50,
    /// open-loop; all when not given.
    #[arg(long = "case")]
    cases: Vec<String>,
    /// ServiceEntries the sidecar's registry grows to in the last run (its RSS, and the
    /// time from a file change to serving a new host).
    #[arg(long, default_value_t = 10_000)]
    scale_entries: usize,
    /// oha's binary, the open-loop case's load generator.
    #[arg(long)]
    oha: Option<PathBuf>,
    /// Only the HTTP comparison: no TCP throughput, memory or reload runs.
    #[arg(long, conflicts_with = "tcp_only")]
    http_only: bool,
    /// Only the opaque TCP throughput (direct, the null relay, HAProxy with and without
    /// splice, and portcullis, each as a sidecar): no HTTP cases, memory or reload runs.
    #[arg(long, conflicts_with = "cases")]
    tcp_only: bool,
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

/// How a case loads its targets.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// wrk -t1 with this many connections, a new one per request when `close`.
    Wrk { conns: u32, close: bool },
    /// h2load, 10 connections × 100 concurrent streams; a unary gRPC call when `grpc`.
    H2load { grpc: bool },
    /// oha at half of HAProxy's peak rate (keep-alive, 50 connections), latency measured
    /// from each request's scheduled start (coordinated omission corrected).
    OpenLoop,
}

/// Which targets a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Set {
    /// Plain HTTP/1.1: direct, every proxy, both sidecars.
    Http,
    /// Plain HTTP in, TLS to the upstream.
    TlsOrigination,
    /// Each proxy with its access log off and on.
    AccessLog,
    /// TLS by SNI through the sidecars, as the pod's client dials it.
    Passthrough,
    /// h2c on both sides.
    H2c,
    /// gRPC unary over h2c.
    Grpc,
    /// Those whose latency is compared at one fixed rate: HAProxy and portcullis, as
    /// proxies and as sidecars.
    OpenLoop,
}

/// One measured case.
struct Case {
    name: &'static str,
    title: &'static str,
    load: Load,
    set: Set,
}

/// Every case, in the order one repetition runs them (`keepalive-c50` before
/// `open-loop`, whose rate it gives).
const CASES: [Case; 9] = [
    Case {
        name: "keepalive-c1",
        title: "HTTP/1.1 keep-alive, 1 connection",
        load: Load::Wrk {
            conns: 1,
            close: false,
        },
        set: Set::Http,
    },
    Case {
        name: "keepalive-c50",
        title: "HTTP/1.1 keep-alive, 50 connections",
        load: Load::Wrk {
            conns: 50,
            close: false,
        },
        set: Set::Http,
    },
    Case {
        name: "close-c50",
        title: "New connection per request (`Connection: close`), 50 connections",
        load: Load::Wrk {
            conns: 50,
            close: true,
        },
        set: Set::Http,
    },
    Case {
        name: "tls-origination-c50",
        title: "TLS origination: plain HTTP/1.1 keep-alive in, TLS (verified, pooled) to the upstream, 50 connections; `direct` is wrk over TLS",
        load: Load::Wrk {
            conns: 50,
            close: false,
        },
        set: Set::TlsOrigination,
    },
    Case {
        name: "access-log-c50",
        title: "Access log off and on (`+log`), HTTP/1.1 keep-alive, 50 connections: portcullis `--access-log FILE` (Istio's text format), Envoy's file access log with Istio's default format, HAProxy `option httplog` to standard output (a file)",
        load: Load::Wrk {
            conns: 50,
            close: false,
        },
        set: Set::AccessLog,
    },
    Case {
        name: "h2c",
        title: "h2c (prior knowledge) on both sides, h2load 10 connections × 100 streams, GET of the 100-byte page; HAProxy `proto h2` on bind and server; the sidecars behind the iptables redirect",
        load: Load::H2load { grpc: false },
        set: Set::H2c,
    },
    Case {
        name: "grpc-unary",
        title: "gRPC unary over h2c, h2load 10 connections × 100 streams: POST of a 10-byte gRPC frame with `content-type: application/grpc`; nginx answers from a file with a 10-byte frame and `grpc-status: 0` trailers",
        load: Load::H2load { grpc: true },
        set: Set::Grpc,
    },
    Case {
        name: "tls-passthrough-c50",
        title: "TLS passthrough by SNI, a new TLS connection per request (wrk over https with `Connection: close`, 50 connections, full handshakes), to nginx's TLS port; HAProxy is a sidecar with `tcp-request inspect-delay` and `req.ssl_sni`",
        load: Load::Wrk {
            conns: 50,
            close: true,
        },
        set: Set::Passthrough,
    },
    Case {
        name: "open-loop",
        title: "Open-loop latency at half of HAProxy's peak rate (oha `-q RATE --latency-correction`, 50 connections, keep-alive); p99 is reliable here",
        load: Load::OpenLoop,
        set: Set::OpenLoop,
    },
];

/// One thing a load generator is pointed at.
#[derive(Clone)]
struct Target {
    name: &'static str,
    ns: Ns,
    url: String,
    headers: Vec<String>,
    script: Option<PathBuf>,
    pid: Option<u32>,
    /// The access log it writes, to check that it does.
    log: Option<PathBuf>,
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
            log: None,
        }
    }

    /// A target reached at `url` with no extra header.
    fn plain(name: &'static str, ns: Ns, url: String, pid: Option<u32>) -> Target {
        Target {
            name,
            ns,
            url,
            headers: Vec::new(),
            script: None,
            pid,
            log: None,
        }
    }

    /// For the explicit proxy (absolute-form requests): the proxy's URL and the URL asked
    /// of it.
    fn via_proxy(&self) -> Option<(String, String)> {
        let host = self.headers.iter().find_map(|h| h.strip_prefix("Host: "))?;
        self.script
            .as_ref()
            .map(|_| (self.url.clone(), format!("http://{host}/")))
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
        Cmd::Source { listen } => tools::source(&listen),
        Cmd::Fetch {
            addr,
            bytes,
            timeout,
        } => tools::fetch(addr, bytes, Duration::from_secs(timeout)),
        Cmd::Relay { listen, upstream } => tools::relay(listen, upstream),
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
         One run of `scripts/bench.sh`: wrk, h2load and oha against a direct connection, \
         HAProxy, nginx, Envoy and portcullis (explicit proxy and transparent sidecar), and \
         HAProxy as a transparent sidecar behind the same iptables redirect (routing TLS by \
         SNI in the passthrough case), with one nginx upstream, every process pinned to one \
         vCPU (on 2-vCPU machines the steadiest layout: throughput is 1 / the CPU per request \
         of client + proxy + upstream, what a sidecar costs its pod); HTTP/1.1, access logs \
         off and on, h2c, gRPC unary, TLS passthrough, open-loop latency; then opaque TCP, \
         memory, reloads under load, and the criterion micro-benchmarks.\n\n",
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
    let oha = args.oha.as_ref().map_or("oha not run".to_owned(), |o| {
        first_line(&o.display().to_string(), "--version")
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
         Peers: {}; {}; {}; Envoy {envoy}; clients {}, {}, {oha}.\n\n\
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
        first_line("h2load", "--version"),
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

/// Every target, with the set of cases it is measured in.
type Targets = Vec<(Set, Target)>;

/// The cases `--case` selects (all when none is given); fails on an unknown name.
fn selected_cases(args: &RunArgs) -> anyhow::Result<Vec<&'static Case>> {
    if let Some(unknown) = args
        .cases
        .iter()
        .find(|n| !CASES.iter().any(|c| c.name == n.as_str()))
    {
        let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        bail!("no case {unknown}; the cases are {}", names.join(", "));
    }
    Ok(CASES
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|n| n == c.name))
        .collect())
}

/// Starts everything, runs every measurement, returns the report's body.
fn measure_all(lab: &mut Lab, args: &RunArgs, plan: &Plan, exe: &Path) -> anyhow::Result<String> {
    let cases = selected_cases(args)?;
    let tls = lab.mkdir("tls")?;
    lab::make_test_ca(&tls)?;
    let ca = tls.join("ca.pem");
    let upstream = start_upstream(lab, exe, &tls)?;
    let direct = |url: String| Target::plain("direct", Ns::Peers, url, None);
    let plain = format!("http://{}/", lab::UP_FROM_PEERS);
    let mut targets: Targets = vec![
        (Set::Http, direct(plain.clone())),
        (Set::OpenLoop, direct(plain)),
        (
            Set::TlsOrigination,
            direct(format!("https://{}/", lab::UP_FROM_PEERS)),
        ),
        (
            Set::Passthrough,
            direct(format!("https://{}/", lab::PASSTHROUGH_HOST)),
        ),
        (Set::H2c, direct(h2c_url(lab::H2C_HOST, lab::H2C_PORT))),
        (Set::Grpc, direct(grpc_url(lab::GRPC_HOST, lab::H2C_PORT))),
    ];
    let haproxy_sidecar = start_peers(lab, args, &ca, &mut targets)?;
    targets.extend(start_null_relays(lab, args, exe)?.map(|t| (Set::Http, t)));
    let (sidecar, sidecar_config) = start_portcullis(lab, args, &ca, &mut targets)?;
    for (set, t) in &targets {
        wait_ready(lab, *set, t)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = (rss_kib(sidecar), rss_anon_kib(sidecar));

    if args.tcp_only {
        let paths = start_bulk_paths(lab, exe, haproxy_sidecar, sidecar)?;
        return tcp_throughput(lab, plan, exe, &paths);
    }
    let mut samples = Vec::new();
    let mut rate = None;
    for rep in 0..plan.reps {
        for case in &cases {
            if matches!(case.load, Load::OpenLoop) && rate.is_none() {
                rate = Some(open_loop_rate(lab, &targets, &samples, plan, upstream)?);
            }
            let tools = Tools {
                oha: args.oha.as_deref(),
                rate,
                grpc_body: lab.dir.join("grpc-request.bin"),
            };
            for (_, t) in targets.iter().filter(|(set, _)| *set == case.set) {
                eprintln!("rep {}/{} {} {}", rep + 1, plan.reps, case.name, t.name);
                let s = load_run(lab, t, case, plan.secs, upstream, rep, &tools)?;
                eprintln!(
                    "  {:.0} req/s p50 {:.0} µs p99 {:.0} µs proxy {:.1} µs/req failed {}",
                    s.wrk.rps,
                    s.wrk.p50,
                    s.wrk.p99,
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
        "\n### Load through each proxy (everything pinned to vCPU 0, medians)\n\n\
         ⚠ p99 from wrk is unreliable on this machine (coordinated-omission correction turns \
         host stalls into milliseconds; BENCHMARKING.md); the open-loop case measures tails \
         instead. h2load reports no percentiles. CPU is each process tree's \
         on-CPU time (schedstat) over the run ÷ requests; proxy/upstream CPU divides by the \
         upstream nginx's, which normalises host speed.\n",
    );
    if let Some(rate) = rate {
        let _ = writeln!(
            out,
            "\nOpen-loop rate: {rate:.0} req/s, half of HAProxy's keep-alive peak with 50 connections."
        );
    }
    let titles: Vec<report::CaseTitle> = CASES
        .iter()
        .filter(|c| samples.iter().any(|s| s.case == c.name))
        .map(|c| report::CaseTitle {
            name: c.name,
            title: c.title,
            tails: matches!(c.load, Load::OpenLoop),
            log_cost: c.set == Set::AccessLog,
        })
        .collect();
    out.push_str(&report::http_tables(&samples, &titles));

    if args.http_only {
        return Ok(out);
    }
    let paths = start_bulk_paths(lab, exe, haproxy_sidecar, sidecar)?;
    out.push_str(&tcp_throughput(lab, plan, exe, &paths)?);
    let loaded_rss = median(
        &samples
            .iter()
            .filter(|s| s.target == "portcullis sidecar" && s.case == "keepalive-c50")
            .filter_map(|s| s.rss_kib.map(|k| k as f64))
            .collect::<Vec<_>>(),
    );
    out.push_str(&memory(lab, args, exe, sidecar, idle_rss, loaded_rss)?);
    out.push_str(&reload_run(lab, plan, sidecar, &sidecar_config)?);
    out.push_str(&scale_run(lab, args, &ca, sidecar, &sidecar_config)?);
    Ok(out)
}

/// The h2c page at `host:port`.
fn h2c_url(host: &str, port: u16) -> String {
    format!("http://{host}:{port}/")
}

/// The unary gRPC method at `host:port`.
fn grpc_url(host: &str, port: u16) -> String {
    format!("http://{host}:{port}{}", lab::GRPC_PATH)
}

/// Waits until `t` answers as its cases expect: the page, or the gRPC reply.
fn wait_ready(lab: &mut Lab, set: Set, t: &Target) -> anyhow::Result<()> {
    let mut curl_args: Vec<String> = t
        .headers
        .iter()
        .flat_map(|h| ["-H".to_owned(), h.clone()])
        .collect();
    match set {
        Set::H2c => curl_args.push("--http2-prior-knowledge".to_owned()),
        Set::Grpc => curl_args.extend(
            [
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/grpc",
                "--data-binary",
            ]
            .map(str::to_owned),
        ),
        _ => {}
    }
    if set == Set::Grpc {
        curl_args.push(format!("@{}", lab.dir.join("grpc-request.bin").display()));
    }
    if let Some((proxy, url)) = t.via_proxy() {
        curl_args.extend(["-x".to_owned(), proxy, url]);
    } else if t.url.starts_with("https:") {
        // wrk does not verify the upstream's certificate either.
        curl_args.extend(["-k".to_owned(), t.url.clone()]);
    } else {
        curl_args.push(t.url.clone());
    }
    let refs: Vec<&str> = curl_args.iter().map(String::as_str).collect();
    let (ns, want) = (
        t.ns,
        if set == Set::Grpc {
            lab::GRPC_FRAME
        } else {
            lab::PAGE
        },
    );
    lab.wait_for(
        &format!("{} serves {set:?}", t.name),
        Duration::from_secs(20),
        |l| {
            l.curl(ns, &refs)
                .is_ok_and(|(status, body)| status == 200 && body == want)
        },
    )
}

/// The open-loop rate: half of HAProxy's keep-alive peak with 50 connections, from this
/// run's `keepalive-c50` samples, or measured now when that case was not selected.
fn open_loop_rate(
    lab: &Lab,
    targets: &Targets,
    samples: &[Sample],
    plan: &Plan,
    upstream: u32,
) -> anyhow::Result<f64> {
    let peak = median(
        &samples
            .iter()
            .filter(|s| s.case == "keepalive-c50" && s.target == "HAProxy")
            .map(|s| s.wrk.rps)
            .collect::<Vec<_>>(),
    );
    if peak.is_finite() {
        return Ok(peak / 2.0);
    }
    let haproxy = targets
        .iter()
        .find(|(set, t)| *set == Set::Http && t.name == "HAProxy")
        .map(|(_, t)| t)
        .context("no HAProxy target")?;
    let case = CASES
        .iter()
        .find(|c| c.name == "keepalive-c50")
        .context("no keepalive-c50 case")?;
    eprintln!("open-loop: HAProxy's peak rate");
    let tools = Tools {
        oha: None,
        rate: None,
        grpc_body: PathBuf::new(),
    };
    let s = load_run(lab, haproxy, case, plan.secs, upstream, 0, &tools)?;
    Ok(s.wrk.rps / 2.0)
}

/// The nginx upstream and the bulk TCP source (on every bulk port) in the up namespace;
/// returns nginx's PID.
fn start_upstream(lab: &mut Lab, exe: &Path, tls: &Path) -> anyhow::Result<u32> {
    let home = lab.mkdir("upstream")?;
    lab.mkdir("upstream/html")?;
    lab.mkdir("upstream/tmp")?;
    lab.write(&home.join("html/index.html"), lab::PAGE)?;
    // The gRPC reply is a file at the method's path; the request body is the same frame.
    let method = lab::GRPC_PATH.trim_start_matches('/');
    let (service, _) = method.split_once('/').context("gRPC path")?;
    lab.mkdir(&format!("upstream/html/{service}"))?;
    lab.write(&home.join("html").join(method), lab::GRPC_FRAME)?;
    lab.write(&lab.dir.join("grpc-request.bin"), lab::GRPC_FRAME)?;
    let conf = home.join("nginx.conf");
    lab.write(&conf, &lab::upstream_nginx_conf(&home, tls))?;
    let h = home.display().to_string();
    let mut cmd = lab.pinned(Ns::Up, "nginx");
    cmd.args(["-p", &h, "-e", &format!("{h}/error.log"), "-c"])
        .arg(&conf);
    let pid = lab.spawn("upstream-nginx", &mut cmd)?;
    let mut cmd = lab.pinned(Ns::Up, &exe.display().to_string());
    cmd.arg("source").args(
        [lab::BULK_PORT, lab::BULK_COPY_PORT, lab::BULK_PIPE_PORT]
            .map(|port| format!("0.0.0.0:{port}")),
    );
    lab.spawn("bulk-source", &mut cmd)?;
    let url = format!("http://{}/", lab::UP_FROM_PEERS);
    lab.wait_for("upstream nginx", Duration::from_secs(10), |l| {
        l.serves_page(Ns::Peers, &[&url])
    })?;
    Ok(pid)
}

/// The null relay in the peers namespace and as the sidecar of its own pod (behind the
/// same iptables redirect as the sidecars), relaying to the upstream's HTTP port: the floor
/// of every proxy's CPU per request, since it makes only the system calls relaying needs.
fn start_null_relays(lab: &mut Lab, args: &RunArgs, exe: &Path) -> anyhow::Result<[Target; 2]> {
    let exe = exe.display().to_string();
    let listen = format!("127.0.0.1:{}", lab::RELAY_PORT);
    let mut cmd = lab.pinned(Ns::Peers, &exe);
    cmd.args(["relay", &listen, &format!("{}:80", lab::UP_FROM_PEERS)]);
    let pid = lab.spawn("null-relay", &mut cmd)?;
    let explicit = Target::plain(
        "null relay",
        Ns::Peers,
        format!("http://{listen}/"),
        Some(pid),
    );
    lab.run_in(
        Ns::RelayPod,
        &args.portcullis.display().to_string(),
        &["iptables", "--apply"],
    )?;
    let mut cmd = lab.pinned_as_proxy(Ns::RelayPod, &exe);
    cmd.args([
        "relay",
        "0.0.0.0:15001",
        &format!("{}:80", lab::UP_FROM_RELAY_POD),
    ]);
    let pid = lab.spawn("null-relay-sidecar", &mut cmd)?;
    let sidecar = Target::sidecar(
        "null relay sidecar",
        Ns::RelayPod,
        lab::UP_FROM_RELAY_POD,
        pid,
    );
    Ok([explicit, sidecar])
}

/// HAProxy as the sidecar of `ns`: the pod's iptables redirect (written by portcullis,
/// which only installs the rules here), HAProxy as uid 1337 on the redirected port.
fn start_haproxy_sidecar(
    lab: &mut Lab,
    args: &RunArgs,
    ns: Ns,
    name: &str,
    config: &str,
) -> anyhow::Result<u32> {
    let conf = lab.dir.join(format!("{name}.cfg"));
    lab.write(&conf, config)?;
    lab.run_in(
        ns,
        &args.portcullis.display().to_string(),
        &["iptables", "--apply"],
    )?;
    let mut cmd = lab.pinned_as_proxy(ns, "haproxy");
    cmd.args(["-db", "-f"]).arg(&conf);
    lab.spawn(name, &mut cmd)
}

/// HAProxy, nginx and Envoy as reverse proxies in the peers namespace (HAProxy and Envoy
/// also with their access logs on), and HAProxy as a sidecar in its two pods; their
/// targets go into `targets`. Returns the PID of HAProxy's HTTP (and bulk) sidecar.
fn start_peers(
    lab: &mut Lab,
    args: &RunArgs,
    ca: &Path,
    targets: &mut Targets,
) -> anyhow::Result<u32> {
    let local = |name, port: u16, pid| {
        Target::plain(
            name,
            Ns::Peers,
            format!("http://127.0.0.1:{port}/"),
            Some(pid),
        )
    };
    let local_grpc = |name, port: u16, pid| {
        Target::plain(name, Ns::Peers, grpc_url("127.0.0.1", port), Some(pid))
    };

    let conf = lab.dir.join("haproxy.cfg");
    lab.write(&conf, &lab::haproxy_conf(ca))?;
    let mut cmd = lab.pinned(Ns::Peers, "haproxy");
    cmd.args(["-db", "-f"]).arg(&conf);
    let pid = lab.spawn("haproxy", &mut cmd)?;
    let haproxy = local("HAProxy", lab::HAPROXY_PORT, pid);
    targets.extend([
        (Set::Http, local("HAProxy TCP", lab::HAPROXY_TCP_PORT, pid)),
        (Set::Http, haproxy.clone()),
        (Set::AccessLog, haproxy.clone()),
        (Set::OpenLoop, haproxy),
        (
            Set::TlsOrigination,
            local("HAProxy", lab::HAPROXY_TLS_PORT, pid),
        ),
        (Set::H2c, local("HAProxy", lab::HAPROXY_H2_PORT, pid)),
        (Set::Grpc, local_grpc("HAProxy", lab::HAPROXY_H2_PORT, pid)),
    ]);

    let conf = lab.dir.join("haproxy-log.cfg");
    lab.write(&conf, &lab::haproxy_log_conf())?;
    let mut cmd = lab.pinned(Ns::Peers, "haproxy");
    cmd.args(["-db", "-f"]).arg(&conf);
    let pid = lab.spawn("haproxy-log", &mut cmd)?;
    targets.push((
        Set::AccessLog,
        Target {
            log: Some(lab.dir.join("haproxy-log.log")),
            ..local("HAProxy +log", lab::HAPROXY_LOG_PORT, pid)
        },
    ));

    let home = lab.mkdir("nginx-proxy")?;
    lab.mkdir("nginx-proxy/tmp")?;
    let conf = home.join("nginx.conf");
    lab.write(&conf, &lab::proxy_nginx_conf(&home))?;
    let h = home.display().to_string();
    let mut cmd = lab.pinned(Ns::Peers, "nginx");
    cmd.args(["-p", &h, "-e", &format!("{h}/error.log"), "-c"])
        .arg(&conf);
    let pid = lab.spawn("nginx-proxy", &mut cmd)?;
    targets.push((Set::Http, local("nginx", lab::NGINX_PORT, pid)));

    let pid = start_haproxy_sidecar(
        lab,
        args,
        Ns::HaproxyPod,
        "haproxy-sidecar",
        &lab::haproxy_sidecar_conf(),
    )?;
    let haproxy_sidecar = pid;
    let sidecar = Target::sidecar(
        "HAProxy sidecar",
        Ns::HaproxyPod,
        lab::UP_FROM_HAPROXY_POD,
        pid,
    );
    let pod = |url| Target::plain("HAProxy sidecar", Ns::HaproxyPod, url, Some(pid));
    targets.extend([
        (Set::Http, sidecar.clone()),
        (Set::OpenLoop, sidecar),
        (Set::H2c, pod(h2c_url(lab::H2C_HOST, lab::H2C_PORT))),
        (Set::Grpc, pod(grpc_url(lab::GRPC_HOST, lab::H2C_PORT))),
    ]);
    let pid = start_haproxy_sidecar(
        lab,
        args,
        Ns::TlsPod,
        "haproxy-sni-sidecar",
        &lab::haproxy_sni_conf(),
    )?;
    targets.push((
        Set::Passthrough,
        Target::plain(
            "HAProxy sidecar",
            Ns::TlsPod,
            format!("https://{}/", lab::PASSTHROUGH_HOST),
            Some(pid),
        ),
    ));

    if let Some(envoy) = &args.envoy {
        let envoy = envoy.display().to_string();
        let log = lab.dir.join("envoy-access.log");
        for (name, config) in [
            ("envoy", lab::envoy_conf(ca)),
            ("envoy-log", lab::envoy_log_conf(&log)),
        ] {
            let conf = lab.dir.join(format!("{name}.yaml"));
            lab.write(&conf, &config)?;
            let mut cmd = lab.pinned(Ns::Peers, &envoy);
            cmd.args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "error",
                "-c",
            ])
            .arg(&conf);
            let pid = lab.spawn(name, &mut cmd)?;
            if name == "envoy-log" {
                targets.push((
                    Set::AccessLog,
                    Target {
                        log: Some(log.clone()),
                        ..local("Envoy +log", lab::ENVOY_LOG_PORT, pid)
                    },
                ));
                continue;
            }
            let envoy = local("Envoy", lab::ENVOY_PORT, pid);
            targets.extend([
                (Set::Http, envoy.clone()),
                (Set::AccessLog, envoy),
                (
                    Set::TlsOrigination,
                    local("Envoy", lab::ENVOY_TLS_PORT, pid),
                ),
                (Set::H2c, local("Envoy", lab::ENVOY_H2_PORT, pid)),
                (Set::Grpc, local_grpc("Envoy", lab::ENVOY_H2_PORT, pid)),
            ]);
        }
    }
    Ok(haproxy_sidecar)
}

/// One portcullis process: where it runs, its ports, its access log.
struct Instance {
    name: &'static str,
    ns: Ns,
    /// `--http-proxy` on this loopback port.
    http_proxy: Option<u16>,
    /// Added to every default port (outbound, admin, metrics, health) so that two
    /// instances can share a namespace.
    port_offset: u16,
    /// `--access-log` to this file, in Istio's text format.
    access_log: Option<PathBuf>,
}

/// portcullis as the explicit proxy (peers; a second one with its access log on) and as
/// the sidecar (pod, uid 1337, iptables); their targets go into `targets`. Returns the
/// sidecar's PID and config folder.
fn start_portcullis(
    lab: &mut Lab,
    args: &RunArgs,
    ca: &Path,
    targets: &mut Targets,
) -> anyhow::Result<(u32, PathBuf)> {
    let bin = lab
        .private_copy(&args.portcullis, "portcullis")?
        .display()
        .to_string();
    let registry = lab::portcullis_conf(args.fillers, ca);
    let explicit_log = lab.dir.join("portcullis-access.log");
    let instances = [
        Instance {
            name: "portcullis-explicit",
            ns: Ns::Peers,
            http_proxy: Some(lab::EXPLICIT_PORT),
            port_offset: 0,
            access_log: None,
        },
        Instance {
            name: "portcullis-sidecar",
            ns: Ns::Pod,
            http_proxy: None,
            port_offset: 0,
            access_log: None,
        },
        Instance {
            name: "portcullis-explicit-log",
            ns: Ns::Peers,
            http_proxy: Some(lab::EXPLICIT_LOG_PORT),
            port_offset: 100,
            access_log: Some(explicit_log.clone()),
        },
    ];
    let mut pids = Vec::new();
    let mut sidecar_config = None;
    for i in &instances {
        let config = lab.mkdir(&format!("{}-config", i.name))?;
        lab.write(&config.join("registry.yaml"), &registry)?;
        lab.write(&config.join("reload.yaml"), &lab::reload_conf(0))?;
        let mut cmd = if i.ns == Ns::Pod {
            lab.run_in(Ns::Pod, &bin, &["iptables", "--apply"])?;
            lab.pinned_as_proxy(i.ns, &bin)
        } else {
            lab.pinned(i.ns, &bin)
        };
        let port = |base: u16| base + i.port_offset;
        let admin = format!("127.0.0.1:{}", port(15000));
        cmd.args(["run", "--config"])
            .arg(&config)
            .args(["--concurrency", "1", "--log", "off"])
            .args(["--admin", &admin])
            .args(["--outbound", &format!("0.0.0.0:{}", port(15001))])
            .args(["--metrics", &format!("0.0.0.0:{}", port(15090))])
            .args(["--health", &format!("0.0.0.0:{}", port(15021))]);
        match (&i.access_log, &args.access_log_dir) {
            (Some(file), _) => cmd
                .arg("--access-log")
                .arg(file)
                .args(["--access-log-format", "text"]),
            (None, Some(dir)) => cmd
                .arg("--access-log")
                .arg(dir.join(format!("{}.log", i.name)))
                .args(["--access-log-format", &args.access_log_format]),
            (None, None) => cmd.args(["--access-log", "off"]),
        };
        if let Some(p) = i.http_proxy {
            cmd.args(["--http-proxy", &format!("127.0.0.1:{p}")]);
        }
        pids.push(lab.spawn(i.name, &mut cmd)?);
        if i.ns == Ns::Pod {
            sidecar_config = Some(config);
        }
        let ns = i.ns;
        let ready = format!("http://{admin}/ready");
        lab.wait_for(
            &format!("{} /ready", i.name),
            Duration::from_secs(30),
            |l| {
                l.curl(ns, &[&ready])
                    .is_ok_and(|(s, b)| s == 200 && b.trim() == "LIVE")
            },
        )?;
    }
    let [explicit, sidecar, logged] = pids[..] else {
        bail!("portcullis instances did not all start");
    };
    let explicit_script = lab.dir.join("absolute-form.lua");
    lab.write(
        &explicit_script,
        &format!("wrk.path = \"http://{}/\"\n", lab::EXPLICIT_HOST),
    )?;
    let absolute = |name, port: u16, pid, host: &str, script: &Path| Target {
        name,
        ns: Ns::Peers,
        url: format!("http://127.0.0.1:{port}/"),
        headers: vec![format!("Host: {host}")],
        script: Some(script.to_path_buf()),
        pid: Some(pid),
        log: None,
    };
    let explicit_target = absolute(
        "portcullis explicit",
        lab::EXPLICIT_PORT,
        explicit,
        lab::EXPLICIT_HOST,
        &explicit_script,
    );
    let tls_script = lab.dir.join("absolute-form-tls.lua");
    lab.write(
        &tls_script,
        &format!("wrk.path = \"http://{}/\"\n", lab::TLS_HOST),
    )?;
    let sidecar_target = Target::sidecar("portcullis sidecar", Ns::Pod, lab::UP_FROM_POD, sidecar);
    let pod = |url| Target::plain("portcullis sidecar", Ns::Pod, url, Some(sidecar));
    targets.extend([
        (Set::Http, explicit_target.clone()),
        (Set::AccessLog, explicit_target.clone()),
        (Set::OpenLoop, explicit_target),
        (
            Set::TlsOrigination,
            absolute(
                "portcullis explicit",
                lab::EXPLICIT_PORT,
                explicit,
                lab::TLS_HOST,
                &tls_script,
            ),
        ),
        (
            Set::AccessLog,
            Target {
                log: Some(explicit_log),
                ..absolute(
                    "portcullis explicit +log",
                    lab::EXPLICIT_LOG_PORT,
                    logged,
                    lab::EXPLICIT_HOST,
                    &explicit_script,
                )
            },
        ),
        (Set::Http, sidecar_target.clone()),
        (Set::OpenLoop, sidecar_target),
        (Set::H2c, pod(h2c_url(lab::H2C_HOST, lab::H2C_PORT))),
        (Set::Grpc, pod(grpc_url(lab::GRPC_HOST, lab::H2C_PORT))),
        (
            Set::Passthrough,
            pod(format!("https://{}/", lab::PASSTHROUGH_HOST)),
        ),
    ]);
    Ok((sidecar, sidecar_config.context("no sidecar instance")?))
}

/// What the load generators other than wrk need.
struct Tools<'a> {
    /// oha's binary (open-loop case).
    oha: Option<&'a Path>,
    /// The open-loop rate in requests per second.
    rate: Option<f64>,
    /// The gRPC request body.
    grpc_body: PathBuf,
}

/// One run of the case's load generator against one target, with the proxy's and
/// upstream's CPU and RSS.
fn load_run(
    lab: &Lab,
    t: &Target,
    case: &Case,
    secs: u64,
    upstream: u32,
    rep: usize,
    tools: &Tools,
) -> anyhow::Result<Sample> {
    let (mut cmd, parse): (Command, fn(&str) -> anyhow::Result<Wrk>) = match case.load {
        Load::Wrk { conns, close } => (wrk_command(lab, t, conns, close, secs), parse_wrk),
        Load::H2load { grpc } => (
            h2load_command(lab, t, grpc.then_some(tools.grpc_body.as_path()), secs),
            parse_h2load,
        ),
        Load::OpenLoop => {
            let oha = tools.oha.context("the open-loop case needs --oha")?;
            let rate = tools.rate.context("no open-loop rate")?;
            (oha_command(lab, t, oha, rate, secs), parse_oha)
        }
    };
    let log0 = t.log.as_deref().map(file_len);
    let proxy0 = t.pid.map(cpu_ns);
    let up0 = cpu_ns(upstream);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(secs * 500));
    let rss = t.pid.map(rss_kib);
    let wrk = finish(child, Duration::from_secs(secs + 30), parse)?;
    let per_request = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 / 1_000.0 / wrk.requests as f64
    };
    let proxy_cpu_us = t
        .pid
        .zip(proxy0)
        .map(|(pid, before)| per_request(before, cpu_ns(pid)));
    let upstream_cpu_us = per_request(up0, cpu_ns(upstream));
    let log_bytes_per_req = match (&t.log, log0) {
        (Some(log), Some(before)) => {
            // portcullis writes its batch within a flush interval (50 ms).
            std::thread::sleep(Duration::from_millis(200));
            let grown = file_len(log).saturating_sub(before);
            if grown == 0 {
                bail!("{} wrote no access log to {}", t.name, log.display());
            }
            Some(grown as f64 / wrk.requests as f64)
        }
        _ => None,
    };
    Ok(Sample {
        case: case.name,
        target: t.name,
        rep,
        proxy_cpu_us,
        upstream_cpu_us,
        rss_kib: rss,
        log_bytes_per_req,
        wrk,
    })
}

/// A file's length; 0 when it does not exist yet.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
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

/// h2load with one thread, 10 connections × 100 streams, for `secs`; with `grpc_body`, a
/// unary gRPC call (POST of that body) per request.
fn h2load_command(lab: &Lab, t: &Target, grpc_body: Option<&Path>, secs: u64) -> Command {
    let mut cmd = lab.pinned(t.ns, "h2load");
    cmd.args(["-t1", "-c10", "-m100", "-D", &secs.to_string()]);
    if let Some(body) = grpc_body {
        cmd.arg("-d").arg(body).args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]);
    }
    for h in &t.headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(&t.url);
    cmd
}

/// oha at `rate` requests per second over 50 keep-alive connections for `secs`, latency
/// measured from when each request was due.
fn oha_command(lab: &Lab, t: &Target, oha: &Path, rate: f64, secs: u64) -> Command {
    let mut cmd = lab.pinned(t.ns, &oha.display().to_string());
    cmd.args(["-c", "50", "-z", &format!("{secs}s")])
        .args(["-q", &format!("{rate:.0}"), "--latency-correction"])
        .args(["--no-tui", "--output-format", "json"])
        .arg("--wait-ongoing-requests-after-deadline")
        // One runtime thread: it shares vCPU 0 with everything else.
        .env("TOKIO_WORKER_THREADS", "1");
    let url = match t.via_proxy() {
        Some((proxy, url)) => {
            cmd.args(["-x", &proxy]);
            url
        }
        None => {
            for h in &t.headers {
                cmd.args(["-H", h]);
            }
            t.url.clone()
        }
    };
    cmd.arg(url);
    cmd
}

/// What stands between the bulk client and the source on one path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Nothing: the client dials the source.
    Direct,
    /// Another relay behind the pod's redirect (its PID).
    Peer(u32),
    /// The portcullis sidecar (its PID).
    Portcullis(u32),
}

/// One way to the bulk source in the opaque TCP table.
struct BulkPath {
    name: &'static str,
    /// Where the fetching client runs.
    ns: Ns,
    /// The source as that client dials it.
    addr: String,
    via: Via,
}

impl BulkPath {
    fn proxy(&self) -> Option<u32> {
        match self.via {
            Via::Direct => None,
            Via::Peer(pid) | Via::Portcullis(pid) => Some(pid),
        }
    }
}

/// Every path the opaque TCP table measures, each proxy behind its pod's redirect as
/// portcullis is: HAProxy's pod sends the three bulk ports to its sidecar's `mode tcp`
/// frontends (with and without splice) and to a second HAProxy splicing through pipes as
/// large as portcullis's; the null relay's pod sends the bulk port to a second relay that
/// dials it. Started after the HTTP cases, which therefore measure what they did before.
fn start_bulk_paths(
    lab: &mut Lab,
    exe: &Path,
    haproxy_sidecar: u32,
    sidecar: u32,
) -> anyhow::Result<Vec<BulkPath>> {
    lab.redirect_port(Ns::HaproxyPod, lab::BULK_PORT, lab::SIDECAR_BULK_PORT)?;
    lab.redirect_port(
        Ns::HaproxyPod,
        lab::BULK_COPY_PORT,
        lab::SIDECAR_BULK_COPY_PORT,
    )?;
    lab.redirect_port(
        Ns::HaproxyPod,
        lab::BULK_PIPE_PORT,
        lab::SIDECAR_BULK_PIPE_PORT,
    )?;
    lab.redirect_port(Ns::RelayPod, lab::BULK_PORT, lab::SIDECAR_BULK_PORT)?;
    let conf = lab.dir.join("haproxy-bulk-pipe.cfg");
    lab.write(&conf, &lab::haproxy_bulk_pipe_conf())?;
    let mut cmd = lab.pinned_as_proxy(Ns::HaproxyPod, "haproxy");
    cmd.args(["-db", "-f"]).arg(&conf);
    let haproxy_pipe = lab.spawn("haproxy-bulk-pipe", &mut cmd)?;
    let mut cmd = lab.pinned_as_proxy(Ns::RelayPod, exe);
    cmd.args([
        "relay",
        &format!("0.0.0.0:{}", lab::SIDECAR_BULK_PORT),
        &format!("{}:{}", lab::UP_FROM_RELAY_POD, lab::BULK_PORT),
    ]);
    let relay = lab.spawn("null-relay-bulk", &mut cmd)?;
    let path = |name, ns, up: &str, port: u16, via| BulkPath {
        name,
        ns,
        addr: format!("{up}:{port}"),
        via,
    };
    let paths = vec![
        path(
            "direct",
            Ns::Peers,
            lab::UP_FROM_PEERS,
            lab::BULK_PORT,
            Via::Direct,
        ),
        path(
            "null relay sidecar (read/write, 16 KiB buffer)",
            Ns::RelayPod,
            lab::UP_FROM_RELAY_POD,
            lab::BULK_PORT,
            Via::Peer(relay),
        ),
        path(
            "HAProxy sidecar, no splice",
            Ns::HaproxyPod,
            lab::UP_FROM_HAPROXY_POD,
            lab::BULK_COPY_PORT,
            Via::Peer(haproxy_sidecar),
        ),
        path(
            "HAProxy sidecar, splice (64 KiB pipes, the default)",
            Ns::HaproxyPod,
            lab::UP_FROM_HAPROXY_POD,
            lab::BULK_PORT,
            Via::Peer(haproxy_sidecar),
        ),
        path(
            "HAProxy sidecar, splice, `tune.pipesize 262144` (portcullis's 256 KiB)",
            Ns::HaproxyPod,
            lab::UP_FROM_HAPROXY_POD,
            lab::BULK_PIPE_PORT,
            Via::Peer(haproxy_pipe),
        ),
        path(
            "portcullis sidecar",
            Ns::Pod,
            lab::UP_FROM_POD,
            lab::BULK_PORT,
            Via::Portcullis(sidecar),
        ),
    ];
    let exe = exe.display().to_string();
    for p in &paths {
        lab.wait_for(
            &format!("{} relays bulk TCP", p.name),
            Duration::from_secs(10),
            |l| {
                lab::run(
                    l.command(p.ns, &exe)
                        .args(["fetch", &p.addr, "1", "--timeout", "2"]),
                )
                .is_ok()
            },
        )?;
    }
    Ok(paths)
}

/// Opaque TCP: one large transfer over every path, back to back in each repetition, with
/// each path's proxy CPU and its time per GiB beyond the direct path's.
fn tcp_throughput(
    lab: &mut Lab,
    plan: &Plan,
    exe: &Path,
    paths: &[BulkPath],
) -> anyhow::Result<String> {
    let exe = exe.display().to_string();
    let mib = plan.tcp_bytes as f64 / f64::from(1u32 << 20);
    let gib = mib / 1024.0;
    // Per path, per repetition: MiB/s and proxy CPU ms per GiB.
    let mut speed = vec![Vec::new(); paths.len()];
    let mut cpu = vec![Vec::new(); paths.len()];
    for rep in 0..plan.reps {
        for (i, p) in paths.iter().enumerate() {
            eprintln!("rep {}/{} tcp {}", rep + 1, plan.reps, p.name);
            let cpu0 = p.proxy().map(cpu_ns);
            let out = lab::run(lab.pinned(p.ns, &exe).args([
                "fetch",
                &p.addr,
                &plan.tcp_bytes.to_string(),
                "--timeout",
                "25",
            ]))?;
            let secs: f64 = out
                .split_whitespace()
                .find_map(|f| f.strip_prefix("secs="))
                .context("fetch printed no secs=")?
                .parse()?;
            speed[i].push(mib / secs);
            if let Some((pid, before)) = p.proxy().zip(cpu0) {
                let ms = cpu_ns(pid).saturating_sub(before) as f64 / 1e6 / gib;
                // Relaying a GiB costs any proxy far more than this; less means the
                // redirect sent the connection around it.
                if ms < 1.0 {
                    bail!("{}: its proxy used {ms:.2} ms of CPU per GiB", p.name);
                }
                cpu[i].push(ms);
            }
            eprintln!("  {:.0} MiB/s", mib / secs);
        }
        lab.check_running()?;
    }
    let direct = &speed[0];
    let ms_per_gib = |mib_s: f64| 1024.0 * 1e3 / mib_s;
    let ratio = |i: usize| median_ratio(&speed[i], direct);
    // The path's time per GiB beyond the direct path's in the same repetition.
    let added = |i: usize| {
        median(
            &speed[i]
                .iter()
                .zip(direct)
                .map(|(p, d)| ms_per_gib(*p) - ms_per_gib(*d))
                .collect::<Vec<_>>(),
        )
    };
    let mut out = format!(
        "\n### Opaque TCP passthrough ({} MiB per transfer, client, proxy and source on vCPU 0; \
         medians of {} repetitions)\n\n\
         Each proxy is a sidecar behind its pod's iptables redirect, relaying to the original \
         destination. \"ms per GiB over direct\" is the path's time per GiB minus the direct \
         path's in the same repetition: all the path adds on the one vCPU. It can be less than \
         the proxy's CPU, which includes kernel work done in its system calls for the other \
         ends of its connections (loopback delivery to the client), when the client and \
         source spend less per GiB than on the direct path.\n\n\
         | path | MiB/s | ms per GiB over direct | proxy CPU ms per GiB | ÷ direct |\n\
         |---|---:|---:|---:|---:|\n",
        plan.tcp_bytes >> 20,
        plan.reps,
    );
    for (i, p) in paths.iter().enumerate() {
        let _ = if p.via == Via::Direct {
            writeln!(
                out,
                "| {} | {:.0} | – | – | 1.00 |",
                p.name,
                median(&speed[i])
            )
        } else {
            writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.0} | {:.2} |",
                p.name,
                median(&speed[i]),
                added(i),
                median(&cpu[i]),
                ratio(i)
            )
        };
    }
    let direct_ms = median(&direct.iter().map(|d| ms_per_gib(*d)).collect::<Vec<_>>());
    let _ = writeln!(
        out,
        "\n÷ direct ≥ 0.70 (issue 13) leaves a path {:.0} ms per GiB over the direct path's \
         {direct_ms:.0} ms, for the proxy and the second connection together.",
        direct_ms * (1.0 / 0.70 - 1.0)
    );
    let best = (0..paths.len())
        .filter(|&i| matches!(paths[i].via, Via::Peer(_)))
        .max_by(|&a, &b| ratio(a).total_cmp(&ratio(b)));
    let ours = (0..paths.len()).find(|&i| matches!(paths[i].via, Via::Portcullis(_)));
    if let (Some(best), Some(ours)) = (best, ours) {
        let _ = writeln!(
            out,
            "The best peer, {}, reaches {:.2} of direct; portcullis reaches {:.2}: {:.2}× its \
             MiB/s at {:.2}× its proxy CPU per GiB.",
            paths[best].name,
            ratio(best),
            ratio(ours),
            median_ratio(&speed[ours], &speed[best]),
            median_ratio(&cpu[ours], &cpu[best]),
        );
    }
    Ok(out)
}

/// The median of `a[i] / b[i]` over the repetitions.
fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>())
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
    let target = Target::sidecar("portcullis sidecar", Ns::Pod, lab::UP_FROM_POD, sidecar);
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
    let keepalive = finish(keepalive, Duration::from_secs(30), parse_wrk)?;
    let fresh = finish(fresh, Duration::from_secs(30), parse_wrk)?;
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

/// The sidecar's registry grown to `--scale-entries` ServiceEntries from files: the time
/// to apply it and the RSS after; then a new ServiceEntry written to the config folder
/// (picked up by the folder watcher, no signal) and the time until a request to its host
/// first reaches the upstream.
fn scale_run(
    lab: &mut Lab,
    args: &RunArgs,
    ca: &Path,
    sidecar: u32,
    config: &Path,
) -> anyhow::Result<String> {
    eprintln!("scale: {} ServiceEntries", args.scale_entries);
    let rss_before = rss_kib(sidecar);
    let v0 = registry_version(lab)?;
    let started = Instant::now();
    lab.write(
        &config.join("registry.yaml"),
        &lab::portcullis_conf(args.scale_entries, ca),
    )?;
    let deadline = started + Duration::from_secs(120);
    while registry_version(lab).unwrap_or(0) <= v0 {
        if Instant::now() > deadline {
            bail!(
                "{} ServiceEntries not applied within 120 s",
                args.scale_entries
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let applied = started.elapsed();
    // Lets the old snapshot's last users let go of it.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib(sidecar);

    let host = "scale-new.bench";
    let url = format!("http://{}/", lab::UP_FROM_POD);
    let header = format!("Host: {host}");
    let serves = |l: &Lab| l.serves_page(Ns::Pod, &["-H", &header, &url]);
    if serves(lab) {
        bail!("{host} is served before its ServiceEntry is written");
    }
    let started = Instant::now();
    lab.write(
        &config.join("scale-new.yaml"),
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: scale-new, namespace: default}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {}}}]
",
            lab::UP_FROM_POD
        ),
    )?;
    let deadline = started + Duration::from_secs(60);
    while !serves(lab) {
        if Instant::now() > deadline {
            bail!("{host} not served within 60 s of its ServiceEntry");
        }
    }
    let serving = started.elapsed();
    lab.check_running()?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(format!(
        "\n### {} ServiceEntries from files (portcullis sidecar)\n\n\
         Applied {:.2} s after the registry file was rewritten (from {} to {} filler entries); RSS \
         {:.1} MiB before, {:.1} MiB after. A new ServiceEntry written beside them was served \
         {:.0} ms after the write (the folder watcher, no signal; polled with curl, a few ms \
         per poll). Envoy fed the same config is not measured here.\n",
        args.scale_entries,
        applied.as_secs_f64(),
        args.fillers,
        args.scale_entries,
        mib(rss_before),
        mib(rss_after),
        serving.as_secs_f64() * 1e3,
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
