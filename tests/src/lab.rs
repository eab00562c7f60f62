//! The network-namespace lab: a bridge, the external host, the client pod running portcullis,
//! an in-cluster pod, and a rogue host, each in its own namespace on one flat /16.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cmd::{self, Proc};
use crate::curl::Reply;
use crate::{poll, preflight, scenario};

mod peers;

pub use peers::{Certificate, DNS_IP, Nginx};

/// Prefix of every namespace and temp dir the lab creates, so leftovers of a killed run can
/// be recognised (scripts/test.sh sweeps them).
pub const PREFIX: &str = "pce2e";

/// The uid and gid portcullis runs as, excluded from the redirect.
pub const PROXY_UID: u32 = 1337;

/// How long portcullis may take to report `/ready`.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Upper bound for one short command (ip, iptables, a curl with its own `--max-time`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// `--max-time` of every curl.
const CURL_MAX_TIME: &str = "5";

/// A host of the lab; each is one network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the bridge that connects everyone.
    Bridge,
    /// The external host (nginx) at 10.50.0.1.
    External,
    /// The client pod at 10.50.1.1: curl, portcullis, and the iptables redirect.
    Pod,
    /// The in-cluster pod (nginx) at 10.50.2.1.
    InCluster,
    /// An unregistered host at 10.50.3.3 that must never be reached.
    Rogue,
}

impl Role {
    const ALL: [Role; 5] = [
        Role::Bridge,
        Role::External,
        Role::Pod,
        Role::InCluster,
        Role::Rogue,
    ];

    fn short(self) -> &'static str {
        match self {
            Role::Bridge => "br",
            Role::External => "ext",
            Role::Pod => "pod",
            Role::InCluster => "app",
            Role::Rogue => "rogue",
        }
    }

    /// The host's IPv6 address on the lab subnet (the bridge has none).
    pub fn ip6(self) -> Option<&'static str> {
        match self {
            Role::Bridge => None,
            Role::External => Some(scenario::EXTERNAL_IP6),
            Role::Pod => Some(scenario::POD_IP6),
            Role::InCluster => Some(scenario::IN_CLUSTER_IP6),
            Role::Rogue => Some(scenario::ROGUE_IP6),
        }
    }

    /// The host's address on the lab subnet (the bridge has none).
    pub fn ip(self) -> Option<&'static str> {
        match self {
            Role::Bridge => None,
            Role::External => Some(scenario::EXTERNAL_IP),
            Role::Pod => Some(scenario::POD_IP),
            Role::InCluster => Some(scenario::IN_CLUSTER_IP),
            Role::Rogue => Some(scenario::ROGUE_IP),
        }
    }
}

/// A `pce2e-net listen` process: records every connection it accepts.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Where it listens.
    pub addr: String,
    log: PathBuf,
}

/// What `pce2e-net connect` saw.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The TCP handshake completed (with the proxy, when redirected).
    pub connected: bool,
    /// Bytes received before the end.
    pub received: usize,
    /// `eof`, `reset` or `timeout`.
    pub end: String,
    /// The tool's whole report line.
    pub line: String,
}

/// One lab: namespaces, processes, a temp dir, all removed on drop.
pub struct Lab {
    /// Unique id, the prefix of every namespace name.
    pub id: String,
    /// Temp dir holding configs, logs and the binary copy.
    pub dir: PathBuf,
    /// The folder portcullis watches (`--config`).
    pub config_dir: PathBuf,
    bin: PathBuf,
    net_tool: PathBuf,
    namespaces: Vec<String>,
    etc_netns: Vec<PathBuf>,
    nginx: Vec<(Role, Proc)>,
    sinks: Vec<(Sink, Proc)>,
    /// Servers and helpers started by tests (see `peers`), stopped before the namespaces go.
    peers: Vec<Proc>,
    /// Further files worth printing when a test fails (peer logs, dnsmasq's hosts file).
    logs: Vec<PathBuf>,
    portcullis: Option<Proc>,
    transcript: Vec<String>,
    seq: u32,
    dumped: bool,
}

static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds the topology and starts both nginx peers; portcullis is started by the test.
    pub fn new(test: &str) -> anyhow::Result<Lab> {
        let bin = preflight::portcullis_bin()?;
        let net_tool = preflight::net_tool_bin()?;
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("{id}-{test}"));
        let config_dir = dir.join("config");
        let mut lab = Lab {
            id,
            dir: dir.clone(),
            config_dir: config_dir.clone(),
            bin: dir.join("portcullis"),
            net_tool,
            namespaces: Vec::new(),
            etc_netns: Vec::new(),
            nginx: Vec::new(),
            sinks: Vec::new(),
            peers: Vec::new(),
            logs: Vec::new(),
            portcullis: None,
            transcript: Vec::new(),
            seq: 0,
            dumped: false,
        };
        // From here on, everything created is recorded in `lab`, so a failure part-way through
        // still tears it all down in Drop.
        make_dir(&dir)?;
        make_dir(&config_dir)?;
        // A private copy that uid 1337 can surely read and execute, whatever the checkout's
        // permissions are.
        std::fs::copy(&bin, &lab.bin)
            .with_context(|| format!("copying {} into the lab", bin.display()))?;
        std::fs::set_permissions(&lab.bin, std::fs::Permissions::from_mode(0o755))?;
        lab.note(format!(
            "lab {} in {}, portcullis from {}",
            lab.id,
            dir.display(),
            bin.display()
        ));
        lab.build_network()?;
        lab.write_pod_hosts()?;
        lab.start_nginx(Role::External, scenario::EXTERNAL_PAGE)?;
        lab.start_nginx(Role::InCluster, scenario::IN_CLUSTER_PAGE)?;
        Ok(lab)
    }

    /// The namespace name of `role`.
    pub fn ns(&self, role: Role) -> String {
        format!("{}-{}", self.id, role.short())
    }

    /// A command that runs `program` inside `role`'s namespace (as root).
    pub fn exec(&self, role: Role, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role), program]);
        cmd
    }

    /// Runs `program args` in `role`'s namespace; fails unless it exits 0.
    pub fn run(&self, role: Role, program: &str, args: &[&str]) -> anyhow::Result<String> {
        cmd::check(self.exec(role, program).args(args), COMMAND_TIMEOUT)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        cmd::check(Command::new("ip").args(args), COMMAND_TIMEOUT).map(drop)
    }

    fn build_network(&mut self) -> anyhow::Result<()> {
        for role in Role::ALL {
            let ns = self.ns(role);
            self.ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let br = self.ns(Role::Bridge);
        self.ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        self.ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for role in Role::ALL {
            let Some(ip) = role.ip() else { continue };
            let ns = self.ns(role);
            let port = format!("v-{}", role.short());
            // Both ends are created directly inside their namespaces, so names never clash
            // with the host's or with a lab running in parallel.
            self.ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            self.ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            self.ip(&["-n", &br, "link", "set", &port, "up"])?;
            let cidr = format!("{ip}/{}", scenario::PREFIX);
            self.ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            if let Some(ip6) = role.ip6() {
                // nodad: usable at once, instead of after duplicate address detection.
                let cidr6 = format!("{ip6}/{}", scenario::PREFIX6);
                self.ip(&["-n", &ns, "addr", "add", &cidr6, "dev", "eth0", "nodad"])?;
            }
            self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// `ip netns exec` bind-mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`: this is the
    /// pod's name resolution, with app.internal.com on an address where nothing listens.
    fn write_pod_hosts(&mut self) -> anyhow::Result<()> {
        let etc = Path::new("/etc/netns").join(self.ns(Role::Pod));
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        self.etc_netns.push(etc.clone());
        let hosts = format!(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n{} {}\n",
            scenario::APP_VIP,
            scenario::APP_HOST
        );
        std::fs::write(etc.join("hosts"), hosts)?;
        Ok(())
    }

    fn start_nginx(&mut self, role: Role, page: &str) -> anyhow::Result<()> {
        let ip = role.ip().context("nginx needs a host with an address")?;
        let ip6 = role
            .ip6()
            .context("nginx needs a host with an IPv6 address")?;
        let home = self.dir.join(format!("nginx-{}", role.short()));
        make_dir(&home)?;
        make_dir(&home.join("html"))?;
        make_dir(&home.join("tmp"))?;
        let index = home.join("html/index.html");
        std::fs::write(&index, page)?;
        std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o644))?;
        let h = home.display();
        let conf = format!(
            "daemon off;
worker_processes 1;
pid {h}/nginx.pid;
error_log {h}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {h}/access.log;
    client_body_temp_path {h}/tmp/body;
    proxy_temp_path {h}/tmp/proxy;
    server {{
        listen {ip}:80;
        listen [{ip6}]:80;
        server_name _;
        root {h}/html;
        index index.html;
    }}
}}
"
        );
        let conf_path = home.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut command = self.exec(role, "nginx");
        command.args(["-p", &h.to_string(), "-e", &format!("{h}/error.log"), "-c"]);
        command.arg(&conf_path);
        let proc = Proc::spawn(
            &format!("nginx-{}", role.short()),
            &mut command,
            &self.dir,
            "TERM",
        )?;
        self.nginx.push((role, proc));
        let url = format!("http://{ip}/");
        poll(&format!("nginx on {ip}"), Duration::from_secs(10), || {
            if let Some((_, p)) = self.nginx.iter_mut().find(|(r, _)| *r == role)
                && let Some(status) = p.exited()
            {
                bail!("nginx exited early ({status}):\n{}", p.logs());
            }
            let out = cmd::output(
                self.exec(role, "curl")
                    .args(["-s", "--max-time", "1", &url]),
                COMMAND_TIMEOUT,
            )?;
            Ok((String::from_utf8_lossy(&out.stdout) == page).then_some(()))
        })
    }

    /// Number of requests nginx on `role` has logged so far.
    pub fn nginx_requests(&self, role: Role) -> usize {
        let log = self
            .dir
            .join(format!("nginx-{}", role.short()))
            .join("access.log");
        std::fs::read_to_string(log).map_or(0, |s| s.lines().count())
    }

    /// Writes a config file into the watched folder atomically (write aside, then rename), as
    /// an editor or `kubectl` would, so portcullis never reads half a file.
    pub fn write_config(&mut self, name: &str, content: &str) -> anyhow::Result<()> {
        let staging = self.dir.join(format!(".staging-{name}"));
        std::fs::write(&staging, content)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&staging, self.config_dir.join(name))?;
        self.note(format!("wrote config/{name}"));
        Ok(())
    }

    /// Deletes a config file from the watched folder.
    pub fn remove_config(&mut self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.config_dir.join(name))
            .with_context(|| format!("removing config/{name}"))?;
        self.note(format!("removed config/{name}"));
        Ok(())
    }

    /// Publishes `files` into the watched folder the way the kubelet updates a mounted
    /// ConfigMap: a new hidden `..<version>` directory, the `..data` symlink swapped to it
    /// with one rename, user-visible `name -> ..data/name` symlinks, and the old version and
    /// stale links removed afterwards.
    pub fn publish_configmap(&mut self, files: &[(&str, &str)]) -> anyhow::Result<()> {
        self.seq += 1;
        let version = format!("..2026_01_01_00_00_00.{}", self.seq);
        let version_dir = self.config_dir.join(&version);
        make_dir(&version_dir)?;
        for (name, content) in files {
            let path = version_dir.join(name);
            std::fs::write(&path, content)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
        let tmp = self.config_dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp)?;
        std::fs::rename(&tmp, self.config_dir.join("..data"))?;
        for (name, _) in files {
            let link = self.config_dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
            }
        }
        for entry in std::fs::read_dir(&self.config_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_link = !name.starts_with("..") && !files.iter().any(|(f, _)| *f == name);
            let old_version = name.starts_with("..2026") && name != version;
            if stale_link {
                std::fs::remove_file(entry.path())?;
            } else if old_version {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        self.note(format!("published ConfigMap {version} with {names:?}"));
        Ok(())
    }

    /// Writes the scenario's starting config: REGISTRY_ONLY mesh config, nothing registered.
    pub fn write_registry_only(&mut self) -> anyhow::Result<()> {
        self.write_config("mesh.yaml", &scenario::mesh_config("REGISTRY_ONLY"))
    }

    /// Writes step 3's WorkloadEntry and ServiceEntry.
    pub fn write_app_service(&mut self) -> anyhow::Result<()> {
        self.write_config("workloadentry.yaml", scenario::WORKLOAD_ENTRY)?;
        self.write_config("serviceentry.yaml", scenario::SERVICE_ENTRY)
    }

    /// Runs `portcullis iptables --apply` in the pod as root, like Istio's init container.
    pub fn apply_iptables(&mut self) -> anyhow::Result<String> {
        self.run_portcullis_as_root(&["iptables", "--apply"])
    }

    /// Runs `portcullis <args>` to completion in the pod as root, as an init container does.
    pub fn run_portcullis_as_root(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let bin = self.bin.display().to_string();
        let out = self.run(Role::Pod, &bin, args)?;
        self.note(format!("ran `portcullis {}` in the pod", args.join(" ")));
        Ok(out)
    }

    /// The folder `start_portcullis` passes as `--config`, where configs are written.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The pod's nat table as `iptables -t nat -S` prints it.
    pub fn pod_nat_rules(&self) -> anyhow::Result<String> {
        self.run(Role::Pod, "iptables", &["-w", "-t", "nat", "-S"])
    }

    /// Starts `portcullis run --config <config_dir> <extra>` in the pod as uid/gid 1337 and
    /// waits until its admin `/ready` answers 200 `LIVE`.
    pub fn start_portcullis(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let config = self.config_dir.display().to_string();
        let mut args = vec!["run", "--config", config.as_str()];
        args.extend_from_slice(extra);
        self.start_portcullis_as_given(&args, &[])
    }

    /// Starts `portcullis run --xds-address <xds> <extra>` (no `--config`) in the pod as
    /// uid/gid 1337, with the environment Istio's injector gives the sidecar (pod name,
    /// namespace, IP), and waits until its admin `/ready` answers 200 `LIVE`: the first
    /// complete set of resources is applied.
    pub fn start_portcullis_xds(&mut self, xds: &str, extra: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["run", "--xds-address", xds];
        args.extend_from_slice(extra);
        self.start_portcullis_as_given(
            &args,
            &[
                ("POD_NAME", "client"),
                ("POD_NAMESPACE", "default"),
                ("INSTANCE_IP", scenario::POD_IP),
                ("SERVICE_ACCOUNT", "default"),
            ],
        )
    }

    /// Starts `portcullis <args>` (the subcommand included) in the pod as uid/gid 1337 with
    /// exactly `env` added, and waits until its admin `/ready` answers 200 `LIVE`.
    pub fn start_portcullis_as_given(
        &mut self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let id = PROXY_UID.to_string();
        let mut command = self.exec(Role::Pod, "setpriv");
        command
            .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
            .arg(&self.bin)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "1");
        self.note(format!("starting portcullis {args:?}"));
        self.portcullis = Some(Proc::spawn("portcullis", &mut command, &self.dir, "TERM")?);
        let start = Instant::now();
        poll("portcullis /ready = 200 LIVE", READY_DEADLINE, || {
            self.expect_running()?;
            let (status, body) = self.admin_get("/ready")?;
            Ok((status == 200 && body.trim() == "LIVE").then_some(()))
        })?;
        self.note(format!("portcullis ready after {:?}", start.elapsed()));
        Ok(())
    }

    /// What portcullis has written to stdout and stderr so far (its access log among it).
    pub fn portcullis_output(&self) -> String {
        self.portcullis.as_ref().map_or_else(String::new, |p| {
            let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
            format!("{}{}", read(&p.stdout), read(&p.stderr))
        })
    }

    /// Fails if portcullis was started and has exited.
    pub fn expect_running(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.portcullis.as_mut()
            && let Some(status) = p.exited()
        {
            bail!("portcullis exited ({status})");
        }
        Ok(())
    }

    /// The effective uid of the running portcullis process.
    pub fn portcullis_uid(&self) -> anyhow::Result<u32> {
        let pid = self
            .portcullis
            .as_ref()
            .context("portcullis not started")?
            .pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .context("no Uid: line")?;
        Ok(line
            .split_whitespace()
            .nth(2)
            .context("short Uid: line")?
            .parse()?)
    }

    /// `GET http://127.0.0.1:15000<path>` from inside the pod: status and body.
    pub fn admin_get(&mut self, path: &str) -> anyhow::Result<(u16, String)> {
        let reply = self.curl_inner(
            Role::Pod,
            &[&format!("http://127.0.0.1:15000{path}")],
            false,
        )?;
        Ok((reply.status, reply.body))
    }

    /// Runs curl as root in the client pod (so its traffic IS redirected) with `args`.
    pub fn curl(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        self.curl_inner(Role::Pod, args, true)
    }

    /// Runs curl as root in `role`'s namespace with `args`.
    pub fn curl_in(&mut self, role: Role, args: &[&str]) -> anyhow::Result<Reply> {
        self.curl_inner(role, args, true)
    }

    fn curl_inner(&mut self, role: Role, args: &[&str], record: bool) -> anyhow::Result<Reply> {
        self.seq += 1;
        let headers = self.dir.join(format!("curl-{}.headers", self.seq));
        let body = self.dir.join(format!("curl-{}.body", self.seq));
        let mut command = self.exec(role, "curl");
        command
            .args(["-sS", "--max-time", CURL_MAX_TIME, "-D"])
            .arg(&headers)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code} %{http_connect}"])
            .args(args);
        let out = cmd::output(&mut command, COMMAND_TIMEOUT)?;
        let read = |p: &Path| {
            let text = std::fs::read(p).map_or_else(
                |_| String::new(),
                |b| String::from_utf8_lossy(&b).into_owned(),
            );
            let _ = std::fs::remove_file(p);
            text
        };
        // With --head curl writes the headers to -o as well and never reads a body.
        let head = args.iter().any(|a| *a == "--head" || *a == "-I");
        let body = read(&body);
        let reply = Reply::parse(
            out.status.code().unwrap_or(-1),
            &String::from_utf8_lossy(&out.stdout),
            &read(&headers),
            if head { "" } else { &body },
            &String::from_utf8_lossy(&out.stderr),
        );
        if record {
            self.note(format!("curl {args:?} in {role:?} -> {reply}"));
        }
        Ok(reply)
    }

    /// Starts a `pce2e-net listen` on `addr` inside `role`'s namespace.
    pub fn start_sink(&mut self, role: Role, addr: &str) -> anyhow::Result<Sink> {
        let log = self.dir.join(format!(
            "sink-{}-{}.log",
            role.short(),
            addr.replace(':', "_")
        ));
        let mut command = self.exec(role, &self.net_tool.display().to_string());
        command.arg("listen").arg(addr).arg(&log);
        let name = format!("sink-{}-{}", role.short(), self.sinks.len());
        let proc = Proc::spawn(&name, &mut command, &self.dir, "KILL")?;
        let sink = Sink {
            addr: addr.to_owned(),
            log,
        };
        self.sinks.push((sink.clone(), proc));
        poll(
            &format!("listener on {addr}"),
            Duration::from_secs(5),
            || {
                Ok(std::fs::read_to_string(&sink.log)
                    .is_ok_and(|s| s.contains("listening"))
                    .then_some(()))
            },
        )?;
        self.note(format!("listener on {addr} in {role:?}"));
        Ok(sink)
    }

    /// Connections the sink has accepted so far.
    pub fn sink_accepts(&self, sink: &Sink) -> usize {
        std::fs::read_to_string(&sink.log).map_or(0, |s| {
            s.lines().filter(|l| l.starts_with("accept ")).count()
        })
    }

    /// `pce2e-net connect addr payload seconds` as root inside `role`'s namespace.
    pub fn connect(
        &mut self,
        role: Role,
        addr: &str,
        payload: &str,
        seconds: u64,
    ) -> anyhow::Result<Connect> {
        let tool = self.net_tool.display().to_string();
        let secs = seconds.to_string();
        let line = self.run(role, &tool, &["connect", addr, payload, &secs])?;
        let line = line.trim().to_owned();
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(key))
                .unwrap_or_default()
                .to_owned()
        };
        let result = Connect {
            connected: field("connected=") == "1",
            received: field("received=").parse().unwrap_or(0),
            end: field("end="),
            line: line.clone(),
        };
        self.note(format!("connect {addr} from {role:?} -> {line}"));
        Ok(result)
    }

    /// Adds a line to the transcript printed when a test fails.
    pub fn note(&mut self, line: String) {
        self.transcript.push(line);
    }

    /// Prints everything that helps explain a failure: the transcript, portcullis's output
    /// (its access log), the admin config dump, the pod's nat rules, nginx and listener logs.
    pub fn dump_logs(&mut self) {
        if self.dumped {
            return;
        }
        self.dumped = true;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n===== lab {} ({}) =====",
            self.id,
            self.dir.display()
        );
        let _ = writeln!(out, "----- transcript -----");
        for line in &self.transcript {
            let _ = writeln!(out, "{line}");
        }
        if let Some(p) = &self.portcullis {
            let _ = writeln!(out, "{}", p.logs());
        }
        if self.portcullis.is_some() {
            match self.admin_get("/config_dump") {
                Ok((status, body)) => {
                    let _ = writeln!(
                        out,
                        "----- admin /config_dump ({status}) -----\n{}",
                        cmd::tail(&body, 200)
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "----- admin /config_dump: {e:#}");
                }
            }
        }
        match self.pod_nat_rules() {
            Ok(rules) => {
                let _ = writeln!(out, "----- pod nat table -----\n{rules}");
            }
            Err(e) => {
                let _ = writeln!(out, "----- pod nat table: {e:#}");
            }
        }
        for (role, p) in &self.nginx {
            let home = self.dir.join(format!("nginx-{}", role.short()));
            for file in ["access.log", "error.log"] {
                let text = std::fs::read_to_string(home.join(file)).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "----- {} {file} -----\n{}",
                    p.name,
                    cmd::tail(&text, 100)
                );
            }
        }
        for (sink, _) in &self.sinks {
            let text = std::fs::read_to_string(&sink.log).unwrap_or_default();
            let _ = writeln!(out, "----- listener {} -----\n{text}", sink.addr);
        }
        for p in &self.peers {
            let _ = writeln!(out, "{}", p.logs());
        }
        for file in &self.logs {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let _ = writeln!(
                out,
                "----- {} -----\n{}",
                file.display(),
                cmd::tail(&text, 100)
            );
        }
        let _ = writeln!(out, "===== end of lab {} =====", self.id);
        eprintln!("{out}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if let Some(mut p) = self.portcullis.take() {
            p.stop();
        }
        for (_, mut p) in self.sinks.drain(..) {
            p.stop();
        }
        for mut p in self.peers.drain(..) {
            p.stop();
        }
        for (_, mut p) in self.nginx.drain(..) {
            p.stop();
        }
        for ns in &self.namespaces {
            // Anything still inside one of our namespaces was started by this lab (say an
            // nginx worker whose master died hard); it would keep the namespace alive.
            if let Ok(out) = cmd::check(
                Command::new("ip").args(["netns", "pids", ns]),
                COMMAND_TIMEOUT,
            ) {
                for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                    cmd::signal(pid, "KILL");
                }
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = cmd::check(
                Command::new("ip").args(["netns", "del", &ns]),
                COMMAND_TIMEOUT,
            ) {
                eprintln!("lab cleanup: {e:#}");
            }
        }
        for dir in self.etc_netns.drain(..) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("lab cleanup: removing {}: {e}", dir.display());
            }
        }
        if std::env::var_os("PCE2E_KEEP").is_some() {
            eprintln!("lab {}: kept {} (PCE2E_KEEP)", self.id, self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("lab cleanup: removing {}: {e}", self.dir.display());
        }
    }
}

/// Creates a directory readable by the proxy's uid and nginx's workers.
fn make_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
