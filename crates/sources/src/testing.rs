//! Test doubles shared by the crate's unit tests.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use portcullis_admin::AdminState;
use portcullis_model::ConfigSet;
use portcullis_registry::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Built, Compile, CompileError, Set};

/// Admin state over an empty registry, as `portcullis run` starts.
pub fn admin() -> Arc<AdminState> {
    let mut metrics = prometheus_client::registry::Registry::default();
    let audit = portcullis_audit::Audit::new(
        portcullis_registry::Enforcement::Enforce,
        "default",
        &mut metrics,
    );
    Arc::new(AdminState::new(
        Arc::new(ArcSwap::from_pointee(Snapshot::default())),
        Arc::new(audit),
        metrics,
        Box::new(|_| Ok(())),
        CancellationToken::new(),
        CancellationToken::new(),
    ))
}

/// A STATIC ServiceEntry `default/NAME` for `host`, port 80 (HTTP) on 127.0.0.9.
pub fn service_entry(name: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.9}}]
"
    )
}

/// An empty files set.
pub fn files() -> Set {
    Set::Files(ConfigSet::new())
}

#[derive(Default)]
struct Record {
    fail_next: Option<String>,
    last_sets: usize,
    previous_versions: Vec<u64>,
}

/// A compiler that records what it was given and fails when told to.
#[derive(Clone)]
pub struct Fake {
    record: Arc<Mutex<Record>>,
    builds: Arc<watch::Sender<u64>>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            record: Arc::default(),
            builds: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Fake {
    /// Makes the next build fail with `message`.
    pub fn fail_next(&self, message: &str) {
        self.record.lock().unwrap().fail_next = Some(message.to_string());
    }

    /// Builds that succeeded.
    pub fn builds(&self) -> u64 {
        *self.builds.borrow()
    }

    /// Follows [`builds`](Self::builds).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.builds.subscribe()
    }

    /// How many sets the last build read.
    pub fn last_sets(&self) -> usize {
        self.record.lock().unwrap().last_sets
    }

    /// The version of the snapshot each build was handed as the previous one.
    pub fn previous_versions(&self) -> Vec<u64> {
        self.record.lock().unwrap().previous_versions.clone()
    }
}

impl Compile for Fake {
    fn compile(
        &mut self,
        sets: &[&Set],
        previous: &Snapshot,
        version: u64,
    ) -> Result<Built, CompileError> {
        let mut record = self.record.lock().unwrap();
        record.last_sets = sets.len();
        record.previous_versions.push(previous.version);
        if let Some(message) = record.fail_next.take() {
            return Err(CompileError(message));
        }
        self.builds.send_modify(|n| *n += 1);
        let mut snapshot = Snapshot::default();
        snapshot.version = version;
        Ok(Built {
            snapshot,
            ..Built::default()
        })
    }
}

/// A resolver that never answers.
pub struct NoDns;

impl portcullis_dns::Lookup for NoDns {
    fn lookup(
        &self,
        name: &str,
    ) -> impl std::future::Future<
        Output = Result<(Vec<std::net::IpAddr>, std::time::Duration), portcullis_dns::DnsError>,
    > + Send {
        let name = name.to_string();
        async move {
            Err(portcullis_dns::DnsError::Resolve {
                name,
                message: "no DNS in unit tests".to_string(),
            })
        }
    }
}
