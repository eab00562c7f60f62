//! The ADS stream: connect as istio-agent does, subscribe, ACK/NACK, reconnect.

use std::collections::{BTreeMap, HashSet, VecDeque};

use imbl::ordset::DiffItem;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as WrappedResource,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, error, info, warn};

use crate::stats::{XdsStats, bump};
use crate::{
    Any, Applied, Backoff, EnvelopeError, Names, NodeIdentity, Resource, Sink, Update,
    resource_name, type_url,
};

/// Where istio-agent reads the projected service-account token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
/// istio-agent accepts messages up to this size from istiod (a full push of a large mesh).
const MAX_MESSAGE_SIZE: usize = i32::MAX as usize;
/// How many nonces of a type the client remembers to recognise a replayed response.
const REMEMBERED_NONCES: usize = 64;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Which ADS variant the stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// `DeltaAggregatedResources` (istiod's preferred).
    #[default]
    Delta,
    /// `StreamAggregatedResources`.
    StateOfTheWorld,
}

/// How to reach the control plane and who to say we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` (plaintext h2) or `https://host:port` (TLS).
    pub address: String,
    /// PEM roots that verify an `https` control plane (Istio's `istio-ca-root-cert`).
    pub root_cert: Option<PathBuf>,
    /// The service-account token sent as a bearer, re-read on each connect.
    pub token_file: PathBuf,
    /// The node presented on each stream.
    pub node: NodeIdentity,
    /// Delta or State of the World.
    pub protocol: Protocol,
    /// TCP connect timeout (Istio's `xds-grpc` cluster uses 1 s).
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// A Delta client of `address` with istio-agent's defaults.
    pub fn new(address: impl Into<String>, node: NodeIdentity) -> Self {
        Self {
            address: address.into(),
            root_cert: None,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            node,
            protocol: Protocol::Delta,
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// Why a stream could not start or ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not `http://host:port` or `https://host:port`.
    #[error("invalid xDS address {address:?}: {reason}")]
    Address {
        /// As given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The root certificate could not be read.
    #[error("cannot read the xDS root certificate {path}: {source}")]
    RootCert {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A TLS connection needs the token, and it could not be read.
    #[error("cannot read the xDS token {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The stream failed or the control plane ended it with a status.
    #[error("stream ended: {0}")]
    Status(#[from] tonic::Status),
    /// The control plane closed the stream without a status.
    #[error("the control plane closed the stream")]
    Closed,
}

/// What the client keeps of one type URL, across streams and within one.
#[derive(Debug)]
struct TypeState {
    type_url: &'static str,
    /// `version_info` of the last accepted SotW response.
    accepted_version: String,
    /// Name and version of each resource the sink holds.
    held: BTreeMap<String, String>,
    /// EDS/RDS names the sink needs.
    wants: Names,
    /// This stream has requested the type.
    requested: bool,
    /// Names this stream has subscribed to.
    subscribed: Names,
    /// This stream's latest response nonce.
    nonce: String,
    /// This stream's recent nonces, to recognise a replayed response.
    seen: VecDeque<String>,
}

impl TypeState {
    fn new(type_url: &'static str) -> Self {
        Self {
            type_url,
            accepted_version: String::new(),
            held: BTreeMap::new(),
            wants: Names::new(),
            requested: false,
            subscribed: Names::new(),
            nonce: String::new(),
            seen: VecDeque::new(),
        }
    }

    fn wildcard(&self) -> bool {
        type_url::is_wildcard(self.type_url)
    }

    /// Whether the type is to be requested: always for CDS/LDS, for EDS/RDS once named.
    fn active(&self) -> bool {
        self.wildcard() || !self.wants.is_empty() || !self.subscribed.is_empty()
    }

    fn start_stream(&mut self) {
        self.requested = false;
        self.subscribed.clear();
        self.nonce.clear();
        self.seen.clear();
    }

    /// Records the nonce; false if this stream already saw it (a replayed, stale response).
    fn fresh_nonce(&mut self, nonce: &str) -> bool {
        if !nonce.is_empty() && self.seen.iter().any(|n| n == nonce) {
            return false;
        }
        if self.seen.len() == REMEMBERED_NONCES {
            self.seen.pop_front();
        }
        self.seen.push_back(nonce.to_owned());
        self.nonce = nonce.to_owned();
        true
    }

    /// Names to send in a request: none for a wildcard type.
    fn names(&self) -> Vec<String> {
        if self.wildcard() {
            Vec::new()
        } else {
            self.wants.iter().cloned().collect()
        }
    }
}

/// The protocol state of the client, free of I/O.
#[derive(Debug)]
struct Session {
    types: Vec<TypeState>,
    node: Node,
    /// The node is sent on a stream's first request only (Istio's
    /// `set_node_on_first_message_only`).
    node_sent: bool,
}

impl Session {
    fn new(node: Node) -> Self {
        Self {
            types: type_url::ALL.iter().map(|t| TypeState::new(t)).collect(),
            node,
            node_sent: false,
        }
    }

    fn start_stream(&mut self) {
        self.node_sent = false;
        for t in &mut self.types {
            t.start_stream();
        }
    }

    fn index(&self, type_url: &str) -> Option<usize> {
        self.types.iter().position(|t| t.type_url == type_url)
    }

    fn node_once(&mut self) -> Option<Node> {
        (!std::mem::replace(&mut self.node_sent, true)).then(|| self.node.clone())
    }

    /// Hands the resources to the sink and records what it kept; a NACK message if it refused any.
    fn deliver<S: Sink>(
        &mut self,
        sink: &mut S,
        i: usize,
        version: String,
        resources: Vec<Resource>,
        mut removed: Vec<String>,
        state_of_the_world: bool,
    ) -> Result<(), String> {
        let t = &self.types[i];
        let full_set = state_of_the_world && t.wildcard();
        if full_set {
            let listed: HashSet<&str> = resources.iter().map(|r| r.name.as_str()).collect();
            removed = t
                .held
                .keys()
                .filter(|name| !listed.contains(name.as_str()))
                .cloned()
                .collect();
        }
        let kept: Vec<(String, String)> = resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        let update = Update {
            type_url: t.type_url.to_owned(),
            version,
            resources,
            removed: removed.clone(),
            state_of_the_world: full_set,
        };
        let Applied { rejected, wants } = sink.apply(update);
        let t = &mut self.types[i];
        let refused: HashSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        for (name, version) in kept {
            if !refused.contains(name.as_str()) {
                t.held.insert(name, version);
            }
        }
        for name in &removed {
            t.held.remove(name);
        }
        for (type_url, names) in wants {
            match self.index(&type_url) {
                Some(j) if !type_url::is_wildcard(&type_url) => self.types[j].wants = names,
                _ => warn!(%type_url, "the sink asked for names of a type it cannot name"),
            }
        }
        if rejected.is_empty() {
            return Ok(());
        }
        let details: Vec<String> = rejected
            .iter()
            .map(|r| format!("{}: {}", r.name, r.reason))
            .collect();
        Err(format!(
            "Error adding/updating {}(s) {}",
            type_url::noun(self.types[i].type_url),
            details.join(", ")
        ))
    }

    // --- State of the World ---

    fn sotw_request(&mut self, i: usize, error: Option<String>) -> DiscoveryRequest {
        let node = self.node_once();
        let t = &mut self.types[i];
        t.requested = true;
        t.subscribed = t.wants.clone();
        DiscoveryRequest {
            version_info: t.accepted_version.clone(),
            node,
            resource_names: t.names(),
            type_url: t.type_url.to_owned(),
            response_nonce: t.nonce.clone(),
            error_detail: error.map(nack_status),
            ..DiscoveryRequest::default()
        }
    }

    /// The requests that open a SotW stream: every active type, CDS and LDS first.
    fn sotw_initial(&mut self) -> Vec<DiscoveryRequest> {
        let active: Vec<usize> = (0..self.types.len())
            .filter(|&i| self.types[i].active())
            .collect();
        active
            .into_iter()
            .map(|i| self.sotw_request(i, None))
            .collect()
    }

    /// Requests for named types whose wants changed since this stream last asked.
    fn sotw_resubscribe(&mut self) -> Vec<DiscoveryRequest> {
        let changed: Vec<usize> = (0..self.types.len())
            .filter(|&i| {
                let t = &self.types[i];
                !t.wildcard() && t.wants != t.subscribed
            })
            .collect();
        changed
            .into_iter()
            .map(|i| self.sotw_request(i, None))
            .collect()
    }

    fn on_sotw_response<S: Sink>(
        &mut self,
        sink: &mut S,
        stats: &XdsStats,
        response: DiscoveryResponse,
    ) -> Vec<DiscoveryRequest> {
        let version = response.version_info.clone();
        let received = Received {
            type_url: &response.type_url,
            nonce: &response.nonce,
            version: &version,
            resources: sotw_resources(&response),
            removed: Vec::new(),
            state_of_the_world: true,
        };
        let Some((i, outcome)) = self.receive(sink, stats, received) else {
            return Vec::new();
        };
        let error = outcome.err();
        if error.is_none() {
            self.types[i].accepted_version = version;
        }
        let mut requests = vec![self.sotw_request(i, error)];
        requests.extend(self.sotw_resubscribe());
        requests
    }

    /// Checks a response's nonce and envelope, hands it to the sink, counts and logs the
    /// verdict; `None` for a response to ignore (unknown type, replayed nonce).
    fn receive<S: Sink>(
        &mut self,
        sink: &mut S,
        stats: &XdsStats,
        received: Received<'_>,
    ) -> Option<(usize, Result<(), String>)> {
        let Received {
            type_url,
            nonce,
            version,
            resources,
            removed,
            state_of_the_world,
        } = received;
        let Some(i) = self.index(type_url) else {
            warn!(%type_url, "ignoring a response of a type not subscribed");
            return None;
        };
        if !self.types[i].fresh_nonce(nonce) {
            warn!(%type_url, %nonce, "ignoring a replayed response (stale nonce)");
            return None;
        }
        let sub = stats.subscription(type_url);
        if let Some(s) = sub {
            bump(&s.update_attempt);
        }
        let outcome = resources
            .map_err(|e| format!("Error processing the response: {e}"))
            .and_then(|resources| {
                self.deliver(
                    sink,
                    i,
                    version.to_owned(),
                    resources,
                    removed,
                    state_of_the_world,
                )
            });
        match &outcome {
            Ok(()) => {
                if let Some(s) = sub {
                    bump(&s.update_success);
                }
                info!(%type_url, %version, %nonce, "ACK");
            }
            Err(error) => {
                if let Some(s) = sub {
                    bump(&s.update_rejected);
                }
                let kept_version = &self.types[i].accepted_version;
                warn!(%type_url, %version, %nonce, %kept_version, %error, "NACK");
            }
        }
        Some((i, outcome))
    }

    // --- Delta ---

    /// The requests that open a Delta stream, with the versions the sink holds.
    fn delta_initial(&mut self) -> Vec<DeltaDiscoveryRequest> {
        let mut out = Vec::new();
        for i in 0..self.types.len() {
            if !self.types[i].active() {
                continue;
            }
            let node = self.node_once();
            let t = &mut self.types[i];
            t.requested = true;
            t.subscribed = t.wants.clone();
            // Envoy forgets what it no longer wants when it unsubscribes; a held name outside
            // `wants` is claimed by no one.
            let held = t
                .held
                .iter()
                .filter(|(name, _)| t.wildcard() || t.wants.contains(*name))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            out.push(DeltaDiscoveryRequest {
                node,
                type_url: t.type_url.to_owned(),
                resource_names_subscribe: t.names(),
                initial_resource_versions: held,
                ..DeltaDiscoveryRequest::default()
            });
        }
        out
    }

    fn delta_resubscribe(&mut self) -> Vec<DeltaDiscoveryRequest> {
        let mut out = Vec::new();
        for i in 0..self.types.len() {
            let t = &self.types[i];
            if t.wildcard() || t.wants == t.subscribed {
                continue;
            }
            let mut subscribe = Vec::new();
            let mut unsubscribe = Vec::new();
            for change in t.subscribed.diff(&t.wants) {
                match change {
                    DiffItem::Add(name) => subscribe.push(name.clone()),
                    DiffItem::Remove(name) => unsubscribe.push(name.clone()),
                }
            }
            let node = self.node_once();
            let t = &mut self.types[i];
            for name in &unsubscribe {
                t.held.remove(name);
            }
            t.requested = true;
            t.subscribed = t.wants.clone();
            out.push(DeltaDiscoveryRequest {
                node,
                type_url: t.type_url.to_owned(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..DeltaDiscoveryRequest::default()
            });
        }
        out
    }

    fn on_delta_response<S: Sink>(
        &mut self,
        sink: &mut S,
        stats: &XdsStats,
        response: DeltaDiscoveryResponse,
    ) -> Vec<DeltaDiscoveryRequest> {
        let received = Received {
            type_url: &response.type_url,
            nonce: &response.nonce,
            version: &response.system_version_info,
            resources: delta_resources(&response),
            removed: response.removed_resources.clone(),
            state_of_the_world: false,
        };
        let Some((_, outcome)) = self.receive(sink, stats, received) else {
            return Vec::new();
        };
        let mut requests = vec![DeltaDiscoveryRequest {
            node: self.node_once(),
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: outcome.err().map(nack_status),
            ..DeltaDiscoveryRequest::default()
        }];
        requests.extend(self.delta_resubscribe());
        requests
    }
}

/// A response as the client sees it, whichever the variant.
struct Received<'a> {
    type_url: &'a str,
    nonce: &'a str,
    version: &'a str,
    resources: Result<Vec<Resource>, EnvelopeError>,
    removed: Vec<String>,
    state_of_the_world: bool,
}

fn nack_status(message: String) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}

/// The resources of a SotW response, unwrapped and named, or why the envelope is bad.
fn sotw_resources(response: &DiscoveryResponse) -> Result<Vec<Resource>, EnvelopeError> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(response.resources.len());
    for (index, any) in response.resources.iter().enumerate() {
        let (name, any) = if any.type_url == type_url::RESOURCE_WRAPPER {
            let wrapped = WrappedResource::decode(any.value.as_slice()).map_err(|e| {
                EnvelopeError::Undecodable {
                    index,
                    reason: e.to_string(),
                }
            })?;
            match wrapped.resource {
                Some(inner) => (Some(wrapped.name), inner),
                None => continue,
            }
        } else {
            (None, any.clone())
        };
        let resource = named(index, &response.type_url, name, any, &response.version_info)?;
        if !names.insert(resource.name.clone()) {
            return Err(EnvelopeError::Duplicate(resource.name));
        }
        out.push(resource);
    }
    Ok(out)
}

/// The resources of a Delta response, or why the envelope is bad.
fn delta_resources(response: &DeltaDiscoveryResponse) -> Result<Vec<Resource>, EnvelopeError> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(response.resources.len());
    for (index, wrapped) in response.resources.iter().enumerate() {
        // A resource without a body only refreshes a TTL, which portcullis does not keep.
        let Some(any) = wrapped.resource.clone() else {
            debug!(name = %wrapped.name, "resource without a body ignored");
            continue;
        };
        let resource = named(
            index,
            &response.type_url,
            Some(wrapped.name.clone()),
            any,
            &wrapped.version,
        )?;
        if !names.insert(resource.name.clone()) {
            return Err(EnvelopeError::Duplicate(resource.name));
        }
        out.push(resource);
    }
    Ok(out)
}

/// Checks one resource's type and names it (from the envelope, else from its first field).
fn named(
    index: usize,
    expected: &str,
    name: Option<String>,
    any: Any,
    version: &str,
) -> Result<Resource, EnvelopeError> {
    if any.type_url != expected {
        return Err(EnvelopeError::TypeMismatch {
            index,
            found: any.type_url,
            expected: expected.to_owned(),
        });
    }
    let name = match name.filter(|n| !n.is_empty()) {
        Some(name) => name,
        None => resource_name(&any).map_err(|e| EnvelopeError::Undecodable {
            index,
            reason: e.to_string(),
        })?,
    };
    if name.is_empty() {
        return Err(EnvelopeError::Nameless { index });
    }
    Ok(Resource {
        name,
        version: version.to_owned(),
        any,
    })
}

/// Whether the address is TLS, and the host its certificate must name.
#[derive(Debug, Clone)]
/// A parsed `http://host:port` or `https://host:port` of an Istio control-plane service.
pub(crate) struct Target {
    uri: http::Uri,
    tls: bool,
    host: String,
}

impl Target {
    pub(crate) fn parse(address: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Address {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = address.parse().map_err(|_| bad("not a URI"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.port_u16().is_none() {
            return Err(bad("no port"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self { uri, tls, host })
    }
}

/// The ADS client: one stream at a time, reconnecting forever.
pub struct Client {
    config: ClientConfig,
    target: Target,
    stats: Arc<XdsStats>,
    backoff: Backoff,
    session: Session,
}

impl Client {
    /// Checks the configuration; the stream starts with [`Client::run`].
    pub fn new(config: ClientConfig, stats: Arc<XdsStats>) -> Result<Self, ClientError> {
        let target = Target::parse(&config.address)?;
        if target.tls && config.root_cert.is_none() {
            return Err(ClientError::Address {
                address: config.address.clone(),
                reason: "https needs a root certificate".to_owned(),
            });
        }
        let session = Session::new(config.node.to_node());
        Ok(Self {
            config,
            target,
            stats,
            backoff: Backoff::envoy_default(),
            session,
        })
    }

    /// Replaces the reconnect backoff (Envoy's 500 ms / 30 s by default).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Streams config into the sink forever; a lost stream is retried with backoff and never
    /// clears what the sink applied.
    pub async fn run<S: Sink>(mut self, mut sink: S) -> Infallible {
        loop {
            let mut delivered = false;
            let mut established = false;
            let error = self
                .stream(&mut sink, &mut delivered, &mut established)
                .await;
            self.stats.connected_state.store(0, Ordering::Relaxed);
            for t in &self.session.types {
                if t.active()
                    && let Some(s) = self.stats.subscription(t.type_url)
                {
                    bump(&s.update_failure);
                }
            }
            if established {
                sink.disconnected();
            }
            if delivered {
                self.backoff.reset();
            }
            let delay = self.backoff.next_delay();
            if matches!(
                error,
                ClientError::Token { .. } | ClientError::RootCert { .. }
            ) {
                error!(address = %self.config.address, %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to the control plane");
            } else {
                warn!(address = %self.config.address, %error, retry_in_ms = delay.as_millis() as u64, "disconnected from the control plane");
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn stream<S: Sink>(
        &mut self,
        sink: &mut S,
        delivered: &mut bool,
        established: &mut bool,
    ) -> ClientError {
        let connected = connect(
            &self.target,
            self.config.root_cert.as_deref(),
            &self.config.token_file,
            self.config.connect_timeout,
        )
        .await;
        let (channel, token) = match connected {
            Ok(connected) => connected,
            Err(e) => return e,
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        self.stats.connected_state.store(1, Ordering::Relaxed);
        *established = true;
        info!(address = %self.config.address, protocol = ?self.config.protocol, "connected to the control plane");
        self.session.start_stream();
        let result = match self.config.protocol {
            Protocol::Delta => {
                let (tx, rx) = mpsc::channel(64);
                let initial = self.session.delta_initial();
                let request = with_token(ReceiverStream::new(rx), token.as_deref());
                drive(
                    &tx,
                    initial,
                    client.delta_aggregated_resources(request),
                    |response| {
                        *delivered = true;
                        self.session.on_delta_response(sink, &self.stats, response)
                    },
                )
                .await
            }
            Protocol::StateOfTheWorld => {
                let (tx, rx) = mpsc::channel(64);
                let initial = self.session.sotw_initial();
                let request = with_token(ReceiverStream::new(rx), token.as_deref());
                drive(
                    &tx,
                    initial,
                    client.stream_aggregated_resources(request),
                    |response| {
                        *delivered = true;
                        self.session.on_sotw_response(sink, &self.stats, response)
                    },
                )
                .await
            }
        };
        match result {
            Ok(infallible) => match infallible {},
            Err(e) => e,
        }
    }
}

/// Opens a channel to `target` as istio-agent does: TLS verified with `root_cert` for
/// `https`, and the service-account token to send (required over TLS).
pub(crate) async fn connect(
    target: &Target,
    root_cert: Option<&Path>,
    token_file: &Path,
    connect_timeout: Duration,
) -> Result<(Channel, Option<String>), ClientError> {
    let mut endpoint = Endpoint::from(target.uri.clone())
        .connect_timeout(connect_timeout)
        .tcp_keepalive(Some(Duration::from_secs(300)));
    if target.tls {
        let path = root_cert.map(Path::to_path_buf).unwrap_or_default();
        let pem = tokio::fs::read(&path)
            .await
            .map_err(|source| ClientError::RootCert { path, source })?;
        endpoint = endpoint.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(target.host.clone()),
        )?;
    }
    let token = match tokio::fs::read_to_string(token_file).await {
        Ok(token) => Some(token.trim().to_owned()),
        Err(source) if target.tls => {
            return Err(ClientError::Token {
                path: token_file.to_path_buf(),
                source,
            });
        }
        Err(e) => {
            debug!(path = %token_file.display(), error = %e, "no token; connecting without one");
            None
        }
    };
    Ok((endpoint.connect().await?, token))
}

/// A request carrying `authorization: Bearer TOKEN` when there is a token.
pub(crate) fn with_token<T>(body: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    if let Some(token) = token {
        match MetadataValue::try_from(format!("Bearer {token}")) {
            Ok(value) => {
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => warn!("the xDS token is not a valid header value; sent without it"),
        }
    }
    request
}

/// Sends the opening requests, then answers each response until the stream ends.
async fn drive<Req, Resp, F>(
    tx: &mpsc::Sender<Req>,
    initial: Vec<Req>,
    call: impl Future<Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>,
    mut on_response: F,
) -> Result<Infallible, ClientError>
where
    F: FnMut(Resp) -> Vec<Req>,
{
    for request in initial {
        tx.send(request).await.map_err(|_| ClientError::Closed)?;
    }
    let mut responses = call.await?.into_inner();
    while let Some(response) = responses.message().await? {
        for request in on_response(response) {
            tx.send(request).await.map_err(|_| ClientError::Closed)?;
        }
    }
    Err(ClientError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> Any {
        Any {
            type_url: type_url::CLUSTER.to_owned(),
            value: crate::Named {
                name: name.to_owned(),
            }
            .encode_to_vec(),
        }
    }

    fn sotw(resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: "7".to_owned(),
            resources,
            type_url: type_url::CLUSTER.to_owned(),
            nonce: "n".to_owned(),
            ..DiscoveryResponse::default()
        }
    }

    #[test]
    fn sotw_names_resources_by_their_first_field_or_their_wrapper() {
        let wrapped = Any {
            type_url: type_url::RESOURCE_WRAPPER.to_owned(),
            value: WrappedResource {
                name: "by-wrapper".to_owned(),
                resource: Some(cluster("inner")),
                ..WrappedResource::default()
            }
            .encode_to_vec(),
        };
        let resources = sotw_resources(&sotw(vec![cluster("a"), wrapped])).unwrap();
        let names: Vec<_> = resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "by-wrapper"]);
        assert!(resources.iter().all(|r| r.version == "7"));
        assert_eq!(resources[1].any, cluster("inner"));
    }

    #[test]
    fn envelope_errors() {
        let duplicate = sotw_resources(&sotw(vec![cluster("a"), cluster("a")]));
        assert_eq!(duplicate, Err(EnvelopeError::Duplicate("a".to_owned())));
        let nameless = sotw_resources(&sotw(vec![cluster("")]));
        assert_eq!(nameless, Err(EnvelopeError::Nameless { index: 0 }));
        let delta = DeltaDiscoveryResponse {
            type_url: type_url::CLUSTER.to_owned(),
            resources: vec![WrappedResource {
                name: "x".to_owned(),
                resource: Some(Any {
                    type_url: type_url::ROUTE.to_owned(),
                    value: Vec::new(),
                }),
                ..WrappedResource::default()
            }],
            ..DeltaDiscoveryResponse::default()
        };
        assert!(matches!(
            delta_resources(&delta),
            Err(EnvelopeError::TypeMismatch { index: 0, .. })
        ));
    }

    #[test]
    fn a_nonce_seen_on_the_stream_is_stale() {
        let mut t = TypeState::new(type_url::CLUSTER);
        assert!(t.fresh_nonce("1"));
        assert!(t.fresh_nonce("2"));
        assert!(!t.fresh_nonce("1"));
        assert_eq!(t.nonce, "2");
        t.start_stream();
        assert!(t.fresh_nonce("1"), "a new stream starts over");
    }

    #[test]
    fn addresses() {
        assert!(
            !Target::parse("http://istiod.istio-system.svc:15010")
                .unwrap()
                .tls
        );
        let tls = Target::parse("https://[fd00::1]:15012").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.host, "fd00::1");
        for bad in [
            "istiod:15010",
            "grpc://istiod:15010",
            "http://istiod",
            "not a uri",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
