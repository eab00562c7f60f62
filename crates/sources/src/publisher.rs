//! The publisher: the one place that turns what the config sources hold into the data
//! path's snapshot, swaps it in, and reports status and readiness.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use portcullis_admin::{AdminState, ConfigResources, ConfigStatus};
use portcullis_envoy::state::SourceState;
use portcullis_model::ConfigSet;
use portcullis_registry::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a build was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A source's first load.
    Start,
    /// A file system event under the config path.
    Watch,
    /// SIGHUP.
    Signal,
    /// The periodic re-scan that backs up the watcher.
    Periodic,
    /// A DNS answer the snapshot uses changed.
    Dns,
    /// The control plane sent resources, or a warming one timed out.
    Xds,
}

/// What one source holds: its current set, kept by the publisher so that a build reads
/// every source's set in place, without a copy. One variant per kind of source.
// A publisher holds one set per source, two at most: boxing the files' set would save
// nothing worth an indirection on every build.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Set {
    /// Istio and Kubernetes resources from a config path: every file's last good content.
    Files(ConfigSet),
    /// Envoy resources from a control plane: active, warming and rejected versions.
    Xds(Arc<SourceState>),
}

/// What a source's update did to its set.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Whether the set is complete, so that the source counts for readiness; a source that
    /// was complete once stays counted.
    pub complete: bool,
    /// Whether the set differs from the one the last build read.
    pub changed: bool,
    /// The source's status for the admin API, when it may have changed.
    pub status: Option<ConfigStatus>,
}

/// Why a build produced no snapshot; the snapshot in use stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(pub String);

/// What one build produced.
#[derive(Debug, Default)]
pub struct Built {
    /// The data path's snapshot.
    pub snapshot: Snapshot,
    /// The sources' resources in Envoy's model, for `/config_dump`: shared, not copied, when
    /// a control plane holds them all; the snapshot's own when files do.
    pub resources: ConfigResources,
}

/// Compiles the sources' sets into a data-path snapshot.
pub trait Compile: Send {
    /// Snapshot `version` from `sets` (one per source, in the order they were added),
    /// carrying per-endpoint state over from `previous`.
    fn compile(
        &mut self,
        sets: &[&Set],
        previous: &Snapshot,
        version: u64,
    ) -> Result<Built, CompileError>;
}

/// What an update or a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new snapshot of this version serves.
    Published(u64),
    /// Nothing changed that a build reads.
    Unchanged,
    /// Some source has not delivered its first complete set yet.
    Waiting,
    /// The build failed; the snapshot in use, its version and readiness stay. The set keeps
    /// what the delivery made of it: a source that must not build on rejected content
    /// checks its input before taking it into its set, as the files' set does per file.
    Rejected(CompileError),
    /// An earlier update panicked while holding the sets, so nothing is published any
    /// more; or the source is not this publisher's.
    Stopped,
}

/// A source registered with [`Publisher::add_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceId(usize);

struct Slot {
    name: Box<str>,
    set: Set,
    complete: bool,
}

struct State {
    compiler: Box<dyn Compile>,
    sources: Vec<Slot>,
    /// Version of the snapshot in use; 0 until the first is published.
    version: u64,
}

/// Takes the sources' sets, builds snapshots off the data path and swaps them into the one
/// store the data path reads; reports config status and readiness to the admin server.
///
/// Updates are serialised on a lock that only sources and rebuilds take, never the data
/// path or the admin server, which read the stores.
pub struct Publisher {
    state: Mutex<State>,
    registry: Arc<ArcSwap<Snapshot>>,
    admin: Arc<AdminState>,
}

impl Publisher {
    /// A publisher with no sources, swapping snapshots into `admin.registry`.
    pub fn new(compiler: impl Compile + 'static, admin: Arc<AdminState>) -> Arc<Self> {
        Arc::new(Publisher {
            state: Mutex::new(State {
                compiler: Box::new(compiler),
                sources: Vec::new(),
                version: 0,
            }),
            registry: Arc::clone(&admin.registry),
            admin,
        })
    }

    /// Registers a source holding `set`. Every source is registered before any delivers:
    /// readiness waits for each one's first complete set.
    pub fn add_source(&self, name: impl Into<Box<str>>, set: Set) -> SourceId {
        // Adding a slot reads nothing an earlier panic may have left half-written.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sources.push(Slot {
            name: name.into(),
            set,
            complete: false,
        });
        SourceId(state.sources.len() - 1)
    }

    /// Lets `source` update its set in place with `deliver`, then builds and swaps in a new
    /// snapshot if the set changed or none has been published yet, once every source has
    /// delivered. Blocks for the build: call it off the runtime's worker threads.
    pub fn update(
        &self,
        source: SourceId,
        trigger: Trigger,
        deliver: impl FnOnce(&mut Set) -> Delivery,
    ) -> Outcome {
        let Some(mut state) = self.lock() else {
            return Outcome::Stopped;
        };
        let Some(slot) = state.sources.get_mut(source.0) else {
            return Outcome::Stopped;
        };
        let delivery = deliver(&mut slot.set);
        if delivery.complete && !slot.complete {
            slot.complete = true;
            tracing::debug!(source = %slot.name, "config source delivered its first complete set");
        }
        let outcome = if delivery.changed || state.version == 0 {
            self.build(&mut state, trigger)
        } else {
            Outcome::Unchanged
        };
        if let Some(status) = delivery.status {
            self.admin.config.store(Arc::new(status));
        }
        outcome
    }

    /// Builds and swaps in a new snapshot from the sets as they are, for a change outside
    /// them (a DNS answer); nothing until every source has delivered.
    pub fn rebuild(&self, trigger: Trigger) -> Outcome {
        match self.lock() {
            Some(mut state) => self.build(&mut state, trigger),
            None => Outcome::Stopped,
        }
    }

    /// Version of the snapshot in use; 0 until the first is published.
    pub fn version(&self) -> u64 {
        self.lock().map_or(0, |s| s.version)
    }

    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.lock() {
            Ok(state) => Some(state),
            Err(_) => {
                // The sets may be half-updated: publishing from them could serve a config
                // no source ever held, so the last published snapshot keeps serving.
                tracing::error!(
                    "a config update panicked earlier; config updates stopped, the last applied config keeps serving"
                );
                None
            }
        }
    }

    fn build(&self, state: &mut State, trigger: Trigger) -> Outcome {
        let State {
            compiler,
            sources,
            version,
        } = state;
        if let Some(waiting) = sources.iter().find(|s| !s.complete) {
            tracing::debug!(source = %waiting.name, ?trigger, "not publishing: a config source has not delivered yet");
            return Outcome::Waiting;
        }
        let sets: Vec<&Set> = sources.iter().map(|s| &s.set).collect();
        let previous = self.registry.load_full();
        let next = *version + 1;
        match compiler.compile(&sets, &previous, next) {
            Ok(Built {
                snapshot,
                resources,
            }) => {
                tracing::info!(
                    version = snapshot.version,
                    clusters = snapshot.clusters.len(),
                    mode = ?snapshot.outbound_mode(),
                    ?trigger,
                    "registry updated"
                );
                self.registry.store(Arc::new(snapshot));
                self.admin.resources.store(Arc::new(resources));
                *version = next;
                self.admin.set_ready();
                Outcome::Published(next)
            }
            Err(e) => {
                tracing::error!(error = %e, ?trigger, version = *version, "config not applied; the last applied config keeps serving");
                Outcome::Rejected(e)
            }
        }
    }
}

/// Rebuilds on every change `changes` signals (DNS answers the snapshot uses) until `stop`.
/// Changes that arrive during a build are folded into the next one.
pub async fn rebuild_on(
    publisher: Arc<Publisher>,
    mut changes: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let publisher = Arc::clone(&publisher);
        // A build can take a while for large configs: keep it off the worker threads.
        if let Err(e) = tokio::task::spawn_blocking(move || publisher.rebuild(Trigger::Dns)).await {
            tracing::error!(error = %e, "config rebuild panicked; rebuilds on DNS changes stopped");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fake, admin, files};

    fn delivered(complete: bool, changed: bool) -> impl FnOnce(&mut Set) -> Delivery {
        move |_| Delivery {
            complete,
            changed,
            status: None,
        }
    }

    #[test]
    fn ready_only_once_every_source_has_delivered() {
        let admin = admin();
        let fake = Fake::default();
        let publisher = Publisher::new(fake.clone(), Arc::clone(&admin));
        let early = publisher.add_source("early", files());
        let late = publisher.add_source("late", files());

        let outcome = publisher.update(early, Trigger::Start, delivered(true, true));
        assert_eq!(outcome, Outcome::Waiting);
        assert!(!admin.is_ready());
        assert_eq!(fake.builds(), 0);
        assert_eq!(admin.registry.load().version, 0);

        // The late source's first set is complete but reports no change: the first build
        // still happens, as nothing has been published yet.
        let outcome = publisher.update(late, Trigger::Start, delivered(true, false));
        assert_eq!(outcome, Outcome::Published(1));
        assert!(admin.is_ready());
        assert_eq!(fake.last_sets(), 2);
        assert_eq!(admin.registry.load().version, 1);
    }

    #[test]
    fn an_incomplete_set_does_not_count_for_readiness() {
        let admin = admin();
        let publisher = Publisher::new(Fake::default(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        assert_eq!(
            publisher.update(source, Trigger::Start, delivered(false, false)),
            Outcome::Waiting
        );
        assert_eq!(publisher.rebuild(Trigger::Dns), Outcome::Waiting);
        assert!(!admin.is_ready());
        assert_eq!(
            publisher.update(source, Trigger::Periodic, delivered(true, true)),
            Outcome::Published(1)
        );
        assert!(admin.is_ready());
    }

    #[test]
    fn versions_increase_with_each_build_and_only_then() {
        let admin = admin();
        let fake = Fake::default();
        let publisher = Publisher::new(fake.clone(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        assert_eq!(
            publisher.update(source, Trigger::Start, delivered(true, true)),
            Outcome::Published(1)
        );
        assert_eq!(
            publisher.update(source, Trigger::Periodic, delivered(true, false)),
            Outcome::Unchanged
        );
        assert_eq!(fake.builds(), 1);
        assert_eq!(
            publisher.update(source, Trigger::Watch, delivered(true, true)),
            Outcome::Published(2)
        );
        assert_eq!(publisher.rebuild(Trigger::Dns), Outcome::Published(3));
        assert_eq!(publisher.version(), 3);
        assert_eq!(admin.registry.load().version, 3);
    }

    #[test]
    fn a_failed_build_changes_nothing() {
        let admin = admin();
        let fake = Fake::default();
        let publisher = Publisher::new(fake.clone(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        publisher.update(source, Trigger::Start, delivered(true, true));
        let before = admin.registry.load_full();

        fake.fail_next("cluster foo: no endpoints");
        let outcome = publisher.update(source, Trigger::Watch, delivered(true, true));
        assert_eq!(
            outcome,
            Outcome::Rejected(CompileError("cluster foo: no endpoints".into()))
        );
        assert!(Arc::ptr_eq(&before, &admin.registry.load_full()));
        assert_eq!(publisher.version(), 1);
        assert!(admin.is_ready());

        // The version the failed build would have had is the next one published.
        assert_eq!(
            publisher.update(source, Trigger::Watch, delivered(true, true)),
            Outcome::Published(2)
        );
        // Each build carries state over from the snapshot in use.
        assert_eq!(fake.previous_versions(), vec![0, 1, 1]);
    }

    #[test]
    fn a_failed_first_build_is_not_ready() {
        let admin = admin();
        let fake = Fake::default();
        let publisher = Publisher::new(fake.clone(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        fake.fail_next("bad");
        assert!(matches!(
            publisher.update(source, Trigger::Start, delivered(true, true)),
            Outcome::Rejected(_)
        ));
        assert!(!admin.is_ready());
        // Unchanged, yet built: nothing serves until a build succeeds.
        assert_eq!(
            publisher.update(source, Trigger::Periodic, delivered(true, false)),
            Outcome::Published(1)
        );
        assert!(admin.is_ready());
    }

    #[test]
    fn status_is_reported_when_a_source_has_one() {
        let admin = admin();
        let publisher = Publisher::new(Fake::default(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        publisher.update(source, Trigger::Start, |_| Delivery {
            complete: false,
            changed: false,
            status: Some(ConfigStatus {
                path: "/etc/portcullis".into(),
                path_error: Some("no such file".into()),
                ..ConfigStatus::default()
            }),
        });
        // Reported before any build: the admin API says why the proxy is not ready.
        assert_eq!(
            admin.config.load().path_error.as_deref(),
            Some("no such file")
        );
        publisher.update(source, Trigger::Watch, |_| Delivery {
            complete: true,
            changed: true,
            status: Some(ConfigStatus {
                path: "/etc/portcullis".into(),
                ..ConfigStatus::default()
            }),
        });
        assert_eq!(admin.config.load().path_error, None);
        // No status in a delivery keeps the one reported.
        publisher.update(source, Trigger::Periodic, delivered(true, false));
        assert_eq!(admin.config.load().path, "/etc/portcullis");
    }

    #[test]
    fn never_ready_while_draining() {
        let admin = admin();
        let publisher = Publisher::new(Fake::default(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        publisher.update(source, Trigger::Start, delivered(true, true));
        assert!(admin.is_ready());
        admin.drain.cancel();
        assert!(!admin.is_ready());
        assert_eq!(
            publisher.update(source, Trigger::Watch, delivered(true, true)),
            Outcome::Published(2)
        );
        assert!(!admin.is_ready());
    }

    #[test]
    fn a_panicking_update_stops_publishing_and_keeps_the_snapshot() {
        let admin = admin();
        let publisher = Publisher::new(Fake::default(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        publisher.update(source, Trigger::Start, delivered(true, true));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            publisher.update(source, Trigger::Watch, |_| panic!("half-updated set"))
        }));
        assert!(panicked.is_err());
        assert_eq!(
            publisher.update(source, Trigger::Watch, delivered(true, true)),
            Outcome::Stopped
        );
        assert_eq!(publisher.rebuild(Trigger::Dns), Outcome::Stopped);
        assert_eq!(admin.registry.load().version, 1);
    }

    #[tokio::test]
    async fn changes_signalled_trigger_rebuilds() {
        let admin = admin();
        let fake = Fake::default();
        let publisher = Publisher::new(fake.clone(), Arc::clone(&admin));
        let source = publisher.add_source("files", files());
        publisher.update(source, Trigger::Start, delivered(true, true));
        let (changes, receiver) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(rebuild_on(Arc::clone(&publisher), receiver, stop.clone()));

        let mut builds = fake.subscribe();
        changes.send_replace(1);
        // The fake counts a build before the publisher stores it; the publisher's lock,
        // held across both, orders the checks after the store.
        builds.wait_for(|n| *n == 2).await.unwrap();
        assert_eq!(publisher.version(), 2);
        assert_eq!(admin.registry.load().version, 2);
        changes.send_replace(2);
        builds.wait_for(|n| *n == 3).await.unwrap();
        assert_eq!(publisher.version(), 3);
        assert_eq!(admin.registry.load().version, 3);

        stop.cancel();
        task.await.unwrap();
    }
}
