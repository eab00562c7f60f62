//! Whether this machine can run the lab: root, the tools, and the binaries under test.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Commands the lab runs; all must be on `PATH`.
pub const TOOLS: &[&str] = &[
    "ip",
    "nginx",
    "curl",
    "iptables",
    "iptables-restore",
    "ip6tables-restore",
    "setpriv",
    "kill",
    "openssl",
    "dnsmasq",
    "nghttp",
    "h2load",
    "python3",
    "sha256sum",
    "getent",
    "wrk",
];

/// What a test should do on this machine.
#[derive(Debug)]
pub enum Verdict {
    /// Everything is in place.
    Go,
    /// The lab cannot run here and this is not CI: skip with this reason.
    Skip(String),
}

/// Checks root and tools; outside CI their absence is a skip, in CI (`CI` set) an error.
pub fn check() -> anyhow::Result<Verdict> {
    let mut missing = Vec::new();
    if !is_root()? {
        missing.push("needs root (network namespaces, iptables, setpriv)".to_owned());
    }
    let tools: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if !tools.is_empty() {
        missing.push(format!(
            "missing tools: {} (scripts/test.sh installs them)",
            tools.join(", ")
        ));
    }
    if missing.is_empty() {
        return Ok(Verdict::Go);
    }
    let reason = missing.join("; ");
    if std::env::var_os("CI").is_some() {
        bail!("CI is set, so this is a failure, not a skip: {reason}");
    }
    Ok(Verdict::Skip(reason))
}

fn is_root() -> anyhow::Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid: line in /proc/self/status")?;
    // Fields: real, effective, saved, filesystem; the effective uid decides privileges.
    Ok(uid_line.split_whitespace().nth(2) == Some("0"))
}

/// The full path of `tool` on `PATH`, if any.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The directory of the build profile this test executable belongs to (`target/<profile>`).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // Test executables live in target/<profile>/deps/; the binaries one level up.
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no target/<profile> ancestor", exe.display()))
}

/// The `portcullis` binary under test: `$PORTCULLIS_BIN`, else `target/<profile>/portcullis`.
pub fn portcullis_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PORTCULLIS_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("PORTCULLIS_BIN={} does not exist", bin.display());
        }
        return Ok(bin);
    }
    let dir = profile_dir()?;
    let bin = dir.join("portcullis");
    if !bin.is_file() {
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        bail!(
            "the portcullis binary is not at {}: build it first with \
             `cargo build{release} -p portcullis` (or point PORTCULLIS_BIN at one)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The test control plane (`portcullis-control-plane`): `$CONTROL_PLANE_BIN`, else the one
/// built next to the portcullis binary under test.
pub fn control_plane_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CONTROL_PLANE_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("CONTROL_PLANE_BIN={} does not exist", bin.display());
        }
        return Ok(bin);
    }
    let dir = profile_dir()?;
    let bin = dir.join("portcullis-control-plane");
    if !bin.is_file() {
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        bail!(
            "the control plane binary is not at {}: build it first with \
             `cargo build{release} -p portcullis-control-plane` (or point CONTROL_PLANE_BIN at \
             one)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The lab's own TCP helper (`pce2e-net`), which Cargo builds next to the test executables.
pub fn net_tool_bin() -> anyhow::Result<PathBuf> {
    let bin = profile_dir()?.join("pce2e-net");
    if !bin.is_file() {
        bail!(
            "the lab helper is not at {}: build it with `cargo build -p portcullis-e2e` in the \
             same profile as the tests",
            bin.display()
        );
    }
    Ok(bin)
}
