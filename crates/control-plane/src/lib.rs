//! A small ADS server (Delta and State of the World) for tests and for feeding real Envoy.
//!
//! It holds a versioned set of resources per type, answers each stream as a correct control
//! plane does (only subscribed names for EDS/RDS, nonces respected, stale requests ignored),
//! logs what every node sent, and has fault knobs: reset streams, replay a stale nonce, go
//! silent, refuse connections.

pub mod ca;
pub mod resources;
pub mod sidecar;
mod store;
mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use envoy_types::pb::google::protobuf::Any;
pub use portcullis_xds::type_url;

use store::Store;

/// Why the server could not start or a push was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding or listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS identity is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
    /// A pushed resource has no readable name.
    #[error("resource {index} of {type_url} has no readable name: {reason}")]
    Unnamed {
        /// The type pushed.
        type_url: String,
        /// Position in the push.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// A server certificate and key, PEM.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key.
    pub key_pem: Vec<u8>,
}

/// One thing a stream did, as the tests see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When (tokio's clock, so paused-clock tests can measure backoff).
    pub at: tokio::time::Instant,
    /// Which stream; streams are numbered from 1 in order of arrival.
    pub stream: u64,
    /// The node id of the stream's first request; empty before it.
    pub node_id: String,
    /// What happened.
    pub kind: EventKind,
}

/// What a stream did.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A stream was refused (the `refuse` knob).
    Refused {
        /// Its `authorization` header.
        authorization: Option<String>,
    },
    /// A stream's first request arrived.
    Connected {
        /// Delta or SotW.
        delta: bool,
        /// Its `authorization` header.
        authorization: Option<String>,
        /// The node of the first request.
        node: Option<Box<Node>>,
    },
    /// A request that is not a stale one.
    Request {
        /// Its type.
        type_url: String,
        /// SotW `resource_names` or Delta `resource_names_subscribe`.
        names: Vec<String>,
        /// Delta `resource_names_unsubscribe`.
        unsubscribe: Vec<String>,
        /// Delta `initial_resource_versions`.
        initial_resource_versions: BTreeMap<String, String>,
    },
    /// A request acknowledging the latest response.
    Ack {
        /// Its type.
        type_url: String,
        /// SotW: the `version_info` sent back; Delta: the acknowledged response's version.
        version: String,
        /// The acknowledged nonce.
        nonce: String,
    },
    /// A request rejecting the latest response.
    Nack {
        /// Its type.
        type_url: String,
        /// SotW: the `version_info` the client keeps; Delta: the rejected response's version.
        version: String,
        /// The rejected nonce.
        nonce: String,
        /// The client's `error_detail`.
        error: RpcStatus,
    },
    /// A request carrying a nonce that is not the latest; ignored.
    Stale {
        /// Its type.
        type_url: String,
        /// The old nonce.
        nonce: String,
    },
    /// A response sent.
    Sent {
        /// Its type.
        type_url: String,
        /// `version_info` / `system_version_info`.
        version: String,
        /// Its nonce.
        nonce: String,
        /// The resources in it.
        names: Vec<String>,
        /// Delta `removed_resources`.
        removed: Vec<String>,
    },
    /// An earlier response sent again with its old nonce (the `stale_nonce` knob).
    Replayed {
        /// Its type.
        type_url: String,
        /// The old nonce.
        nonce: String,
    },
    /// The stream ended.
    Closed {
        /// Why.
        reason: String,
    },
}

/// Fault knobs.
#[derive(Debug, Default)]
struct Faults {
    refuse: bool,
    silent: bool,
    /// Types whose next response is followed by a replay of the one before it.
    stale_nonce: std::collections::BTreeSet<String>,
}

/// State shared by the handle and every stream.
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Event>>,
    /// Bumped on each push and knob change: streams recompute what to send.
    changed: watch::Sender<u64>,
    /// Bumped to end every open stream.
    resets: watch::Sender<u64>,
    /// Bumped on each log entry.
    logged: watch::Sender<u64>,
    next_stream: std::sync::atomic::AtomicU64,
    next_nonce: std::sync::atomic::AtomicU64,
    /// The CA served next to ADS, once a test enables it.
    ca: Arc<Mutex<Option<Arc<ca::TestCa>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data, still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn record(&self, stream: u64, node_id: &str, kind: EventKind) {
        match &kind {
            EventKind::Sent { .. } | EventKind::Request { .. } => {
                tracing::debug!(stream, node_id, ?kind, "control plane event");
            }
            _ => tracing::info!(stream, node_id, ?kind, "control plane event"),
        }
        lock(&self.log).push(Event {
            at: tokio::time::Instant::now(),
            stream,
            node_id: node_id.to_owned(),
            kind,
        });
        self.logged.send_modify(|n| *n += 1);
    }

    fn nonce(&self) -> String {
        let n = self
            .next_nonce
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("n{}", n + 1)
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A running control plane. Dropping it stops the server.
#[derive(Debug)]
pub struct ControlPlane {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: Option<Tls>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ControlPlane {
    /// Listens on `addr` (port 0 picks one), plaintext h2 or TLS, and serves ADS.
    pub async fn start(addr: SocketAddr, tls: Option<Tls>) -> Result<Self, Error> {
        Self::start_with(addr, tls, Arc::new(Shared::new())).await
    }

    /// Like [`ControlPlane::start`], but listening inside the named network namespace
    /// (`ip netns add NAME`; root only), so that a proxy in a test's namespace reaches it
    /// while the pushes and the log stay in this process.
    pub async fn start_in_netns(
        netns: &str,
        addr: SocketAddr,
        tls: Option<Tls>,
    ) -> Result<Self, Error> {
        let listener =
            listen_in_netns(netns, addr).map_err(|source| Error::Listen { addr, source })?;
        Self::start_on(listener, tls, Arc::new(Shared::new())).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<Tls>,
        shared: Arc<Shared>,
    ) -> Result<Self, Error> {
        let listen = |source| Error::Listen { addr, source };
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(listen)?;
        // A restarted control plane takes its old port back at once.
        socket.set_reuseaddr(true).map_err(listen)?;
        socket.bind(addr).map_err(listen)?;
        let listener = socket.listen(1024).map_err(listen)?;
        Self::start_on(listener.into_std().map_err(listen)?, tls, shared).await
    }

    async fn start_on(
        listener: std::net::TcpListener,
        tls: Option<Tls>,
        shared: Arc<Shared>,
    ) -> Result<Self, Error> {
        let unknown: SocketAddr = ([0, 0, 0, 0], 0).into();
        let addr = listener.local_addr().unwrap_or(unknown);
        let listen = |source| Error::Listen { addr, source };
        listener.set_nonblocking(true).map_err(listen)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen)?;
        let local = addr;
        let mut builder = Server::builder();
        if let Some(tls) = &tls {
            builder = builder.tls_config(
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
            )?;
        }
        let service = AggregatedDiscoveryServiceServer::from_arc(Arc::new(stream::Ads {
            shared: shared.clone(),
        }))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let ca = ca::CaService(Arc::clone(&shared.ca));
        let task = tokio::spawn(
            builder
                .add_service(service)
                .add_service(ca)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                }),
        );
        tracing::info!(addr = %local, "control plane listening");
        Ok(Self {
            shared,
            addr: local,
            tls,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    /// Serves `ca` as istiod's `IstioCertificateService` on the same port.
    pub fn serve_ca(&self, ca: Arc<ca::TestCa>) {
        *lock(&self.shared.ca) = Some(ca);
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds or replaces resources (named by their first field); returns the new version.
    pub fn push(&self, type_url: &str, resources: Vec<Any>) -> Result<String, Error> {
        let named = name_all(type_url, resources)?;
        Ok(self.push_named(type_url, named))
    }

    /// Adds or replaces resources under the given names, whatever their bytes are.
    pub fn push_named(&self, type_url: &str, resources: Vec<(String, Any)>) -> String {
        let version = lock(&self.shared.store).upsert(type_url, resources);
        self.shared.touch();
        version
    }

    /// Makes `resources` the whole set of the type; unchanged ones keep their version.
    pub fn replace(&self, type_url: &str, resources: Vec<Any>) -> Result<String, Error> {
        let named = name_all(type_url, resources)?;
        let version = lock(&self.shared.store).replace(type_url, named);
        self.shared.touch();
        Ok(version)
    }

    /// Removes resources by name; returns the new version.
    pub fn remove(&self, type_url: &str, names: &[&str]) -> String {
        let version = lock(&self.shared.store).remove(type_url, names);
        self.shared.touch();
        version
    }

    /// The current version of a type (empty before its first push).
    pub fn version(&self, type_url: &str) -> String {
        lock(&self.shared.store).version(type_url)
    }

    /// Ends every open stream with `UNAVAILABLE`, as a control plane restarting does.
    pub fn reset_streams(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// Refuses (or accepts again) new streams with `UNAVAILABLE`.
    pub fn refuse_connections(&self, refuse: bool) {
        lock(&self.shared.faults).refuse = refuse;
    }

    /// Stops sending responses (requests are still read and logged), or resumes.
    pub fn set_silent(&self, silent: bool) {
        lock(&self.shared.faults).silent = silent;
        self.shared.touch();
    }

    /// The next response of the type is followed by the response before it, old nonce and all.
    pub fn send_stale_nonce(&self, type_url: &str) {
        lock(&self.shared.faults)
            .stale_nonce
            .insert(type_url.to_owned());
    }

    /// A copy of the log.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.shared.log).clone()
    }

    /// Waits until `check` finds what it looks for in the log, and returns it.
    pub async fn wait_for<T>(&self, mut check: impl FnMut(&[Event]) -> Option<T>) -> T {
        let mut logged = self.shared.logged.subscribe();
        loop {
            if let Some(found) = check(&lock(&self.shared.log)) {
                return found;
            }
            // The sender lives as long as `self`.
            let _ = logged.changed().await;
        }
    }

    /// Waits until `node_id` has ACKed responses of `type_url`, sent at or after `since`,
    /// that together carried every one of `names`; returns when the last of those ACKs
    /// arrived. A NACK of such a response is an error carrying the client's message.
    pub async fn wait_acked(
        &self,
        node_id: &str,
        type_url: &str,
        names: &BTreeSet<String>,
        since: tokio::time::Instant,
    ) -> Result<tokio::time::Instant, Nacked> {
        self.wait_for(|events| acked(events, node_id, type_url, names, since))
            .await
    }

    /// Stops listening and ends every stream; the resources and log go with it.
    pub async fn stop(mut self) {
        self.halt();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops, then listens again on the same address with the same resources and log,
    /// as a control plane process that restarts.
    pub async fn restart(mut self) -> Result<Self, Error> {
        self.halt();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        lock(&self.shared.faults).refuse = false;
        Self::start_with(self.addr, self.tls.clone(), self.shared.clone()).await
    }

    fn halt(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            lock(&self.shared.faults).refuse = true;
            self.reset_streams();
            let _ = shutdown.send(());
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.halt();
    }
}

impl Shared {
    fn new() -> Self {
        Self {
            store: Mutex::new(Store::default()),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            resets: watch::channel(0).0,
            logged: watch::channel(0).0,
            next_stream: std::sync::atomic::AtomicU64::new(0),
            next_nonce: std::sync::atomic::AtomicU64::new(0),
            ca: Arc::new(Mutex::new(None)),
        }
    }
}

/// A client rejected a push (see [`ControlPlane::wait_acked`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{type_url} version {version} NACKed: {message}")]
pub struct Nacked {
    /// The type.
    pub type_url: String,
    /// The version the NACK names.
    pub version: String,
    /// The client's `error_detail` message.
    pub message: String,
}

/// Whether the log shows `names` of `type_url` sent to `node_id` since `since` and ACKed:
/// `Some(Ok(time of the last ACK needed))`, `Some(Err)` on a NACK of one of those
/// responses, `None` while waiting.
fn acked(
    events: &[Event],
    node_id: &str,
    type_url: &str,
    names: &BTreeSet<String>,
    since: tokio::time::Instant,
) -> Option<Result<tokio::time::Instant, Nacked>> {
    // The names each response carried, by nonce, until its ACK.
    let mut sent: BTreeMap<&str, &[String]> = BTreeMap::new();
    let mut covered: BTreeSet<&str> = BTreeSet::new();
    let mut last = since;
    for event in events
        .iter()
        .filter(|e| e.at >= since && e.node_id == node_id)
    {
        match &event.kind {
            EventKind::Sent {
                type_url: t,
                nonce,
                names: carried,
                ..
            } if t == type_url => {
                sent.insert(nonce, carried);
            }
            EventKind::Ack {
                type_url: t, nonce, ..
            } if t == type_url => {
                if let Some(carried) = sent.remove(nonce.as_str()) {
                    let before = covered.len();
                    covered.extend(
                        carried
                            .iter()
                            .map(String::as_str)
                            .filter(|n| names.contains(*n)),
                    );
                    if covered.len() > before {
                        last = event.at;
                    }
                    if covered.len() == names.len() {
                        return Some(Ok(last));
                    }
                }
            }
            EventKind::Nack {
                type_url: t,
                version,
                nonce,
                error,
            } if t == type_url && sent.contains_key(nonce.as_str()) => {
                return Some(Err(Nacked {
                    type_url: t.clone(),
                    version: version.clone(),
                    message: error.message.clone(),
                }));
            }
            _ => {}
        }
    }
    None
}

/// Binds a TCP listener inside the network namespace `/run/netns/NAME`: a short-lived thread
/// enters it (the namespace is per thread), and the socket stays in it for good.
fn listen_in_netns(netns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let path = std::path::Path::new("/run/netns").join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use std::os::fd::AsFd as _;
                let ns = std::fs::File::open(&path)?;
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                std::net::TcpListener::bind(addr)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the netns thread panicked")))
    })
}

fn name_all(type_url: &str, resources: Vec<Any>) -> Result<Vec<(String, Any)>, Error> {
    resources
        .into_iter()
        .enumerate()
        .map(|(index, any)| match portcullis_xds::resource_name(&any) {
            Ok(name) if !name.is_empty() => Ok((name, any)),
            Ok(_) => Err(Error::Unnamed {
                type_url: type_url.to_owned(),
                index,
                reason: "empty name".to_owned(),
            }),
            Err(e) => Err(Error::Unnamed {
                type_url: type_url.to_owned(),
                index,
                reason: e.to_string(),
            }),
        })
        .collect()
}
