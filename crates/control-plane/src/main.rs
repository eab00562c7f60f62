//! `portcullis-control-plane --listen ADDR --resources DIR`: serves the resources in DIR over
//! ADS, re-read on SIGHUP and whenever DIR changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use notify::Watcher as _;
use portcullis_control_plane::{Any, ControlPlane, Tls, type_url};
use prost::Message as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// A test ADS control plane.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve ADS on (plaintext h2 unless --tls-cert).
    #[arg(long)]
    listen: SocketAddr,
    /// Folder of resources: one file each, the protobuf encoding of a google.protobuf.Any.
    #[arg(long)]
    resources: PathBuf,
    /// Serve TLS with this PEM certificate chain (as istiod's 15012), with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Logs on stderr: stdout carries the one line that tells a script the address.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls {
            cert_pem: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        }),
        _ => None,
    };
    let control_plane = ControlPlane::start(args.listen, tls).await?;
    println!("listening on {}", control_plane.local_addr());

    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes count: reading the folder raises open and close events, which
        // would otherwise start the next reload, and that one the next, without end.
        let changed = event.is_ok_and(|e| {
            matches!(
                e.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Remove(_)
            )
        });
        if changed {
            // A full channel already holds a pending reload.
            let _ = changed_tx.try_send(());
        }
    })?;
    watcher.watch(&args.resources, notify::RecursiveMode::NonRecursive)?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        if let Err(e) = reload(&control_plane, &args.resources) {
            tracing::error!(
                error = format!("{e:#}"),
                "resources not reloaded; serving the previous ones"
            );
        }
        tokio::select! {
            _ = hangup.recv() => {}
            _ = changed.recv() => {}
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    control_plane.stop().await;
    Ok(())
}

/// Makes the folder's resources the whole set served, each type one push.
fn reload(control_plane: &ControlPlane, dir: &Path) -> anyhow::Result<()> {
    let by_type = read_dir(dir)?;
    for type_url in type_url::ALL {
        let resources = by_type.get(type_url).cloned().unwrap_or_default();
        let count = resources.len();
        let version = control_plane.replace(type_url, resources)?;
        tracing::info!(type_url, count, version, "pushed");
    }
    Ok(())
}

fn read_dir(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<Any>>> {
    let mut by_type: BTreeMap<String, Vec<Any>> = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden || !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let any = Any::decode(bytes.as_slice())
            .with_context(|| format!("{} is not an encoded Any", path.display()))?;
        if !type_url::ALL.contains(&any.type_url.as_str()) {
            anyhow::bail!(
                "{} holds a {}, not an xDS resource",
                path.display(),
                any.type_url
            );
        }
        by_type.entry(any.type_url.clone()).or_default().push(any);
    }
    Ok(by_type)
}
