//! One ADS stream: what the client subscribed to, what it has, what to send next.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::store::Store;
use crate::{EventKind, Shared, lock, type_url};

/// The response stream of one ADS call.
type Responses<R> = ReceiverStream<Result<R, Status>>;

/// The gRPC service.
#[derive(Debug)]
pub(crate) struct Ads {
    pub(crate) shared: Arc<Shared>,
}

impl Ads {
    /// Numbers the stream and applies the `refuse` knob.
    fn admit<T>(&self, request: &Request<T>) -> Result<(u64, Option<String>), Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let stream = self
            .shared
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if lock(&self.shared.faults).refuse {
            self.shared
                .record(stream, "", EventKind::Refused { authorization });
            return Err(Status::unavailable("the control plane refuses connections"));
        }
        Ok((stream, authorization))
    }

    fn spawn<P: Protocol>(
        &self,
        request: Request<Streaming<P::Req>>,
        state: P,
    ) -> Result<Response<Responses<P::Resp>>, Status> {
        let (stream, authorization) = self.admit(&request)?;
        let (tx, rx) = mpsc::channel(16);
        let context = Context {
            shared: self.shared.clone(),
            stream,
            authorization,
        };
        tokio::spawn(serve(context, request.into_inner(), tx, state));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.spawn(request, Sotw::default())
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.spawn(request, Delta::default())
    }
}

/// Who the stream is, for the log.
struct Context {
    shared: Arc<Shared>,
    stream: u64,
    authorization: Option<String>,
}

/// A response ready to go, with what the log says of it.
struct Outgoing<R> {
    type_url: String,
    nonce: String,
    response: R,
    sent: EventKind,
}

/// What differs between the Delta and the SotW variant of a stream.
trait Protocol: Send + 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: prost::Message + Clone + Send + 'static;
    const DELTA: bool;
    fn node(request: &Self::Req) -> Option<&Node>;
    /// Takes a request in, logging it as a request, ACK, NACK or stale.
    fn on_request(&mut self, log: &mut dyn FnMut(EventKind), request: Self::Req);
    /// The responses the client is owed given the store.
    fn pending(
        &mut self,
        store: &Store,
        nonce: &mut dyn FnMut() -> String,
    ) -> Vec<Outgoing<Self::Resp>>;
}

async fn serve<P: Protocol>(
    context: Context,
    mut inbound: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
    mut state: P,
) {
    let shared = &context.shared;
    let mut changed = shared.changed.subscribe();
    let mut resets = shared.resets.subscribe();
    let mut node_id = String::new();
    let mut connected = false;
    // The last response of each type, kept to replay it for the `stale_nonce` knob.
    let mut last: BTreeMap<String, (P::Resp, String)> = BTreeMap::new();
    let reason = 'stream: loop {
        let silent = lock(&shared.faults).silent;
        if !silent {
            let outgoing = {
                let store = lock(&shared.store);
                state.pending(&store, &mut || shared.nonce())
            };
            for out in outgoing {
                if tx.send(Ok(out.response.clone())).await.is_err() {
                    break 'stream "client gone".to_owned();
                }
                shared.record(context.stream, &node_id, out.sent);
                let replay = lock(&shared.faults).stale_nonce.remove(&out.type_url);
                let previous = last.insert(out.type_url.clone(), (out.response, out.nonce));
                match (replay, previous) {
                    (true, Some((old, nonce))) => {
                        if tx.send(Ok(old)).await.is_err() {
                            break 'stream "client gone".to_owned();
                        }
                        let type_url = out.type_url;
                        shared.record(
                            context.stream,
                            &node_id,
                            EventKind::Replayed { type_url, nonce },
                        );
                    }
                    (true, None) => {
                        lock(&shared.faults).stale_nonce.insert(out.type_url);
                    }
                    (false, Some(old)) => {
                        // Freeing a mesh-sized response takes milliseconds; on this task it
                        // would hold back the response just queued until it is done.
                        tokio::task::spawn_blocking(move || drop(old));
                    }
                    (false, None) => {}
                }
            }
        }
        tokio::select! {
            biased;
            _ = resets.changed() => {
                let _ = tx.send(Err(Status::unavailable("stream reset by the control plane"))).await;
                break "reset by the control plane".to_owned();
            }
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if !connected {
                        connected = true;
                        let node = P::node(&request).cloned().map(Box::new);
                        node_id = node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
                        shared.record(context.stream, &node_id, EventKind::Connected {
                            delta: P::DELTA,
                            authorization: context.authorization.clone(),
                            node,
                        });
                    }
                    state.on_request(&mut |kind| shared.record(context.stream, &node_id, kind), request);
                }
                Ok(None) => break "the client closed the stream".to_owned(),
                Err(status) => break format!("the stream failed: {status}"),
            },
            _ = changed.changed() => {}
        }
    };
    shared.record(context.stream, &node_id, EventKind::Closed { reason });
}

/// An ACK, or a NACK when the request carries an error.
fn verdict(
    type_url: String,
    version: String,
    nonce: String,
    error: Option<RpcStatus>,
) -> EventKind {
    match error {
        Some(error) => EventKind::Nack {
            type_url,
            version,
            nonce,
            error,
        },
        None => EventKind::Ack {
            type_url,
            version,
            nonce,
        },
    }
}

/// A State-of-the-World subscription of one type.
#[derive(Debug, Default)]
struct SotwWatch {
    /// `None`: wildcard.
    names: Option<BTreeSet<String>>,
    nonce: String,
    /// Store version and names of the last response.
    sent: Option<(String, Option<BTreeSet<String>>)>,
}

#[derive(Debug, Default)]
struct Sotw {
    watches: BTreeMap<String, SotwWatch>,
}

impl Protocol for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const DELTA: bool = false;

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(&mut self, log: &mut dyn FnMut(EventKind), request: DiscoveryRequest) {
        let type_url = request.type_url;
        let nonce = request.response_nonce;
        let latest = self.watches.get(&type_url).map(|w| w.nonce.as_str());
        if !nonce.is_empty() && latest != Some(nonce.as_str()) {
            log(EventKind::Stale { type_url, nonce });
            return;
        }
        let watch = self.watches.entry(type_url.clone()).or_default();
        log(EventKind::Request {
            type_url: type_url.clone(),
            names: request.resource_names.clone(),
            unsubscribe: Vec::new(),
            initial_resource_versions: BTreeMap::new(),
        });
        if !nonce.is_empty() {
            let version = request.version_info;
            log(verdict(
                type_url.clone(),
                version,
                nonce,
                request.error_detail,
            ));
        }
        watch.names = if type_url::is_wildcard(&type_url) && request.resource_names.is_empty() {
            None
        } else {
            Some(request.resource_names.into_iter().collect())
        };
    }

    fn pending(
        &mut self,
        store: &Store,
        nonce: &mut dyn FnMut() -> String,
    ) -> Vec<Outgoing<DiscoveryResponse>> {
        let mut out = Vec::new();
        for (type_url, watch) in &mut self.watches {
            let version = store.version(type_url);
            let now = Some((version.clone(), watch.names.clone()));
            if watch.sent == now {
                continue;
            }
            let mut names = Vec::new();
            let mut resources = Vec::new();
            if let Some(ts) = store.get(type_url) {
                for (name, entry) in &ts.resources {
                    if watch.names.as_ref().is_none_or(|n| n.contains(name)) {
                        names.push(name.clone());
                        resources.push(entry.any.clone());
                    }
                }
            }
            let nonce = nonce();
            watch.nonce = nonce.clone();
            watch.sent = now;
            out.push(Outgoing {
                type_url: type_url.clone(),
                nonce: nonce.clone(),
                response: DiscoveryResponse {
                    version_info: version.clone(),
                    resources,
                    type_url: type_url.clone(),
                    nonce: nonce.clone(),
                    ..DiscoveryResponse::default()
                },
                sent: EventKind::Sent {
                    type_url: type_url.clone(),
                    version,
                    nonce,
                    names,
                    removed: Vec::new(),
                },
            });
        }
        out
    }
}

/// A Delta subscription of one type.
#[derive(Debug, Default)]
struct DeltaWatch {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Name and version of what the client holds.
    has: BTreeMap<String, String>,
    nonce: String,
    /// Store version of the response `nonce` belongs to.
    nonce_version: String,
    /// A first request is answered even when there is nothing to send.
    must_answer: bool,
    /// The store version of the type this watch was last answered from: later changes are
    /// what it may lack.
    synced: u64,
    /// Everything held is to be compared (a first request, or a wildcard subscribed).
    full: bool,
    /// Names subscribed (again) since the last answer, compared one by one.
    check: BTreeSet<String>,
}

impl DeltaWatch {
    fn covers(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

#[derive(Debug, Default)]
struct Delta {
    watches: BTreeMap<String, DeltaWatch>,
}

impl Protocol for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const DELTA: bool = true;

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(&mut self, log: &mut dyn FnMut(EventKind), request: DeltaDiscoveryRequest) {
        let type_url = request.type_url;
        let first = !self.watches.contains_key(&type_url);
        let watch = self.watches.entry(type_url.clone()).or_default();
        let nonce = request.response_nonce;
        if first || !request.resource_names_subscribe.is_empty() {
            log(EventKind::Request {
                type_url: type_url.clone(),
                names: request.resource_names_subscribe.clone(),
                unsubscribe: request.resource_names_unsubscribe.clone(),
                initial_resource_versions: request
                    .initial_resource_versions
                    .clone()
                    .into_iter()
                    .collect(),
            });
        } else if !request.resource_names_unsubscribe.is_empty() {
            log(EventKind::Request {
                type_url: type_url.clone(),
                names: Vec::new(),
                unsubscribe: request.resource_names_unsubscribe.clone(),
                initial_resource_versions: BTreeMap::new(),
            });
        }
        if first {
            watch.wildcard =
                type_url::is_wildcard(&type_url) && request.resource_names_subscribe.is_empty();
            watch.has = request.initial_resource_versions.into_iter().collect();
            watch.must_answer = true;
            watch.full = true;
        }
        for name in request.resource_names_subscribe {
            if name == "*" {
                watch.wildcard = true;
                watch.full = true;
            } else {
                if !first {
                    watch.has.remove(&name);
                }
                watch.check.insert(name.clone());
                watch.names.insert(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                watch.wildcard = false;
            } else {
                watch.has.remove(&name);
                watch.names.remove(&name);
            }
        }
        // Subscription changes count even on a stale request; its ACK does not.
        if nonce.is_empty() {
            return;
        }
        if nonce != watch.nonce {
            log(EventKind::Stale { type_url, nonce });
            return;
        }
        let version = watch.nonce_version.clone();
        log(verdict(type_url, version, nonce, request.error_detail));
    }

    fn pending(
        &mut self,
        store: &Store,
        nonce: &mut dyn FnMut() -> String,
    ) -> Vec<Outgoing<DeltaDiscoveryResponse>> {
        let mut out = Vec::new();
        for (type_url, watch) in &mut self.watches {
            let mut resources = Vec::new();
            let mut removed = Vec::new();
            let ts = store.get(type_url);
            let names: Vec<String> = if std::mem::take(&mut watch.full) {
                // Everything held, and everything the client says it has.
                let all: BTreeSet<&String> = ts
                    .into_iter()
                    .flat_map(|ts| ts.resources.keys())
                    .chain(watch.has.keys())
                    .collect();
                all.into_iter().cloned().collect()
            } else {
                // What changed since the last answer, and what was subscribed since.
                let mut since: BTreeSet<&String> = watch.check.iter().collect();
                if let Some(ts) = ts {
                    since.extend(ts.changes.range(watch.synced + 1..).flat_map(|(_, n)| n));
                }
                since.into_iter().cloned().collect()
            };
            for name in names {
                if !watch.covers(&name) {
                    continue;
                }
                match ts.and_then(|ts| ts.resources.get(&name)) {
                    Some(entry) if watch.has.get(&name) != Some(&entry.version) => {
                        resources.push(Resource {
                            version: entry.version.clone(),
                            resource: Some(entry.any.clone()),
                            name,
                            ..Resource::default()
                        });
                    }
                    None if watch.has.contains_key(&name) => removed.push(name),
                    _ => {}
                }
            }
            watch.check.clear();
            watch.synced = ts.map_or(0, |ts| ts.seq);
            if resources.is_empty() && removed.is_empty() && !watch.must_answer {
                continue;
            }
            watch.must_answer = false;
            for r in &resources {
                watch.has.insert(r.name.clone(), r.version.clone());
            }
            for name in &removed {
                watch.has.remove(name);
            }
            let version = store.version(type_url);
            let nonce = nonce();
            watch.nonce = nonce.clone();
            watch.nonce_version = version.clone();
            let names = resources.iter().map(|r| r.name.clone()).collect();
            out.push(Outgoing {
                type_url: type_url.clone(),
                nonce: nonce.clone(),
                response: DeltaDiscoveryResponse {
                    system_version_info: version.clone(),
                    resources,
                    type_url: type_url.clone(),
                    removed_resources: removed.clone(),
                    nonce: nonce.clone(),
                    ..DeltaDiscoveryResponse::default()
                },
                sent: EventKind::Sent {
                    type_url: type_url.clone(),
                    version,
                    nonce,
                    names,
                    removed,
                },
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Any;

    fn store_with(names: &[&str]) -> Store {
        let mut store = Store::default();
        let resources = names
            .iter()
            .map(|n| {
                let any = Any {
                    type_url: type_url::ENDPOINT.to_owned(),
                    value: n.as_bytes().to_vec(),
                };
                ((*n).to_owned(), any)
            })
            .collect();
        store.upsert(type_url::ENDPOINT, resources);
        store
    }

    fn counter() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("n{n}")
        }
    }

    #[test]
    fn sotw_answers_named_resources_and_ignores_stale_nonces() {
        let store = store_with(&["a", "b"]);
        let mut sotw = Sotw::default();
        let mut events = Vec::new();
        let mut nonce = counter();
        let request = |names: &[&str], nonce: &str| DiscoveryRequest {
            type_url: type_url::ENDPOINT.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            response_nonce: nonce.to_owned(),
            ..DiscoveryRequest::default()
        };
        sotw.on_request(&mut |e| events.push(e), request(&["stale"], "n9"));
        assert!(matches!(&events[0], EventKind::Stale { .. }));
        assert!(
            sotw.pending(&store, &mut nonce).is_empty(),
            "a stale request subscribes nothing"
        );

        sotw.on_request(&mut |e| events.push(e), request(&["a"], ""));
        let sent = sotw.pending(&store, &mut nonce);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].response.resources.len(), 1, "only the named one");
        assert!(
            sotw.pending(&store, &mut nonce).is_empty(),
            "nothing new to send"
        );

        // An old nonce with new names is ignored; the latest nonce with them is taken.
        sotw.on_request(&mut |e| events.push(e), request(&["a", "b"], "n0"));
        assert!(sotw.pending(&store, &mut nonce).is_empty());
        sotw.on_request(&mut |e| events.push(e), request(&["a", "b"], "n1"));
        assert!(matches!(events.last(), Some(EventKind::Ack { .. })));
        assert_eq!(
            sotw.pending(&store, &mut nonce)[0].response.resources.len(),
            2
        );
    }

    #[test]
    fn delta_sends_what_the_client_lacks_and_removals() {
        let mut store = store_with(&["a", "b"]);
        let mut delta = Delta::default();
        let mut events = Vec::new();
        let mut nonce = counter();
        let version_of_a = store.get(type_url::ENDPOINT).unwrap().resources["a"]
            .version
            .clone();
        delta.on_request(
            &mut |e| events.push(e),
            DeltaDiscoveryRequest {
                type_url: type_url::ENDPOINT.to_owned(),
                resource_names_subscribe: vec!["a".into(), "b".into(), "c".into()],
                initial_resource_versions: [
                    ("a".to_owned(), version_of_a),
                    ("c".to_owned(), "old".to_owned()),
                ]
                .into(),
                ..DeltaDiscoveryRequest::default()
            },
        );
        let sent = delta.pending(&store, &mut nonce);
        let names: Vec<_> = sent[0].response.resources.iter().map(|r| &r.name).collect();
        assert_eq!(names, ["b"], "a is current at the client");
        assert_eq!(sent[0].response.removed_resources, ["c"]);

        store.remove(type_url::ENDPOINT, &["a"]);
        let sent = delta.pending(&store, &mut nonce);
        assert_eq!(sent[0].response.removed_resources, ["a"]);
        assert!(sent[0].response.resources.is_empty());
    }
}
