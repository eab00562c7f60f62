//! The folder source: Istio YAML under a config path, re-read on file events, SIGHUP and a
//! periodic re-scan, each file keeping its last good content.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use portcullis_admin::{ConfigStatus, FileStatus};
use portcullis_model::{ConfigSet, Severity, scan};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Delivery, Outcome, Publisher, Set, SourceId, Trigger};

/// How long file events must stop before a reload while a file written to is still open:
/// its writer may not be done, and a half-written file must not be read as the new config.
const SETTLE: Duration = Duration::from_millis(200);

/// How long file events must stop before a reload once every file written to is closed
/// (or none was written, as when a file is renamed into place): a ConfigMap's symlink swap
/// or an editor's save is a burst of events microseconds apart, and wants one reload.
const QUIET: Duration = Duration::from_millis(10);

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
        let writing = Arc::new(AtomicBool::new(false));
        let _watcher = watch(&self.path, tx.clone(), Arc::clone(&writing));
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
            trigger = match settle(first, &mut rx, &stop, &writing).await {
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
/// `None` once `stop` is cancelled. File events alone wait to settle: [`SETTLE`] while
/// `writing` says a file written to is still open, else [`QUIET`]; any other trigger
/// reloads at once.
async fn settle(
    first: Trigger,
    rx: &mut mpsc::Receiver<Trigger>,
    stop: &CancellationToken,
    writing: &AtomicBool,
) -> Option<Trigger> {
    let mut trigger = first;
    let mut settling = first == Trigger::Watch;
    let give_up = Instant::now() + SETTLE_AT_MOST;
    loop {
        let was_writing = writing.load(Ordering::Acquire);
        let until = if settling {
            let wait = if was_writing { SETTLE } else { QUIET };
            (Instant::now() + wait).min(give_up)
        } else {
            Instant::now()
        };
        let next = tokio::select! {
            () = stop.cancelled() => return None,
            next = tokio::time::timeout_at(until, rx.recv()) => next,
        };
        match next {
            Ok(Some(t)) => {
                settling &= t == Trigger::Watch;
                trigger = t;
            }
            // A write began while waiting the short delay, its event lost to a full queue:
            // the long one applies.
            Err(_) if settling && !was_writing && writing.load(Ordering::Acquire) => {}
            _ => return Some(trigger),
        }
    }
}

/// The files under the watch root that were written to and not closed since, as file
/// events tell: while any is open, its writer may not be done.
#[derive(Debug, Default)]
struct Writes {
    open: HashSet<PathBuf>,
}

impl Writes {
    /// Takes `event` into account; whether some file is still being written after it.
    fn see(&mut self, event: &notify::Event) -> bool {
        if event.need_rescan() {
            // Events were lost: which files are open is unknown until they are written
            // again, and this burst waits as if one were.
            self.open.clear();
            return true;
        }
        match event.kind {
            EventKind::Modify(ModifyKind::Data(_)) => {
                self.open.extend(event.paths.iter().cloned());
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Remove(_) => {
                for path in &event.paths {
                    self.open.remove(path);
                }
            }
            // A file renamed away is read under its new name, if at all; its writer's later
            // writes and close report that name.
            EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::Both)) => {
                if let Some(from) = event.paths.first() {
                    self.open.remove(from);
                }
            }
            _ => {}
        }
        !self.open.is_empty()
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
/// as the returned watcher lives, keeping `writing` set while a file written to is open;
/// `None` when file watching is unavailable.
fn watch(
    path: &Path,
    tx: mpsc::Sender<Trigger>,
    writing: Arc<AtomicBool>,
) -> Option<notify::RecommendedWatcher> {
    let mut writes = Writes::default();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        // Opening a file changes nothing, and every reload opens them all: reacting to
        // opens would reload forever.
        if matches!(event.kind, EventKind::Access(AccessKind::Open(_))) {
            return;
        }
        // Stored before the trigger is sent, so the loop reads it when it wakes.
        writing.store(writes.see(&event), Ordering::Release);
        // A full queue already holds a trigger, which is all a burst needs.
        let _ = tx.try_send(Trigger::Watch);
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
        let writing = AtomicBool::new(true);
        let start = Instant::now();
        send_later(&tx, &[(50, Trigger::Watch), (150, Trigger::Watch)]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop, &writing).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), Duration::from_millis(200) + SETTLE);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn file_events_without_pause_reload_at_the_latest_after_the_limit() {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let writing = AtomicBool::new(true);
        let start = Instant::now();
        send_later(&tx, &[(100, Trigger::Watch); 15]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop, &writing).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), SETTLE_AT_MOST);
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_written_file_closed_a_burst_reloads_after_a_short_quiet() {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let writing = AtomicBool::new(false);
        let start = Instant::now();
        send_later(&tx, &[(2, Trigger::Watch), (3, Trigger::Watch)]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop, &writing).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), Duration::from_millis(5) + QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_seen_during_the_short_quiet_waits_the_long_one() {
        let (_tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let writing = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        // The write's own trigger is lost, as to a full queue: only the flag tells.
        let flag = Arc::clone(&writing);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            flag.store(true, Ordering::Release);
        });
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop, &writing).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), QUIET + SETTLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_reloads_at_once_and_ends_settling() {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let writing = AtomicBool::new(true);
        let start = Instant::now();
        tx.send(Trigger::Watch).await.unwrap();
        assert_eq!(
            settle(Trigger::Signal, &mut rx, &stop, &writing).await,
            Some(Trigger::Watch)
        );
        assert_eq!(start.elapsed(), Duration::ZERO);

        send_later(&tx, &[(50, Trigger::Signal), (50, Trigger::Watch)]);
        assert_eq!(
            settle(Trigger::Watch, &mut rx, &stop, &writing).await,
            Some(Trigger::Signal)
        );
        assert_eq!(start.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_settling() {
        let (_tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        stop.cancel();
        let writing = AtomicBool::new(false);
        assert_eq!(settle(Trigger::Watch, &mut rx, &stop, &writing).await, None);
    }

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths.iter().fold(notify::Event::new(kind), |e, p| {
            e.add_path(PathBuf::from(p))
        })
    }

    #[test]
    fn a_file_is_being_written_from_its_first_write_until_it_is_closed_or_gone() {
        use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};
        let written = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let mut writes = Writes::default();
        // Written in place: created, written, closed.
        assert!(!writes.see(&event(EventKind::Create(CreateKind::File), &["/c/a.yaml"])));
        assert!(writes.see(&event(written, &["/c/a.yaml"])));
        assert!(writes.see(&event(written, &["/c/b.yaml"])));
        assert!(writes.see(&event(closed, &["/c/a.yaml"])));
        assert!(!writes.see(&event(closed, &["/c/b.yaml"])));
        // Written beside and renamed into place: done once closed, the rename only says so.
        assert!(writes.see(&event(written, &["/c/a.staging"])));
        assert!(!writes.see(&event(closed, &["/c/a.staging"])));
        let metadata = EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any));
        assert!(!writes.see(&event(metadata, &["/c/a.staging"])));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(!writes.see(&event(both, &["/c/a.staging", "/c/a.yaml"])));
        // A file removed or renamed away while open is no longer waited for.
        assert!(writes.see(&event(written, &["/c/x.yaml"])));
        let gone = EventKind::Remove(RemoveKind::File);
        assert!(!writes.see(&event(gone, &["/c/x.yaml"])));
        assert!(writes.see(&event(written, &["/c/y.yaml"])));
        let from = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert!(!writes.see(&event(from, &["/c/y.yaml"])));
        // Lost events: this burst waits long, and what was open is forgotten.
        assert!(writes.see(&event(written, &["/c/z.yaml"])));
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(writes.see(&overflow));
        assert!(!writes.see(&event(metadata, &["/c/a.yaml"])));
    }
}
