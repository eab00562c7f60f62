//! Config loading and hot reload: watch the config path, rebuild the snapshot off the data
//! path, swap it in whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, EventKind};
use notify::{RecursiveMode, Watcher};
use portcullis_admin::{AdminState, ConfigStatus, FileStatus};
use portcullis_dns::DnsCache;
use portcullis_model::Severity;
use portcullis_model::{ConfigSet, scan};
use portcullis_registry::{BuildOptions, Snapshot, build_with_dns};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// The first load.
    Start,
    /// A file system event under the config path.
    Watch,
    /// SIGHUP.
    Signal,
    /// The periodic re-scan that backs up the watcher.
    Periodic,
    /// A DNS answer the registry uses changed.
    Dns,
}

/// The config path, the registry it feeds and the last good content of every file.
pub struct Reloader {
    path: PathBuf,
    options: BuildOptions,
    dns: Arc<DnsCache>,
    set: ConfigSet,
    registry: Arc<ArcSwap<Snapshot>>,
    admin: Arc<AdminState>,
    version: u64,
}

impl Reloader {
    /// A reloader for `path` feeding `registry`.
    pub fn new(
        path: PathBuf,
        options: BuildOptions,
        dns: Arc<DnsCache>,
        registry: Arc<ArcSwap<Snapshot>>,
        admin: Arc<AdminState>,
    ) -> Self {
        Reloader {
            path,
            options,
            dns,
            set: ConfigSet::new(),
            registry,
            admin,
            version: 0,
        }
    }

    /// Re-reads the config path and swaps in a new snapshot if anything changed.
    pub fn reload(&mut self, trigger: Trigger) {
        let update = self.set.update(scan(&self.path));
        if update.findings_changed || matches!(trigger, Trigger::Start) {
            for finding in self.set.findings() {
                match finding.severity {
                    Severity::Error => {
                        tracing::error!(%finding, "config error; the file keeps its last good content")
                    }
                    Severity::Warning => tracing::warn!(%finding, "config warning"),
                }
            }
            self.publish_status();
        }
        if !self.set.loaded() {
            return;
        }
        if update.changed || self.version == 0 || matches!(trigger, Trigger::Dns) {
            self.version += 1;
            let previous = self.registry.load_full();
            let answers = self.dns.answers();
            let lookup = |name: &str| answers.get(name).map(|a| Arc::clone(&a.addrs));
            let snapshot = build_with_dns(
                self.set.resources(),
                &self.options,
                Some(&previous),
                self.version,
                &lookup,
            );
            // New names start resolving now; their answers trigger another build.
            self.dns.set_names(snapshot.dns_names.iter().cloned());
            for warning in &snapshot.warnings {
                tracing::warn!(%warning, "registry");
            }
            tracing::info!(
                version = snapshot.version,
                clusters = snapshot.clusters.len(),
                mode = ?snapshot.outbound_mode(),
                ?trigger,
                "registry updated"
            );
            self.registry.store(Arc::new(snapshot));
            self.publish_status();
        }
        self.admin.set_ready();
    }

    fn publish_status(&self) {
        let rejected = &self.set.last_update().rejected;
        let files = self
            .set
            .file_findings()
            .map(|(path, findings)| FileStatus {
                path: path.display().to_string(),
                rejected: rejected.iter().any(|r| r == path)
                    || findings.iter().any(|f| f.severity == Severity::Error),
                findings: findings.iter().map(ToString::to_string).collect(),
            })
            .collect();
        let path_error = self.set.path_error().map(ToString::to_string);
        self.admin.config.store(Arc::new(ConfigStatus {
            path: self.path.display().to_string(),
            files,
            path_error,
        }));
    }
}

/// Folder to watch: the config folder itself, or a file's parent (a watch on a file dies
/// when a ConfigMap update swaps the `..data` symlink).
fn watch_root(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// How long file events must stop before a reload: an editor's save or a ConfigMap's
/// symlink swap is a burst of events, and wants one reload once it is over.
const SETTLE: Duration = Duration::from_millis(200);

/// The longest a reload waits for file events to stop, so that a file written without
/// pause does not hold back every other change.
const SETTLE_AT_MOST: Duration = Duration::from_secs(1);

/// Runs reloads on file events, SIGHUP and a periodic re-scan until `stop`.
pub async fn run(mut reloader: Reloader, rescan: Duration, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<Trigger>(16);
    let watch_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening a file changes nothing, and every reload opens them all: reacting to
        // opens would reload forever.
        if event.is_ok_and(|e| !matches!(e.kind, EventKind::Access(AccessKind::Open(_)))) {
            // A full queue already holds a trigger, which is all a burst needs.
            let _ = watch_tx.try_send(Trigger::Watch);
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => {
            let root = watch_root(&reloader.path);
            if let Err(e) = w.watch(&root, RecursiveMode::Recursive) {
                tracing::warn!(error = %e, path = %root.display(), "cannot watch the config path; relying on SIGHUP and periodic re-scan");
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; relying on SIGHUP and periodic re-scan");
            None
        }
    };
    let signal_tx = tx.clone();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        loop {
            tokio::select! {
                () = signal_stop.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() { return; }
                    let _ = signal_tx.send(Trigger::Signal).await;
                }
            }
        }
    });
    let dns_tx = tx.clone();
    let mut dns_changes = reloader.dns.subscribe();
    let dns_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = dns_stop.cancelled() => return,
                changed = dns_changes.changed() => {
                    if changed.is_err() { return; }
                    let _ = dns_tx.send(Trigger::Dns).await;
                }
            }
        }
    });
    let mut trigger = Trigger::Start;
    let mut ticker = tokio::time::interval(rescan);
    ticker.tick().await;
    loop {
        // Parsing and compiling can take a while for large configs: keep it off the
        // runtime's worker threads so the data path never waits on it.
        reloader = match tokio::task::spawn_blocking(move || {
            reloader.reload(trigger);
            reloader
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "config reload panicked; config watching stopped");
                return;
            }
        };
        trigger = tokio::select! {
            () = stop.cancelled() => return,
            t = rx.recv() => t.unwrap_or(Trigger::Periodic),
            _ = ticker.tick() => Trigger::Periodic,
        };
        // Coalesce a burst of triggers into one reload. File events alone wait to settle;
        // SIGHUP or a DNS change reloads at once, and a DNS change among them still forces
        // a rebuild.
        let mut settling = matches!(trigger, Trigger::Watch);
        let give_up = tokio::time::Instant::now() + SETTLE_AT_MOST;
        loop {
            let now = tokio::time::Instant::now();
            let until = if settling {
                (now + SETTLE).min(give_up)
            } else {
                now
            };
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = tokio::time::timeout_at(until, rx.recv()) => next,
            };
            let Ok(Some(t)) = next else { break };
            settling &= matches!(t, Trigger::Watch);
            if !matches!(trigger, Trigger::Dns) {
                trigger = t;
            }
        }
    }
}
