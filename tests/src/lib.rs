//! End-to-end lab for portcullis: Istio's egress lock-down scenario rebuilt in Linux network
//! namespaces, with real nginx peers, real curl clients and the real `portcullis` binary.
//!
//! Every test calls [`run`], which checks for root and the tools, builds a fresh [`Lab`],
//! hands it to the test body and tears everything down afterwards, printing the logs of every
//! process when the body failed.

pub mod cmd;
pub mod curl;
pub mod envoy;
pub mod faults;
pub mod lab;
pub mod preflight;
pub mod scenario;

pub use curl::Reply;
pub use lab::{Certificate, DNS_IP, Lab, Nginx, Role};

use std::io::Write as _;
use std::time::{Duration, Instant};

/// How long a hot reload may take before a test calls it missing.
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

/// Builds a lab, runs `body` in it and cleans up; panics (fails the test) when `body` fails.
///
/// Without root (or without the tools) the test is skipped loudly, unless `CI` is set, where
/// that is a failure.
pub fn run(test: &str, body: impl FnOnce(&mut Lab) -> anyhow::Result<()>) {
    if !can_run(test) {
        return;
    }
    let mut lab = match Lab::new(test) {
        Ok(lab) => lab,
        Err(e) => panic!("{test}: building the lab failed: {e:#}"),
    };
    if let Err(e) = body(&mut lab) {
        lab.dump_logs();
        panic!("{test}: {e:#}");
    }
}

/// Whether the lab can run here: false after printing a loud skip banner (no root or tools,
/// outside CI); panics in CI, where that is a failure.
pub fn can_run(test: &str) -> bool {
    match preflight::check() {
        Ok(preflight::Verdict::Go) => true,
        Ok(preflight::Verdict::Skip(reason)) => {
            // Written to the real stderr rather than with eprintln!, which the test harness
            // captures and hides for a passing test: a skip must be seen.
            let banner = format!("\n!!!!!!!!!! SKIPPED: {test}: {reason} !!!!!!!!!!\n\n");
            let _ = std::io::stderr().write_all(banner.as_bytes());
            false
        }
        Err(e) => panic!("{test}: {e:#}"),
    }
}

/// Calls `probe` until it returns `Ok(Some(value))` or `deadline` passes; the last `Ok(None)`
/// or error explains a timeout.
pub fn poll<T>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
