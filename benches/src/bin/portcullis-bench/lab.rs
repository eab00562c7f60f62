//! The bench lab: three network namespaces, the peers' configs, and every process the
//! harness starts, all torn down on drop.
//!
//! ```text
//!  peers ns (10.251.1.2)  ── veth ──  up ns (10.251.1.1, 10.251.2.1,  ── veth ──  pod ns (10.251.2.2)
//!  wrk, HAProxy, nginx,               10.251.3.1)                                 wrk (root, redirected),
//!  Envoy, portcullis --http-proxy     nginx upstream :80                          portcullis uid 1337 + iptables
//!                                     bulk source :9000,    ── veth ──  haproxy-pod ns (10.251.3.2)
//!                                     :9001, :9002                      wrk (root, redirected),
//!                                     h2c :8080, TLS :443               HAProxy uid 1337 + the same iptables
//!                                                                       (bulk ports to its mode tcp frontends)
//!                                                       ── veth ──  haproxy-tls-pod ns (10.251.4.2)
//!                                                                   HAProxy uid 1337 routing TLS by SNI
//! ```
//!
//! Every path to the upstream crosses exactly one veth, so the targets differ only in the
//! proxy. The pod namespaces hold the iptables redirect; the other proxies live apart from
//! it so that their upstream connections are not captured. HAProxy also runs as a sidecar,
//! forwarding to the original destination, so that the sidecar is compared with a peer
//! that pays for the same interception.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Prefix of every namespace and run folder, so that `scripts/bench.sh` can sweep the
/// leftovers of a killed run.
pub const PREFIX: &str = "pcbench";
/// Where `ip netns exec` finds a namespace's own `/etc` files.
const ETC_NETNS: &str = "/etc/netns";
/// The upstream as the peers namespace reaches it.
pub const UP_FROM_PEERS: &str = "10.251.1.1";
/// The upstream as the pod namespace reaches it.
pub const UP_FROM_POD: &str = "10.251.2.1";
/// The upstream as HAProxy's pod namespace reaches it.
pub const UP_FROM_HAPROXY_POD: &str = "10.251.3.1";
/// The upstream as the pod of HAProxy's SNI-routing sidecar reaches it.
pub const UP_FROM_TLS_POD: &str = "10.251.4.1";
/// The upstream seen from the null relay's pod.
pub const UP_FROM_RELAY_POD: &str = "10.251.5.1";
/// The ServiceEntry host the sidecar routes to the upstream.
pub const SIDECAR_HOST: &str = "upstream.bench";
/// The ServiceEntry host the explicit proxy routes to the upstream.
pub const EXPLICIT_HOST: &str = "upstream-peers.bench";
/// The host whose requests portcullis, HAProxy and Envoy send over TLS (origination).
pub const TLS_HOST: &str = "upstream-tls.bench";
/// Port of the bulk TCP source, registered as opaque TCP.
pub const BULK_PORT: u16 = 9000;
/// The bulk source's second port: HAProxy's pod sends it to HAProxy's frontend without
/// splice, so that both HAProxy variants sit behind the same redirect.
pub const BULK_COPY_PORT: u16 = 9001;
/// Where a peer's pod redirects [`BULK_PORT`]: a `mode tcp` frontend or a relay of its own,
/// apart from the HTTP listener on 15001.
pub const SIDECAR_BULK_PORT: u16 = 15009;
/// Where HAProxy's pod redirects [`BULK_COPY_PORT`]: its `mode tcp` frontend without splice.
pub const SIDECAR_BULK_COPY_PORT: u16 = 15010;
/// The bulk source's third port: HAProxy's pod sends it to a second HAProxy whose pipes are
/// as large as portcullis's (a global setting, so a process of its own).
pub const BULK_PIPE_PORT: u16 = 9002;
/// Where HAProxy's pod redirects [`BULK_PIPE_PORT`].
pub const SIDECAR_BULK_PIPE_PORT: u16 = 15011;
/// The upstream's HTTP/2 cleartext (prior knowledge) port.
pub const H2C_PORT: u16 = 8080;
/// The ServiceEntry host of the h2c port (`HTTP2`), resolved by every client namespace.
pub const H2C_HOST: &str = "h2c.bench";
/// The ServiceEntry host of the same port as gRPC (`GRPC`).
pub const GRPC_HOST: &str = "grpc.bench";
/// The unary method the gRPC case calls; nginx answers it from a file.
pub const GRPC_PATH: &str = "/bench.Bench/Unary";
/// A gRPC message frame (uncompressed, 5 bytes): the request body and the reply.
pub const GRPC_FRAME: &str = "\0\0\0\0\x05bench";
/// The ServiceEntry host (TLS, port 443) the passthrough case reaches by SNI.
pub const PASSTHROUGH_HOST: &str = "passthrough.bench";
/// Loopback ports of the proxies in the peers namespace.
pub const HAPROXY_PORT: u16 = 10001;
/// nginx as a reverse proxy.
pub const NGINX_PORT: u16 = 10002;
/// HAProxy originating TLS to the upstream.
pub const HAPROXY_TLS_PORT: u16 = 10011;
/// Envoy originating TLS to the upstream.
pub const ENVOY_TLS_PORT: u16 = 10013;
/// Envoy.
pub const ENVOY_PORT: u16 = 10003;
/// HAProxy with `proto h2` on the bind and the server.
pub const HAPROXY_H2_PORT: u16 = 10021;
/// Envoy with HTTP/2 upstreams.
pub const ENVOY_H2_PORT: u16 = 10023;
/// HAProxy with `option httplog`.
pub const HAPROXY_LOG_PORT: u16 = 10031;
/// Envoy with Istio's file access log.
pub const ENVOY_LOG_PORT: u16 = 10033;
/// The null relay (`portcullis-bench relay`), the HTTP cases' floor.
pub const RELAY_PORT: u16 = 10041;
/// HAProxy in `mode tcp`: HAProxy's own relay, with no HTTP.
pub const HAPROXY_TCP_PORT: u16 = 10042;
/// portcullis `--http-proxy` with `--access-log FILE`.
pub const EXPLICIT_LOG_PORT: u16 = 10034;
/// portcullis `--http-proxy`.
pub const EXPLICIT_PORT: u16 = 10004;
/// uid (and gid) of the sidecar, excluded from the redirect.
pub const PROXY_UID: &str = "1337";
/// The body every request fetches: 100 bytes.
pub const PAGE: &str = "portcullis bench page: one hundred bytes of static body served by nginx on the upstream host......\n";

/// A namespace of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns {
    /// The upstream host.
    Up,
    /// Clients and proxies without interception.
    Peers,
    /// The sidecar's pod: iptables redirect, portcullis as uid 1337, a wrk as root.
    Pod,
    /// The same pod with HAProxy as the sidecar.
    HaproxyPod,
    /// A pod whose sidecar is HAProxy routing TLS by SNI (`mode tcp`).
    TlsPod,
    /// A pod whose sidecar is the null relay: the floor behind the same redirect.
    RelayPod,
}

impl Ns {
    /// Every namespace of the lab.
    pub const ALL: [Ns; 6] = [
        Ns::Up,
        Ns::Peers,
        Ns::Pod,
        Ns::HaproxyPod,
        Ns::TlsPod,
        Ns::RelayPod,
    ];

    fn short(self) -> &'static str {
        match self {
            Ns::Up => "up",
            Ns::Peers => "peers",
            Ns::Pod => "pod",
            Ns::HaproxyPod => "hapod",
            Ns::TlsPod => "hatls",
            Ns::RelayPod => "relay",
        }
    }

    /// The upstream's address as seen from this namespace; `None` for the upstream's own.
    fn upstream(self) -> Option<&'static str> {
        match self {
            Ns::Up => None,
            Ns::Peers => Some(UP_FROM_PEERS),
            Ns::Pod => Some(UP_FROM_POD),
            Ns::HaproxyPod => Some(UP_FROM_HAPROXY_POD),
            Ns::TlsPod => Some(UP_FROM_TLS_POD),
            Ns::RelayPod => Some(UP_FROM_RELAY_POD),
        }
    }
}

/// A process the lab started; stopped (TERM, then KILL) by its own PID.
pub struct Proc {
    /// Name for messages and its log file.
    pub name: String,
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Its PID; `ip netns exec`, `taskset` and `setpriv` all exec, so this is
    /// the program's own.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to one PID.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Namespaces, run folder and processes of one harness run.
pub struct Lab {
    /// Namespace prefix, unique per run.
    pub id: String,
    /// The run folder: configs, logs, the binary copy.
    pub dir: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    /// Keep the run folder (logs) after a failure.
    pub keep_dir: bool,
}

impl Lab {
    /// Creates the namespaces and links; nothing runs yet.
    pub fn new() -> anyhow::Result<Lab> {
        let id = format!("{PREFIX}{}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        let mut lab = Lab {
            id,
            dir: dir.clone(),
            namespaces: Vec::new(),
            procs: Vec::new(),
            keep_dir: true,
        };
        std::fs::create_dir_all(&dir)?;
        // uid 1337 and nginx's unprivileged workers read configs and pages from here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        for ns in Ns::ALL {
            let name = lab.ns(ns);
            run(Command::new("ip").args(["netns", "add", &name]))?;
            lab.namespaces.push(name.clone());
            run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        }
        lab.link(Ns::Peers, "10.251.1.2", UP_FROM_PEERS)?;
        lab.link(Ns::Pod, "10.251.2.2", UP_FROM_POD)?;
        lab.link(Ns::HaproxyPod, "10.251.3.2", UP_FROM_HAPROXY_POD)?;
        lab.link(Ns::TlsPod, "10.251.4.2", UP_FROM_TLS_POD)?;
        lab.link(Ns::RelayPod, "10.251.5.2", UP_FROM_RELAY_POD)?;
        for ns in Ns::ALL {
            if let Some(up) = ns.upstream() {
                lab.hosts(ns, up)?;
            }
        }
        for ns in Ns::ALL {
            // Connection-per-request runs open tens of thousands of connections; reuse
            // TIME_WAIT ports instead of running out of them.
            lab.run_in(
                ns,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=65535",
                ],
            )?;
        }
        Ok(lab)
    }

    /// The namespace's name.
    pub fn ns(&self, ns: Ns) -> String {
        format!("{}-{}", self.id, ns.short())
    }

    /// The names the h2c, gRPC and passthrough clients dial, resolved to the upstream's
    /// address in `ns`: `ip netns exec` mounts `/etc/netns/NS/hosts` over `/etc/hosts`, so
    /// that wrk and h2load send the name as SNI and `:authority` as a pod's client would
    /// (and oha, which resolves a URL's host even when it goes through a proxy, finds the
    /// explicit proxy's).
    fn hosts(&self, ns: Ns, up: &str) -> anyhow::Result<()> {
        let dir = Path::new(ETC_NETNS).join(self.ns(ns));
        std::fs::create_dir_all(&dir)?;
        let explicit = if ns == Ns::Peers { EXPLICIT_HOST } else { "" };
        std::fs::write(
            dir.join("hosts"),
            format!(
                "127.0.0.1 localhost\n{up} {H2C_HOST} {GRPC_HOST} {PASSTHROUGH_HOST} {TLS_HOST} {explicit}\n"
            ),
        )?;
        Ok(())
    }

    /// A veth between `client` (address `mine`) and the upstream (address `up`).
    fn link(&self, client: Ns, mine: &str, up: &str) -> anyhow::Result<()> {
        let up_ns = self.ns(Ns::Up);
        let client_ns = self.ns(client);
        let port = format!("v-{}", client.short());
        run(Command::new("ip").args([
            "-n", &up_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &client_ns,
        ]))?;
        run(Command::new("ip").args([
            "-n",
            &up_ns,
            "addr",
            "add",
            &format!("{up}/24"),
            "dev",
            &port,
        ]))?;
        run(Command::new("ip").args(["-n", &up_ns, "link", "set", &port, "up"]))?;
        run(Command::new("ip").args([
            "-n",
            &client_ns,
            "addr",
            "add",
            &format!("{mine}/24"),
            "dev",
            "eth0",
        ]))?;
        run(Command::new("ip").args(["-n", &client_ns, "link", "set", "eth0", "up"])).map(drop)
    }

    /// A command running `program` in `ns`.
    pub fn command(&self, ns: Ns, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns), program]);
        cmd
    }

    /// A command running `program` in `ns` pinned to vCPU 0, where every measured process
    /// runs (BENCHMARKING.md: the lowest-noise layout on this machine).
    pub fn pinned(&self, ns: Ns, program: &str) -> Command {
        let mut cmd = self.command(ns, "taskset");
        cmd.args(["-c", "0", program]);
        cmd
    }

    /// [`Lab::pinned`] as the proxy's uid, as a sidecar runs: the iptables redirect skips
    /// that uid's own connections.
    pub fn pinned_as_proxy(&self, ns: Ns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.pinned(ns, "setpriv");
        cmd.args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"])
            .arg(program);
        cmd
    }

    /// Runs `program args` in `ns` to completion; fails unless it exits 0.
    pub fn run_in(&self, ns: Ns, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.command(ns, program).args(args))
    }

    /// Redirects the pod's outbound connections to `dport` to `to_port` instead of the
    /// sidecar's listener: a rule ahead of the redirect `portcullis iptables` installed.
    pub fn redirect_port(&self, ns: Ns, dport: u16, to_port: u16) -> anyhow::Result<()> {
        let (dport, to_port) = (dport.to_string(), to_port.to_string());
        self.run_in(
            ns,
            "iptables",
            &[
                "-t",
                "nat",
                "-I",
                "ISTIO_REDIRECT",
                "1",
                "-p",
                "tcp",
                "--dport",
                &dport,
                "-j",
                "REDIRECT",
                "--to-ports",
                &to_port,
            ],
        )
        .map(drop)
    }

    /// Starts a long-running process, its output to `<name>.log` in the run folder.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(pid)
    }

    /// Stops one process the lab started (TERM, then KILL) and forgets it.
    pub fn stop(&mut self, pid: u32) {
        if let Some(i) = self.procs.iter().position(|p| p.pid() == pid) {
            let mut p = self.procs.remove(i);
            p.stop();
        }
    }

    /// A copy of `binary` in the run folder that uid 1337 can surely read and execute (a
    /// hard link when on the same file system).
    pub fn private_copy(&self, binary: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let copy = self.dir.join(name);
        let _ = std::fs::remove_file(&copy);
        if std::fs::hard_link(binary, &copy).is_err() {
            std::fs::copy(binary, &copy)
                .with_context(|| format!("copying {}", binary.display()))?;
        }
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
        Ok(copy)
    }

    /// Fails if any started process has exited, with the tail of its log.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.exited() {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                bail!("{} exited ({status}):\n{}", p.name, tail(&log, 30));
            }
        }
        Ok(())
    }

    /// Writes `content` to `path` with mode 0644, via a rename so that a watcher never
    /// reads half a file.
    pub fn write(&self, path: &Path, content: &str) -> anyhow::Result<()> {
        let staging = path.with_extension("staging");
        std::fs::write(&staging, content)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&staging, path)?;
        Ok(())
    }

    /// A fresh folder in the run folder, mode 0755.
    pub fn mkdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    /// `curl -s` in `ns` with a 2 s cap: (status, body).
    pub fn curl(&self, ns: Ns, args: &[&str]) -> anyhow::Result<(u16, String)> {
        let out = self
            .command(ns, "curl")
            .args(["-s", "--max-time", "2", "-w", "\n%{http_code}"])
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// Polls until `check` passes, up to `within`.
    pub fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Lab) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_running()?;
            if check(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not ready within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `Host:`-addressed GET through `url` in `ns` returns the page.
    pub fn serves_page(&self, ns: Ns, extra: &[&str]) -> bool {
        self.curl(ns, extra)
            .is_ok_and(|(status, body)| status == 200 && body == PAGE)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(ns));
        }
        if self.keep_dir {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a short command; fails with its output unless it exits 0 within 30 s.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// nginx serving [`PAGE`] on port 80 of every address of its namespace.
pub fn upstream_nginx_conf(home: &Path, tls: &Path) -> String {
    let h = home.display();
    let t = tls.display();
    format!(
        "daemon off;
worker_processes 1;
pid {h}/nginx.pid;
error_log {h}/error.log error;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {h}/tmp/body;
    proxy_temp_path {h}/tmp/proxy;
    fastcgi_temp_path {h}/tmp/fastcgi;
    uwsgi_temp_path {h}/tmp/uwsgi;
    scgi_temp_path {h}/tmp/scgi;
    server {{
        listen 80 backlog=65535;
        server_name _;
        root {h}/html;
        index index.html;
    }}
    server {{
        listen {H2C_PORT} http2 backlog=65535;
        server_name _;
        # Above h2load's 1,000 streams: at nginx's default of 128 per connection, Envoy
        # (which opens one upstream connection and learns the limit late) gets streams
        # refused, and a proxy would be measured against the upstream's limit.
        http2_max_concurrent_streams 1000;
        root {h}/html;
        index index.html;
        # A POST to a static file is refused (405); answered as a GET of the same file
        # instead, it is a unary gRPC reply: the frame, then `grpc-status: 0` as trailers.
        location = {GRPC_PATH} {{
            default_type application/grpc;
            add_trailer grpc-status 0 always;
            error_page 405 =200 $uri;
        }}
    }}
    server {{
        listen 443 ssl backlog=65535;
        server_name _;
        ssl_certificate {t}/server.pem;
        ssl_certificate_key {t}/server.key;
        root {h}/html;
        index index.html;
    }}
}}
"
    )
}

/// A test CA and a certificate it signs for [`TLS_HOST`], written to `dir` (`ca.pem`,
/// `server.pem`, `server.key`) with openssl.
pub fn make_test_ca(dir: &Path) -> anyhow::Result<()> {
    let d = |name: &str| dir.join(name).display().to_string();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=portcullis bench CA",
        "-keyout",
        &d("ca.key"),
        "-out",
        &d("ca.pem"),
    ]))?;
    run(Command::new("openssl").args([
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={TLS_HOST}"),
        "-keyout",
        &d("server.key"),
        "-out",
        &d("server.csr"),
    ]))?;
    let ext = dir.join("san.ext");
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{TLS_HOST},DNS:{PASSTHROUGH_HOST}\n"),
    )?;
    run(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &d("server.csr"),
        "-CA",
        &d("ca.pem"),
        "-CAkey",
        &d("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &d("san.ext"),
        "-out",
        &d("server.pem"),
    ]))?;
    for name in ["ca.pem", "server.pem", "server.key"] {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// nginx as a reverse proxy to the upstream: one worker, upstream keep-alive.
pub fn proxy_nginx_conf(home: &Path) -> String {
    let h = home.display();
    format!(
        "daemon off;
worker_processes 1;
pid {h}/nginx.pid;
error_log {h}/error.log error;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {h}/tmp/body;
    proxy_temp_path {h}/tmp/proxy;
    fastcgi_temp_path {h}/tmp/fastcgi;
    uwsgi_temp_path {h}/tmp/uwsgi;
    scgi_temp_path {h}/tmp/scgi;
    upstream up {{
        server {UP_FROM_PEERS}:80;
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{NGINX_PORT} backlog=65535;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

/// What every HTTP-mode HAProxy config shares: one thread, no logging, server
/// connections shared across clients.
const HAPROXY_COMMON: &str = "global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    http-reuse always
";

/// HAProxy as a reverse proxy in front of the upstream, over plain HTTP, over TLS
/// (verifying the upstream against `ca`), and over h2c on both sides (`proto h2`).
pub fn haproxy_conf(ca: &Path) -> String {
    format!(
        "{HAPROXY_COMMON}frontend bench
    bind 127.0.0.1:{HAPROXY_PORT}
    default_backend up
backend up
    server s1 {UP_FROM_PEERS}:80
frontend bench-tls
    bind 127.0.0.1:{HAPROXY_TLS_PORT}
    default_backend up-tls
backend up-tls
    server s1 {UP_FROM_PEERS}:443 ssl verify required ca-file {} sni str({TLS_HOST}) verifyhost {TLS_HOST}
frontend bench-h2
    bind 127.0.0.1:{HAPROXY_H2_PORT} proto h2
    default_backend up-h2
backend up-h2
    server s1 {UP_FROM_PEERS}:{H2C_PORT} proto h2
listen bench-tcp
    mode tcp
    bind 127.0.0.1:{HAPROXY_TCP_PORT}
    server s1 {UP_FROM_PEERS}:80
",
        ca.display()
    )
}

/// HAProxy with its access log on as its users run it in a container: `option httplog`
/// to standard output (a file here), otherwise [`haproxy_conf`]'s plain HTTP proxy.
pub fn haproxy_log_conf() -> String {
    let common = HAPROXY_COMMON.replacen(
        "defaults\n",
        "    log stdout format raw local0\ndefaults\n    log global\n    option httplog\n",
        1,
    );
    format!(
        "{common}frontend bench-log
    bind 127.0.0.1:{HAPROXY_LOG_PORT}
    default_backend up
backend up
    server s1 {UP_FROM_PEERS}:80
"
    )
}

/// HAProxy as a sidecar: the redirected port, forwarding each connection to its original
/// destination (`0.0.0.0:0`), which HAProxy reads with `SO_ORIGINAL_DST` as portcullis does;
/// to the h2c port over HTTP/2 (HAProxy takes h2c clients on any HTTP bind). The bulk
/// ports, redirected apart, reach two `mode tcp` relays to the original destination, as a
/// TCP sidecar is configured: one splicing both ways (`option splice-request` and
/// `splice-response`; with `splice-auto`, HAProxy 2.6 never spliced these transfers), one
/// copying through its buffers.
pub fn haproxy_sidecar_conf() -> String {
    // Splicing reserves two descriptors per pipe and maxconn / 4 pipes by default, which
    // with maxconn's own two per connection pass the 20,000 open files a run here may
    // have; one transfer at a time needs one pipe per direction.
    let common = HAPROXY_COMMON.replacen("defaults\n", "    maxpipes 1000\ndefaults\n", 1);
    format!(
        "{common}frontend sidecar
    bind 0.0.0.0:15001
    use_backend original-h2 if {{ dst_port {H2C_PORT} }}
    default_backend original
backend original
    server original 0.0.0.0:0
backend original-h2
    server original 0.0.0.0:0 proto h2
listen bulk-splice
    mode tcp
    bind 0.0.0.0:{SIDECAR_BULK_PORT}
    option splice-request
    option splice-response
    server original 0.0.0.0:0
listen bulk-copy
    mode tcp
    bind 0.0.0.0:{SIDECAR_BULK_COPY_PORT}
    server original 0.0.0.0:0
"
    )
}

/// A second HAProxy in the sidecar's pod for one bulk port: splicing both ways, as
/// [`haproxy_sidecar_conf`]'s `bulk-splice`, through 256 KiB pipes (portcullis's bulk
/// size) instead of the system's default 64 KiB.
pub fn haproxy_bulk_pipe_conf() -> String {
    format!(
        "global
    nbthread 1
    maxconn 8000
    maxpipes 1000
    tune.pipesize 262144
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
listen bulk-splice-pipe
    bind 0.0.0.0:{SIDECAR_BULK_PIPE_PORT}
    option splice-request
    option splice-response
    server original 0.0.0.0:0
"
    )
}

/// HAProxy as a sidecar passing TLS through by SNI, as its documentation shows: wait for
/// the ClientHello, pick the backend by `req.ssl_sni`, refuse the rest.
pub fn haproxy_sni_conf() -> String {
    format!(
        "global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend sidecar
    bind 0.0.0.0:15001
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend passthrough if {{ req.ssl_sni -i {PASSTHROUGH_HOST} }}
backend passthrough
    server s1 {UP_FROM_TLS_POD}:443
"
    )
}

/// Istio's default text access log format (`EnvoyTextLogFormat`), which portcullis's
/// `--access-log-format text` writes too.
const ISTIO_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// One Envoy listener on `port` routing everything to `cluster`, as Envoy's benchmarking
/// guide advises (no request ids, no dynamic stats); with `access_log`, the file access
/// log Istio configures, in Istio's default format, to that file.
fn envoy_listener(port: u16, cluster: &str, access_log: Option<&Path>) -> String {
    let log = access_log.map_or(String::new(), |path| {
        format!(
            "
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format: {{text_format_source: {{inline_string: {}}}}}",
            path.display(),
            serde_json::Value::from(ISTIO_LOG_FORMAT)
        )
    });
    format!(
        r#"
  - name: bench-{port}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench_{port}
          generate_request_id: false{log}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: false"#
    )
}

/// One STATIC Envoy cluster of the upstream's `port`, with `extra` cluster fields; its
/// circuit breakers as wide as istiod sets them (Envoy's own default of 1,024 requests in
/// flight refuses some of h2load's 1,000 streams).
fn envoy_cluster(name: &str, port: u16, extra: &str) -> String {
    format!(
        "
  - name: {name}
    connect_timeout: 5s
    type: STATIC
    circuit_breakers:
      thresholds:
      - {{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}}{extra}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {UP_FROM_PEERS}, port_value: {port}}}}}}}"
    )
}

/// Envoy as a reverse proxy over plain HTTP/1.1, originating TLS, and over h2c on both
/// sides; no access log.
pub fn envoy_conf(ca: &Path) -> String {
    let ca = ca.display();
    let tls = format!(
        r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {TLS_HOST}
        common_tls_context:
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: {TLS_HOST}}}}}]"#
    );
    let h2 = r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}"#;
    format!(
        "static_resources:\n  listeners:{}{}{}\n  clusters:{}{}{}\n",
        envoy_listener(ENVOY_PORT, "up", None),
        envoy_listener(ENVOY_TLS_PORT, "up-tls", None),
        envoy_listener(ENVOY_H2_PORT, "up-h2", None),
        envoy_cluster("up", 80, ""),
        envoy_cluster("up-tls", 443, &tls),
        envoy_cluster("up-h2", H2C_PORT, h2),
    )
}

/// Envoy as the plain HTTP/1.1 reverse proxy with Istio's file access log to `log`.
pub fn envoy_log_conf(log: &Path) -> String {
    format!(
        "static_resources:\n  listeners:{}\n  clusters:{}\n",
        envoy_listener(ENVOY_LOG_PORT, "up", Some(log)),
        envoy_cluster("up", 80, ""),
    )
}

/// The registry every portcullis instance loads: the upstream under two names (one per
/// side of the up namespace), the bulk source as opaque TCP, the upstream's h2c port as
/// HTTP2 and as GRPC, its TLS port by SNI, and `fillers` unrelated
/// ServiceEntries so that the registry is the size of a real mesh's.
pub fn portcullis_conf(fillers: usize, ca: &Path) -> String {
    let ca = ca.display();
    let mut out = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upstream, namespace: default}}
spec:
  hosts: [{SIDECAR_HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_POD}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upstream-peers, namespace: default}}
spec:
  hosts: [{EXPLICIT_HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_PEERS}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bulk, namespace: default}}
spec:
  hosts: [bulk.bench]
  addresses: [{UP_FROM_POD}/32]
  ports: [{{number: {BULK_PORT}, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_POD}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upstream-tls, namespace: default}}
spec:
  hosts: [{TLS_HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_PEERS}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: upstream-tls, namespace: default}}
spec:
  host: {TLS_HOST}
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}, sni: {TLS_HOST}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: h2c, namespace: default}}
spec:
  hosts: [{H2C_HOST}]
  ports: [{{number: {H2C_PORT}, name: http2, protocol: HTTP2}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_POD}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: grpc, namespace: default}}
spec:
  hosts: [{GRPC_HOST}]
  ports: [{{number: {H2C_PORT}, name: grpc, protocol: GRPC}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_POD}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: passthrough, namespace: default}}
spec:
  hosts: [{PASSTHROUGH_HOST}]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {UP_FROM_POD}}}]
"
    );
    for i in 0..fillers {
        let _ = write!(
            out,
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: filler-{i}, namespace: default}}
spec:
  hosts: [filler-{i}.example.com]
  ports: [{{number: 443, name: https, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 192.0.2.{}}}]
",
            1 + i % 250
        );
    }
    out
}

/// One of two alternating reload payloads: a ServiceEntry whose host changes each time,
/// so that every reload compiles and swaps a different snapshot.
pub fn reload_conf(round: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reloaded, namespace: default}}
spec:
  hosts: [reload-{round}.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 192.0.2.{}}}]
",
        1 + round % 250
    )
}
