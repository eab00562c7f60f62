//! Helpers of the fault, reload and drain tests: signals to the running portcullis, its exit,
//! clients running in the background (curl, wrk) and an upstream that never answers.

use std::process::{Command, ExitStatus, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::cmd;
use crate::lab::{Lab, Role};
use crate::poll;

/// Upper bound for a background client; each also has its own, shorter, limit.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The id of the portcullis process running in the pod (found among the namespace's
/// processes by its name, since `ip netns exec` and `setpriv` exec it in place).
pub fn portcullis_pid(lab: &Lab) -> anyhow::Result<u32> {
    let ns = lab.ns(Role::Pod);
    let pids = cmd::check(
        Command::new("ip").args(["netns", "pids", &ns]),
        Duration::from_secs(10),
    )?;
    let found: Vec<u32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "portcullis")
        })
        .collect();
    match found.as_slice() {
        [pid] => Ok(*pid),
        other => bail!("expected one portcullis in {ns}, found {other:?}"),
    }
}

/// Sends `signal` (`TERM`, `HUP`) to the running portcullis.
pub fn signal_portcullis(lab: &mut Lab, signal: &str) -> anyhow::Result<()> {
    let pid = portcullis_pid(lab)?;
    cmd::signal(pid, signal);
    Ok(())
}

/// Waits up to `deadline` for portcullis to exit; its exit status as printed
/// (`exit status: 0`), and how long that took.
pub fn wait_portcullis_exit(
    lab: &mut Lab,
    deadline: Duration,
) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let status = poll("portcullis to exit", deadline, || {
        Ok(lab.expect_running().err().map(|e| {
            let e = format!("{e:#}");
            // `portcullis exited (<status>)`
            e.strip_prefix("portcullis exited (")
                .and_then(|s| s.strip_suffix(')'))
                .map_or_else(|| e.clone(), str::to_owned)
        }))
    })?;
    Ok((status, start.elapsed()))
}

/// A command running on a thread; join it for its output.
pub struct Background {
    what: String,
    thread: JoinHandle<anyhow::Result<Output>>,
}

impl Background {
    /// Starts `program args` in `role`'s namespace on a thread.
    pub fn start(lab: &mut Lab, role: Role, program: &str, args: &[&str]) -> Background {
        let what = format!("{program} {args:?} in {role:?}");
        lab.note(format!("started in the background: {what}"));
        let mut command = lab.exec(role, program);
        command.args(args);
        let thread = std::thread::spawn(move || cmd::output(&mut command, CLIENT_TIMEOUT));
        Background { what, thread }
    }

    /// Waits for the command; its exit status and stdout.
    pub fn join(self, lab: &mut Lab) -> anyhow::Result<(ExitStatus, String)> {
        let out = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the thread running {} panicked", self.what))??;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        lab.note(format!(
            "{} -> {}\nstdout: {}\nstderr: {}",
            self.what,
            out.status,
            cmd::tail(&stdout, 30),
            cmd::tail(&String::from_utf8_lossy(&out.stderr), 30)
        ));
        Ok((out.status, stdout))
    }
}

/// curl in the pod (so redirected to portcullis) in the background, printing
/// `<status> <bytes downloaded>`, the body thrown away.
pub fn curl_in_background(lab: &mut Lab, url: &str, max_time: u64) -> Background {
    let max_time = max_time.to_string();
    Background::start(
        lab,
        Role::Pod,
        "curl",
        &[
            "-sS",
            "--max-time",
            &max_time,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            url,
        ],
    )
}

/// What a background curl of [`curl_in_background`] got: its exit code, status and size.
pub fn curl_result(lab: &mut Lab, curl: Background) -> anyhow::Result<(i32, u16, u64)> {
    let (status, out) = curl.join(lab)?;
    let mut fields = out.split_whitespace();
    let code = fields.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let size = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status.code().unwrap_or(-1), code, size))
}

/// wrk's summary of a run.
#[derive(Debug, Clone)]
pub struct WrkSummary {
    /// Requests completed.
    pub requests: u64,
    /// The `Socket errors: ...` line, when wrk printed one.
    pub socket_errors: Option<String>,
    /// Responses other than 2xx/3xx.
    pub non_2xx: u64,
    /// wrk's whole output.
    pub output: String,
}

impl WrkSummary {
    /// Parses wrk's text output.
    pub fn parse(output: &str) -> anyhow::Result<WrkSummary> {
        let requests = output
            .lines()
            .find_map(|l| {
                let (n, rest) = l.trim().split_once(' ')?;
                rest.starts_with("requests in").then(|| n.parse().ok())?
            })
            .with_context(|| format!("no `N requests in` line in wrk's output:\n{output}"))?;
        let socket_errors = output
            .lines()
            .find(|l| l.trim().starts_with("Socket errors:"))
            .map(|l| l.trim().to_owned());
        let non_2xx = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .map_or(Ok(0), |n| n.trim().parse())?;
        Ok(WrkSummary {
            requests,
            socket_errors,
            non_2xx,
            output: output.to_owned(),
        })
    }
}

/// Starts `wrk` in the pod against `url` for `seconds` with `connections`.
pub fn wrk_in_background(lab: &mut Lab, url: &str, seconds: u64, connections: u32) -> Background {
    let duration = format!("{seconds}s");
    let connections = connections.to_string();
    Background::start(
        lab,
        Role::Pod,
        "wrk",
        &[
            "-t2",
            "-c",
            &connections,
            "-d",
            &duration,
            "--timeout",
            "5s",
            url,
        ],
    )
}

/// Waits for a wrk run and parses its summary.
pub fn wrk_result(lab: &mut Lab, wrk: Background) -> anyhow::Result<WrkSummary> {
    let (status, out) = wrk.join(lab)?;
    ensure!(status.success(), "wrk failed ({status}): {out}");
    WrkSummary::parse(&out)
}

/// Starts, as peer `name` in `role`, a TCP server on `addr:port` that accepts connections
/// and never sends a byte (an upstream that stalls); returns once it listens.
pub fn start_silent_server(
    lab: &mut Lab,
    role: Role,
    name: &str,
    addr: &str,
    port: u16,
) -> anyhow::Result<()> {
    let script = format!(
        "import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('{addr}', {port}))
s.listen(64)
print('ready', flush=True)
held = []
while True:
    held.append(s.accept())
"
    );
    lab.spawn_peer(role, name, "python3", &["-u", "-c", &script], "KILL")?;
    poll(
        &format!("{name} listening"),
        Duration::from_secs(10),
        || {
            Ok(lab
                .peer_stdout(name)?
                .lines()
                .any(|l| l == "ready")
                .then_some(()))
        },
    )
}

/// Whether `wrk` is installed; the fault tests that need it fail without it under `CI`.
pub fn have_wrk() -> anyhow::Result<bool> {
    if crate::preflight::which("wrk").is_some() {
        return Ok(true);
    }
    ensure!(
        std::env::var_os("CI").is_none(),
        "CI is set and wrk is missing (scripts/test.sh installs it)"
    );
    Ok(false)
}
