//! Peers beyond the scenario's two nginx: nginx instances with their own server blocks (TLS,
//! h2c), the Python servers and clients of `tests/py/peers.py`, dnsmasq as the pod's DNS
//! server, certificates made at test time, and the pod's `/etc` files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use super::{COMMAND_TIMEOUT, Lab, Role, make_dir};
use crate::cmd::{self, Proc};
use crate::{poll, scenario};

/// The lab's DNS server: a second address of the external host's namespace.
pub const DNS_IP: &str = "10.50.0.53";

/// The Python peers, written into each lab that uses them.
const PEERS_PY: &str = include_str!("../../py/peers.py");

/// How long a peer server may take to say `ready`.
const PEER_DEADLINE: Duration = Duration::from_secs(20);

/// An nginx started with test-specific server blocks.
#[derive(Debug, Clone)]
pub struct Nginx {
    /// Where it lives: `nginx.conf`, `access.log`, `error.log`.
    pub home: PathBuf,
    role: Role,
    status_port: u16,
}

/// A certificate made at test time: self-signed, so it is also its own CA file.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The PEM certificate (pass to `--cacert` / `-CAfile`).
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

impl Certificate {
    /// An nginx server block for [`Lab::start_nginx_servers`] that serves TLS with this
    /// certificate on `listen` (`ip:port`), for any SNI.
    pub fn nginx_tls_server(&self, listen: &str) -> String {
        format!(
            "    server {{
        listen {listen} ssl;
        server_name _;
        ssl_certificate {};
        ssl_certificate_key {};
        root {{html}};
    }}",
            self.cert.display(),
            self.key.display()
        )
    }
}

impl Lab {
    /// REGISTRY_ONLY, the external host's WorkloadEntry and `services` (file name, YAML),
    /// `names` mapped to the VIP in the pod, rules installed, portcullis running with `extra`
    /// flags.
    pub fn start_with_services(
        &mut self,
        names: &[&str],
        services: &[(&str, String)],
        extra: &[&str],
    ) -> anyhow::Result<()> {
        self.map_pod_names(names)?;
        self.write_registry_only()?;
        self.write_config("workloadentry.yaml", scenario::WORKLOAD_ENTRY)?;
        for (file, yaml) in services {
            self.write_config(file, yaml)?;
        }
        self.apply_iptables()?;
        self.start_portcullis(extra)
    }

    /// Starts `program args` in `role`'s namespace as a peer named `name` (unique per lab),
    /// stopped with `stop_signal` when the lab ends.
    pub fn spawn_peer(
        &mut self,
        role: Role,
        name: &str,
        program: &str,
        args: &[&str],
        stop_signal: &'static str,
    ) -> anyhow::Result<()> {
        ensure!(
            !self.peers.iter().any(|p| p.name == name),
            "a peer named {name} is already running"
        );
        let mut command = self.exec(role, program);
        command.args(args);
        let proc = Proc::spawn(name, &mut command, &self.dir, stop_signal)?;
        self.note(format!(
            "started peer {name} (pid {}) in {role:?}",
            proc.pid()
        ));
        self.peers.push(proc);
        Ok(())
    }

    fn peer(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.peers
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no peer named {name}"))
    }

    /// What peer `name` has written to stdout so far.
    pub fn peer_stdout(&mut self, name: &str) -> anyhow::Result<String> {
        let path = self.peer(name)?.stdout.clone();
        Ok(std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Sends `signal` to peer `name`, by its process id.
    pub fn signal_peer(&mut self, name: &str, signal: &str) -> anyhow::Result<()> {
        let peer = self.peer(name)?;
        if let Some(status) = peer.exited() {
            bail!(
                "peer {name} exited ({status}) before {signal}:\n{}",
                peer.logs()
            );
        }
        cmd::signal(peer.pid(), signal);
        self.note(format!("sent {signal} to peer {name}"));
        Ok(())
    }

    /// Stops peer `name` and waits until it is gone.
    pub fn stop_peer(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self
            .peers
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no peer named {name}"))?;
        let mut peer = self.peers.remove(index);
        peer.stop();
        self.note(format!("stopped peer {name}"));
        Ok(())
    }

    /// Waits until peer `name` prints a line `ready`.
    fn wait_ready(&mut self, name: &str) -> anyhow::Result<()> {
        poll(&format!("{name} ready"), PEER_DEADLINE, || {
            let peer = self.peer(name)?;
            if let Some(status) = peer.exited() {
                bail!("{name} exited early ({status}):\n{}", peer.logs());
            }
            let out = std::fs::read_to_string(&peer.stdout).unwrap_or_default();
            Ok(out.lines().any(|l| l == "ready").then_some(()))
        })
    }

    /// Runs `program args` in `role`'s namespace to completion, whatever its exit status.
    pub fn output_in(
        &mut self,
        role: Role,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let out = cmd::output(self.exec(role, program).args(args), timeout)?;
        self.note(format!(
            "{program} {args:?} in {role:?} -> {}\nstdout: {}\nstderr: {}",
            out.status,
            cmd::tail(&String::from_utf8_lossy(&out.stdout), 20),
            cmd::tail(&String::from_utf8_lossy(&out.stderr), 20)
        ));
        Ok(out)
    }

    /// Runs a `sh -c` script in `role`'s namespace; returns stdout and stderr together.
    pub fn shell(&mut self, role: Role, script: &str) -> anyhow::Result<String> {
        let out = self.output_in(role, "sh", &["-c", script], COMMAND_TIMEOUT)?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Writes `/etc/netns/<pod>/<file>`, which `ip netns exec` mounts over `/etc/<file>` for
    /// every later command in the pod (portcullis included, when started afterwards).
    pub fn write_pod_etc(&mut self, file: &str, content: &str) -> anyhow::Result<()> {
        let path = Path::new("/etc/netns").join(self.ns(Role::Pod)).join(file);
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        self.note(format!("wrote {}", path.display()));
        Ok(())
    }

    /// Makes `names` resolve in the pod (through its hosts file) to the scenario's VIP, where
    /// nothing listens, next to app.internal.com.
    pub fn map_pod_names(&mut self, names: &[&str]) -> anyhow::Result<()> {
        let mut hosts = format!(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n{} {}\n",
            scenario::APP_VIP,
            scenario::APP_HOST
        );
        for name in names {
            hosts.push_str(&format!("{} {name}\n", scenario::APP_VIP));
        }
        self.write_pod_etc("hosts", &hosts)
    }

    /// Adds `ip` as a second address of `role`'s interface (gone with the namespace).
    pub fn add_address(&mut self, role: Role, ip: &str) -> anyhow::Result<()> {
        let cidr = format!("{ip}/{}", scenario::PREFIX);
        cmd::check(
            std::process::Command::new("ip").args([
                "-n",
                &self.ns(role),
                "addr",
                "add",
                &cidr,
                "dev",
                "eth0",
            ]),
            COMMAND_TIMEOUT,
        )?;
        self.note(format!("added {cidr} to {role:?}"));
        Ok(())
    }

    /// A self-signed certificate for `names` (the first is the subject), made with openssl.
    pub fn make_certificate(&mut self, names: &[&str]) -> anyhow::Result<Certificate> {
        let first = names.first().context("a certificate needs a name")?;
        let cert = self.dir.join("tls-cert.pem");
        let key = self.dir.join("tls-key.pem");
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        cmd::check(
            std::process::Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .args(["-subj", &format!("/CN={first}")])
                .args(["-addext", &format!("subjectAltName={}", san.join(","))])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
            COMMAND_TIMEOUT,
        )?;
        for path in [&cert, &key] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
        }
        self.note(format!("made a certificate for {names:?}"));
        Ok(Certificate { cert, key })
    }

    /// Starts another nginx named `name` in `role`'s namespace with `servers` (server blocks
    /// whose `root` may use `{html}`, a folder holding `page` as index.html); its access log
    /// has the protocol and SNI of each request, and a stub_status on 127.0.0.1:`status_port`
    /// counts accepted connections. Returns once the status page answers.
    pub fn start_nginx_servers(
        &mut self,
        role: Role,
        name: &str,
        servers: &str,
        page: &str,
        status_port: u16,
    ) -> anyhow::Result<Nginx> {
        let home = self.dir.join(format!("nginx-{name}"));
        make_dir(&home)?;
        make_dir(&home.join("html"))?;
        make_dir(&home.join("tmp"))?;
        let index = home.join("html/index.html");
        std::fs::write(&index, page)?;
        std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o644))?;
        let h = home.display().to_string();
        let servers = servers.replace("{html}", &format!("{h}/html"));
        let conf = format!(
            "daemon off;
worker_processes 1;
pid {h}/nginx.pid;
error_log {h}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format e2e '$remote_addr \"$request\" $status proto=$server_protocol sni=$ssl_server_name';
    access_log {h}/access.log e2e;
    client_body_temp_path {h}/tmp/body;
    proxy_temp_path {h}/tmp/proxy;
    server {{
        listen 127.0.0.1:{status_port};
        access_log off;
        location / {{ stub_status; }}
    }}
{servers}
}}
"
        );
        let conf_path = home.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let conf_arg = conf_path.display().to_string();
        let error_log = format!("{h}/error.log");
        self.spawn_peer(
            role,
            &format!("nginx-{name}"),
            "nginx",
            &["-p", &h, "-e", &error_log, "-c", &conf_arg],
            "TERM",
        )?;
        self.logs.push(home.join("access.log"));
        self.logs.push(home.join("error.log"));
        let nginx = Nginx {
            home,
            role,
            status_port,
        };
        poll(
            &format!("nginx-{name} status page"),
            Duration::from_secs(10),
            || {
                let peer = self.peer(&format!("nginx-{name}"))?;
                if let Some(status) = peer.exited() {
                    bail!("nginx-{name} exited early ({status}):\n{}", peer.logs());
                }
                Ok(self.nginx_accepts(&nginx).ok())
            },
        )?;
        Ok(nginx)
    }

    /// Connections `nginx` has accepted so far, read from its stub_status (each reading is
    /// itself one connection, counted in the number it returns).
    pub fn nginx_accepts(&self, nginx: &Nginx) -> anyhow::Result<u64> {
        let url = format!("http://127.0.0.1:{}/", nginx.status_port);
        let out = cmd::check(
            self.exec(nginx.role, "curl")
                .args(["-sS", "--max-time", "2", &url]),
            COMMAND_TIMEOUT,
        )?;
        // "Active connections: 1 \nserver accepts handled requests\n 5 5 5 \n..."
        out.lines()
            .nth(2)
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected stub_status page: {out:?}"))
    }

    /// `nginx`'s access log so far.
    pub fn nginx_log(&self, nginx: &Nginx) -> String {
        std::fs::read_to_string(nginx.home.join("access.log")).unwrap_or_default()
    }

    /// Writes `tests/py/peers.py` into the lab (once) and returns its path.
    fn peers_py(&mut self) -> anyhow::Result<String> {
        let path = self.dir.join("peers.py");
        if !path.exists() {
            std::fs::write(&path, PEERS_PY)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(path.display().to_string())
    }

    /// Starts `python3 peers.py args` as peer `name` and waits until it prints `ready`.
    pub fn start_python_peer(
        &mut self,
        role: Role,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        self.spawn_python_peer(role, name, args)?;
        self.wait_ready(name)
    }

    /// Starts `python3 peers.py args` as peer `name`, without waiting for it.
    pub fn spawn_python_peer(
        &mut self,
        role: Role,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let script = self.peers_py()?;
        let mut all = vec!["-u", script.as_str()];
        all.extend_from_slice(args);
        self.spawn_peer(role, name, "python3", &all, "TERM")
    }

    /// Runs `python3 peers.py args` in `role`'s namespace to completion; returns its stdout,
    /// failing when it exits non-zero.
    pub fn python(&mut self, role: Role, args: &[&str]) -> anyhow::Result<String> {
        let script = self.peers_py()?;
        let mut all = vec!["-u", script.as_str()];
        all.extend_from_slice(args);
        let out = self.output_in(role, "python3", &all, COMMAND_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "python3 peers.py {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts dnsmasq on [`DNS_IP`] (a second address of the external host) answering only
    /// from `hosts` (a hosts file) with a TTL of one second, and points the pod's resolv.conf
    /// at it. Waits until the pod resolves `probe` to `probe_ip`.
    pub fn start_dnsmasq(
        &mut self,
        hosts: &str,
        probe: &str,
        probe_ip: &str,
    ) -> anyhow::Result<()> {
        self.add_address(Role::External, DNS_IP)?;
        let file = self.dir.join("dns-hosts");
        self.logs.push(file.clone());
        self.write_dns_hosts(hosts)?;
        let addn = format!("--addn-hosts={}", file.display());
        let listen = format!("--listen-address={DNS_IP}");
        self.spawn_peer(
            Role::External,
            "dnsmasq",
            "dnsmasq",
            &[
                "--keep-in-foreground",
                "--pid-file=",
                "--user=root",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &listen,
                "--port=53",
                &addn,
                "--local-ttl=1",
                "--log-queries",
                "--log-facility=-",
            ],
            "TERM",
        )?;
        self.write_pod_etc(
            "resolv.conf",
            &format!("nameserver {DNS_IP}\noptions timeout:1 attempts:2\n"),
        )?;
        self.wait_pod_resolves(probe, probe_ip)
    }

    fn write_dns_hosts(&mut self, hosts: &str) -> anyhow::Result<()> {
        let file = self.dir.join("dns-hosts");
        let staging = self.dir.join(".staging-dns-hosts");
        std::fs::write(&staging, hosts)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&staging, &file)?;
        self.note(format!("dns hosts now: {hosts:?}"));
        Ok(())
    }

    /// Replaces dnsmasq's answers (its hosts file, re-read on SIGHUP).
    pub fn set_dns_hosts(&mut self, hosts: &str) -> anyhow::Result<()> {
        self.write_dns_hosts(hosts)?;
        self.signal_peer("dnsmasq", "HUP")
    }

    /// Polls until the pod's resolver answers `name` with `ip`.
    pub fn wait_pod_resolves(&mut self, name: &str, ip: &str) -> anyhow::Result<()> {
        poll(
            &format!("{name} -> {ip} in the pod"),
            Duration::from_secs(10),
            || {
                let out = cmd::output(
                    self.exec(Role::Pod, "getent").args(["ahostsv4", name]),
                    COMMAND_TIMEOUT,
                )?;
                let text = String::from_utf8_lossy(&out.stdout);
                Ok(text
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(ip))
                    .then_some(()))
            },
        )
    }

    /// Fails unless portcullis's access log gets a line holding every one of `parts`
    /// within 5 s.
    pub fn expect_logged(&mut self, what: &str, parts: &[&str]) -> anyhow::Result<()> {
        poll(what, Duration::from_secs(5), || {
            let log = self.portcullis_output();
            Ok(log
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p)))
                .then_some(()))
        })
        .with_context(|| format!("no access log line with all of {parts:?}"))
    }
}
