//! Running commands with deadlines, and long-running processes that are always stopped.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Runs `cmd` to completion, capturing its output; kills it if it outlives `timeout`.
pub fn output(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Runs `cmd` and fails unless it exits 0; returns its stdout.
pub fn check(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = output(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends `signal` (a name such as `TERM`) to one process by its id.
pub fn signal(pid: u32, signal: &str) {
    // std can only SIGKILL its own children; `kill` sends the polite signals. A process that
    // is already gone is fine here, so the outcome is ignored.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A background process started by the lab, its output going to files; stopped on drop.
#[derive(Debug)]
pub struct Proc {
    /// Short name used in logs.
    pub name: String,
    child: Child,
    /// File receiving the process's stdout.
    pub stdout: PathBuf,
    /// File receiving the process's stderr.
    pub stderr: PathBuf,
    stop_signal: &'static str,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr sent to `<dir>/<name>.stdout` and `.stderr`.
    ///
    /// `stop_signal` is what asks it to quit (nginx's master takes its workers down on `TERM`).
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        stop_signal: &'static str,
    ) -> anyhow::Result<Proc> {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            stop_signal,
        })
    }

    /// The process id (`ip netns exec` and `setpriv` exec, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the process to quit, then kills it if it is still there after a few seconds.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        signal(self.pid(), self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stdout and stderr so far, for failure reports.
    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"));
        format!(
            "----- {} stdout ({}) -----\n{}\n----- {} stderr ({}) -----\n{}",
            self.name,
            self.stdout.display(),
            tail(&read(&self.stdout), 300),
            self.name,
            self.stderr.display(),
            tail(&read(&self.stderr), 300)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of `text`, marking the cut.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    if all.len() <= lines {
        return text.to_owned();
    }
    format!(
        "[... {} earlier lines cut ...]\n{}",
        all.len() - lines,
        all[all.len() - lines..].join("\n")
    )
}
