//! The folder source: Istio YAML under a config path, re-read on file events, SIGHUP and a
//! periodic re-scan, each file keeping its last good content.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, EventKind};
use notify::{RecursiveMode, Watcher};
use portcullis_admin::{ConfigStatus, FileStatus};
use portcullis_model::{ConfigSet, Severity, scan};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Delivery, Outcome, Publisher, Set, SourceId, Trigger};

/// How long file events must stop before a reload: an editor's save or a ConfigMap's
/// symlink swap is a burst of events, and wants one reload once it is over.
const SETTLE: Duration = Duration::from_millis(200);

/// The longest a reload waits for file events to stop, so that a file written without
/// pause does not hold back every other change.
const SETTLE_AT_MOST: Duration = Duration::from_secs(1);

/// A config path feeding a [`Publisher`].
pub struct Folder {
    path: PathBuf,
    publisher: Arc<Publisher>,
    source: SourceId,
}

impl Folder {
    /// Registers the config path `path` (a file or a folder) as a source of `publisher`.
    pub fn new(path: PathBuf, publisher: &Arc<Publisher>) -> Self {
        let source = publisher.add_source(
            format!("files {}", path.display()),
            Set::Files(ConfigSet::new()),
        );
        Folder {
            path,
            publisher: Arc::clone(publisher),
            source,
        }
    }

    /// Re-reads the config path and hands what changed to the publisher. Blocks for the
    /// parse and the build: call it off the runtime's worker threads.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let path = &self.path;
        self.publisher.update(self.source, trigger, |set| {
            let Set::Files(files) = set else {
                // Only the folder registered this source, with a set of files.
                return Delivery::default();
            };
            let update = files.update(scan(path));
            let report = update.findings_changed || trigger == Trigger::Start;
            if report {
                for finding in files.findings() {
                    match finding.severity {
                        Severity::Error => {
                            tracing::error!(%finding, "config error; the file keeps its last good content")
                        }
                        Severity::Warning => tracing::warn!(%finding, "config warning"),
                    }
                }
            }
            Delivery {
                complete: files.loaded(),
                changed: update.changed,
                status: (report || update.changed).then(|| status(path, files)),
            }
        })
    }

    /// Reloads on start, file events, SIGHUP and every `rescan` until `stop`.
    pub async fn run(self, rescan: Duration, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<Trigger>(16);
        let _watcher = watch(&self.path, tx.clone());
        // `tx` lives as long as the loop, so `rx` never reports closed.
        tokio::spawn(forward_sighup(tx.clone(), stop.clone()));
        let folder = Arc::new(self);
        let mut trigger = Trigger::Start;
        let mut ticker = tokio::time::interval(rescan);
        ticker.tick().await;
        loop {
            let reloading = Arc::clone(&folder);
            // Parsing and compiling can take a while for large configs: keep it off the
            // runtime's worker threads so the data path never waits on it.
            if let Err(e) = tokio::task::spawn_blocking(move || reloading.reload(trigger)).await {
                tracing::error!(error = %e, "config reload panicked; config watching stopped");
                return;
            }
            let first = tokio::select! {
                () = stop.cancelled() => return,
                t = rx.recv() => t.unwrap_or(Trigger::Periodic),
                _ = ticker.tick() => Trigger::Periodic,
            };
            trigger = match settle(first, &mut rx, &stop).await {
                Some(t) => t,
                None => return,
            };
        }
    }
}

/// What the admin API shows about the config path and its files.
fn status(path: &Path, files: &ConfigSet) -> ConfigStatus {
    let rejected = &files.last_update().rejected;
    ConfigStatus {
        path: path.display().to_string(),
        files: files
            .file_findings()
            .map(|(file, findings)| FileStatus {
                path: file.display().to_string(),
                rejected: rejected.iter().any(|r| r == file)
                    || findings.iter().any(|f| f.severity == Severity::Error),
                findings: findings.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        path_error: files.path_error().map(ToString::to_string),
    }
}

/// Coalesces the triggers that follow `first` into one reload, returning the latest, or
/// `None` once `stop` is cancelled. File events alone wait to settle; any other trigger
/// reloads at once.
async fn settle(
    first: Trigger,
    rx: &mut mpsc::Receiver<Trigger>,
    stop: &CancellationToken,
) -> Option<Trigger> {
    let mut trigger = first;
    let mut settling = first == Trigger::Watch;
    let give_up = Instant::now() + SETTLE_AT_MOST;
    loop {
        let until = if settling {
            (Instant::now() + SETTLE).min(give_up)
        } else {
            Instant::now()
        };
        let next = tokio::select! {
            () = stop.cancelled() => return None,
            next = tokio::time::timeout_at(until, rx.recv()) => next,
        };
        let Ok(Some(t)) = next else {
            return Some(trigger);
        };
        settling &= t == Trigger::Watch;
        trigger = t;
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

/// Sends [`Trigger::Watch`] on `tx` for file events under `path`'s watch root, for as long
/// as the returned watcher lives; `None` when file watching is unavailable.
fn watch(path: &Path, tx: mpsc::Sender<Trigger>) -> Option<notify::RecommendedWatcher> {
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening a file changes nothing, and every reload opens them all: reacting to
        // opens would reload forever.
        if event.is_ok_and(|e| !matches!(e.kind, EventKind::Access(AccessKind::Open(_)))) {
            // A full queue already holds a trigger, which is all a burst needs.
            let _ = tx.try_send(Trigger::Watch);
        }
    });
    match watcher {
        Ok(mut w) => {
            let root = watch_root(path);
            if let Err(e) = w.watch(&root, RecursiveMode::Recursive) {
                tracing::warn!(error = %e, path = %root.display(), "cannot watch the config path; relying on SIGHUP and periodic re-scan");
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; relying on SIGHUP and periodic re-scan");
            None
        }
    }
}

/// Sends [`Trigger::Signal`] on `tx` for every SIGHUP until `stop`.
async fn forward_sighup(tx: mpsc::Sender<Trigger>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() { return; }
                let _ = tx.send(Trigger::Signal).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::testing::{Fake, admin, service_entry};

    /// What the tests write: one ServiceEntry.
    fn service() -> String {
        service_entry("app", "app.internal.com")
    }

    const CLUSTER: &str = "outbound|80||app.internal.com";

    /// A folder source over `path` with the registry's build and no DNS.
    fn folder(path: &Path) -> (Folder, Arc<portcullis_admin::AdminState>) {
        let admin = admin();
        let dns = portcullis_dns::DnsCache::new(
            crate::testing::NoDns,
            portcullis_dns::DnsConfig::default(),
        );
        let compiler = crate::RegistryCompiler::new(Default::default(), dns);
        let publisher = Publisher::new(compiler, Arc::clone(&admin));
        (Folder::new(path.to_path_buf(), &publisher), admin)
    }

    fn endpoint_ports(admin: &portcullis_admin::AdminState) -> Vec<u16> {
        let snapshot = admin.registry.load();
        snapshot
            .cluster(CLUSTER)
            .map(|c| c.endpoints.iter().map(|e| e.port).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_folder_is_published_and_a_bad_change_keeps_the_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        fs::write(&file, service()).unwrap();
        let (folder, admin) = folder(dir.path());

        assert_eq!(folder.reload(Trigger::Start), Outcome::Published(1));
        assert!(admin.is_ready());
        assert_eq!(endpoint_ports(&admin), [80]);
        let status = admin.config.load();
        assert_eq!(status.path, dir.path().display().to_string());
        assert!(status.files.is_empty() && status.path_error.is_none());

        assert_eq!(folder.reload(Trigger::Periodic), Outcome::Unchanged);

        fs::write(&file, service().replace("spec:", "spec: [")).unwrap();
        assert_eq!(folder.reload(Trigger::Watch), Outcome::Unchanged);
        assert_eq!(endpoint_ports(&admin), [80]);
        let status = admin.config.load();
        assert_eq!(status.files.len(), 1);
        assert!(status.files[0].rejected);
        assert!(status.files[0].findings[0].starts_with("Error [YAML]"));

        let ported = service().replace("127.0.0.9}", "127.0.0.9, ports: {http: 8080}}");
        fs::write(&file, ported).unwrap();
        assert_eq!(folder.reload(Trigger::Signal), Outcome::Published(2));
        assert_eq!(endpoint_ports(&admin), [8080]);
        assert!(admin.config.load().files.is_empty());
    }

    #[tokio::test]
    async fn a_missing_path_is_not_ready_until_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let (folder, admin) = folder(&path);

        assert_eq!(folder.reload(Trigger::Start), Outcome::Waiting);
        assert!(!admin.is_ready());
        assert!(admin.config.load().path_error.is_some());

        fs::create_dir(&path).unwrap();
        fs::write(path.join("app.yaml"), service()).unwrap();
        assert_eq!(folder.reload(Trigger::Periodic), Outcome::Published(1));
        assert!(admin.is_ready());
        assert!(admin.config.load().path_error.is_none());
    }

    #[tokio::test]
    async fn a_config_path_that_goes_away_keeps_serving_its_last_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("app.yaml"), service()).unwrap();
        let (folder, admin) = folder(&path);
        assert_eq!(folder.reload(Trigger::Start), Outcome::Published(1));

        fs::remove_dir_all(&path).unwrap();
        assert_eq!(folder.reload(Trigger::Periodic), Outcome::Unchanged);
        assert_eq!(endpoint_ports(&admin), [80]);
        assert!(admin.is_ready());
        assert!(admin.config.load().path_error.is_some());
    }

    #[tokio::test]
    async fn an_empty_folder_is_a_complete_set() {
        let dir = tempfile::tempdir().unwrap();
        let (folder, admin) = folder(dir.path());
        assert_eq!(folder.reload(Trigger::Start), Outcome::Published(1));
        assert!(admin.is_ready());
        assert!(admin.registry.load().services().next().is_none());
    }

    #[tokio::test]
    async fn a_folder_and_a_late_source_are_ready_together() {
        let dir = tempfile::tempdir().unwrap();
        let admin = admin();
        let publisher = Publisher::new(Fake::default(), Arc::clone(&admin));
        let folder = Folder::new(dir.path().to_path_buf(), &publisher);
        let late = publisher.add_source("late", Set::Files(ConfigSet::new()));
        assert_eq!(folder.reload(Trigger::Start), Outcome::Waiting);
        assert!(!admin.is_ready());
        let outcome = publisher.update(late, Trigger::Start, |_| Delivery {
            complete: true,
            ..Delivery::default()
        });
        assert_eq!(outcome, Outcome::Published(1));
        assert!(admin.is_ready());
    }

    #[tokio::test]
    async fn run_reloads_on_a_file_event() {
        let dir = tempfile::tempdir().unwrap();
        let (folder, admin) = folder(dir.path());
        let stop = CancellationToken::new();
        // No periodic re-scan within the test: only the watcher can see the file.
        let task = tokio::spawn(folder.run(Duration::from_secs(3600), stop.clone()));
        let mut waited = 0;
        while !admin.is_ready() {
            assert!(waited < 1000, "the first load never happened");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        fs::write(dir.path().join("app.yaml"), service()).unwrap();
        while endpoint_ports(&admin).is_empty() {
            assert!(waited < 1000, "the new file was never loaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        assert_eq!(admin.registry.load().version, 2);
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn the_watch_root_of_a_file_is_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        fs::write(&file, service()).unwrap();
        assert_eq!(watch_root(dir.path()), dir.path());
        assert_eq!(watch_root(&file), dir.path());
        assert_eq!(watch_root(Path::new("app.yaml")), Path::new("."));
    }

    /// Sends `triggers` on `tx`, each after its delay from the previous one.
    fn send_later(tx: &mpsc::Sender<Trigger>, triggers: &[(u64, Trigger)]) {
        let tx = tx.clone();
        let triggers = triggers.to_vec();
        tokio::spawn(async move {
            for (delay, trigger) in triggers {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                tx.send(trigger).await.unwrap();
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_file_events_is_one_reload_once_it_settles() {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let start = Instant::now();
        send_later(&tx, &[(50, Trigger::Watch), (150, Trigger::Watch)]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), Duration::from_millis(200) + SETTLE);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn file_events_without_pause_reload_at_the_latest_after_the_limit() {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let start = Instant::now();
        send_later(&tx, &[(100, Trigger::Watch); 15]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), SETTLE_AT_MOST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_reloads_at_once_and_ends_settling() {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let start = Instant::now();
        tx.send(Trigger::Watch).await.unwrap();
        assert_eq!(
            settle(Trigger::Signal, &mut rx, &stop).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), Duration::ZERO);

        send_later(&tx, &[(50, Trigger::Signal), (50, Trigger::Watch)]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop).await,
            Some(Trigger::Signal)
        );
        assert_eq!(start.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_settling() {
        let (_tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(settle(Trigger::Watch, &mut rx, &stop).await, None);
    }
}
