//! The control plane as a config source: what the ADS client receives is converted and
//! warmed as Envoy does, then handed to the publisher like any other source's set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::service::discovery::v3::Resource as DiscoveryResource;
use portcullis_xds::{Applied, Client, Rejected, Sink, Update, type_url};
use portcullis_xds_resources::XdsState;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Delivery, Publisher, Set, SourceId, Trigger};

/// The xDS client's sink: converts each update into the model, publishes the active set,
/// and says what to NACK and which routes and endpoints to subscribe to.
pub struct XdsSource {
    shared: Arc<Shared>,
}

struct Shared {
    /// Taken by the client's task and the warming timer only, never by the data path.
    state: Mutex<XdsState>,
    publisher: Arc<Publisher>,
    source: SourceId,
    /// Wakes the warming timer when an update may have moved the next deadline.
    updated: Notify,
}

impl Shared {
    /// Publishes what is active now. Blocks for the build, which is why the client runs on
    /// its own thread.
    fn publish(&self, state: &XdsState) {
        let held = Arc::new(state.state().clone());
        let complete = state.initial_set_complete();
        self.publisher.update(self.source, Trigger::Xds, |set| {
            *set = Set::Xds(held);
            Delivery {
                complete,
                changed: true,
                status: None,
            }
        });
    }
}

impl XdsSource {
    /// A source registered with `publisher` as `name`, warming resources at most
    /// `initial_fetch_timeout` when their config source sets none.
    pub fn new(
        name: &str,
        publisher: &Arc<Publisher>,
        initial_fetch_timeout: std::time::Duration,
    ) -> XdsSource {
        let source = publisher.add_source(name, Set::Xds(Arc::default()));
        XdsSource {
            shared: Arc::new(Shared {
                state: Mutex::new(XdsState::new(initial_fetch_timeout)),
                publisher: Arc::clone(publisher),
                source,
                updated: Notify::new(),
            }),
        }
    }

    /// Runs `client` into this source until `stop`, with the timer that ends warming when
    /// a resource's `initial_fetch_timeout` passes. Run it on a runtime of its own: each
    /// update blocks for the build.
    pub async fn run(self, client: Client, stop: CancellationToken) {
        let shared = Arc::clone(&self.shared);
        tokio::select! {
            () = stop.cancelled() => {}
            _ = client.run(self) => {}
            () = warming_timer(shared) => {}
        }
    }
}

/// Promotes warming resources whose `initial_fetch_timeout` passed, and publishes.
async fn warming_timer(shared: Arc<Shared>) {
    loop {
        let deadline = shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_warming_deadline();
        match deadline {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = shared.updated.notified() => continue,
                }
            }
            None => {
                shared.updated.notified().await;
                continue;
            }
        }
        let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.promote() {
            tracing::info!("warming resources timed out waiting for what they need; using them");
            shared.publish(&state);
        }
    }
}

impl Sink for XdsSource {
    fn apply(&mut self, update: Update) -> Applied {
        let added: Vec<DiscoveryResource> = update
            .resources
            .into_iter()
            .map(|r| DiscoveryResource {
                name: r.name,
                version: r.version,
                resource: Some(r.any),
                ..DiscoveryResource::default()
            })
            .collect();
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let applied = state.apply_delta(&update.type_url, &added, &update.removed);
        for r in &applied.rejected {
            tracing::warn!(type_url = %update.type_url, version = %update.version, resource = %r.name, reason = %r.reason, "resource rejected; its previous version stays in use");
        }
        self.shared.publish(&state);
        drop(state);
        self.shared.updated.notify_one();
        Applied {
            rejected: applied
                .rejected
                .into_iter()
                .map(|r| Rejected {
                    name: r.name,
                    reason: r.reason,
                })
                .collect(),
            wants: BTreeMap::from([
                (type_url::ROUTE.to_owned(), applied.routes_needed),
                (type_url::ENDPOINT.to_owned(), applied.endpoints_needed),
            ]),
        }
    }

    fn disconnected(&mut self) {
        tracing::info!("the control plane stream ended; the last applied config keeps serving");
    }
}
