//! Envoy-shaped admin server (`/ready`, `/config_dump`, `/clusters`, `/stats`, ...),
//! the Prometheus scrape endpoint and the kubelet readiness endpoint.

mod config_dump;
mod exposition;
pub use exposition::prometheus;
mod render;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_audit::Audit;
use portcullis_envoy::state::SourceState;
use portcullis_registry::{Enforcement, Snapshot};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One config file's state, as shown by `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct FileStatus {
    /// The file.
    pub path: String,
    /// Whether its latest content was rejected (it keeps serving its last good content).
    pub rejected: bool,
    /// Findings, each `Error|Warning [CODE] (kind ns/name file:line) message`.
    pub findings: Vec<String>,
}

/// What the config loader reports about the files behind the active snapshot.
#[derive(Debug, Clone, Default)]
pub struct ConfigStatus {
    /// The config path as given on the command line.
    pub path: String,
    /// Per-file status.
    pub files: Vec<FileStatus>,
    /// Why the config path as a whole could not be read, if it could not.
    pub path_error: Option<String>,
}

/// What `/config_dump` shows of the config sources' resources.
#[derive(Debug, Clone)]
pub enum ConfigResources {
    /// What the sources hold, as they hold it: a control plane's active, warming and
    /// rejected versions, and the files' resources beside them.
    Held(Arc<SourceState>),
    /// Files alone: the active snapshot's own resources, every one at the snapshot's
    /// version since `at`. Made when asked for, so that an idle proxy keeps no second map of
    /// a mesh-sized config.
    Snapshot {
        /// When the snapshot was built.
        at: std::time::SystemTime,
    },
}

impl Default for ConfigResources {
    fn default() -> Self {
        ConfigResources::Held(Arc::default())
    }
}

impl ConfigResources {
    /// The sources' state, with `snapshot` the active one.
    pub fn state(&self, snapshot: &Snapshot) -> Arc<SourceState> {
        match self {
            ConfigResources::Held(state) => Arc::clone(state),
            ConfigResources::Snapshot { at } => Arc::new(
                snapshot
                    .resources()
                    .map(|r| SourceState::of(r.clone(), &snapshot.version.to_string(), *at))
                    .unwrap_or_default(),
            ),
        }
    }
}

/// Changes the log filter, e.g. `debug` or `portcullis_proxy=debug,info`.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Counters kept outside the metrics registry (the xDS client's), as Envoy stat names
/// (`cluster_manager.cds.update_success`) and values.
pub type StatsSource = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// Everything the admin endpoints read.
pub struct AdminState {
    /// The active registry snapshot.
    pub registry: Arc<ArcSwap<Snapshot>>,
    /// Config files and their errors.
    pub config: Arc<ArcSwap<ConfigStatus>>,
    /// The config sources' resources in the model, for `/config_dump` in Envoy's shape.
    pub resources: Arc<ArcSwap<ConfigResources>>,
    /// Set by the publisher once every config source's first complete set is applied.
    ready: AtomicBool,
    /// Set while the workload's certificate is awaited from a CA.
    awaiting_identity: AtomicBool,
    /// Metrics to expose.
    pub metrics: Registry,
    /// Log level control for `POST /logging`.
    pub set_log_level: SetLogLevel,
    /// Cancelled by `POST /quitquitquit`: drain, then exit.
    pub shutdown: CancellationToken,
    /// Cancelled by `POST /drain_listeners` (and by shutdown): stop accepting, let open
    /// connections finish, report not ready.
    pub drain: CancellationToken,
    /// Process start, for `/server_info`.
    pub started: Instant,
    /// Counters from outside the registry; the admin server alone reads them.
    stats_sources: std::sync::Mutex<Vec<StatsSource>>,
    /// Refusals, the enforcement mode, and what learning makes of them.
    pub audit: Arc<Audit>,
}

impl AdminState {
    /// State serving `registry` and `audit`, not ready, with no config status yet.
    pub fn new(
        registry: Arc<ArcSwap<Snapshot>>,
        audit: Arc<Audit>,
        metrics: Registry,
        set_log_level: SetLogLevel,
        shutdown: CancellationToken,
        drain: CancellationToken,
    ) -> Self {
        AdminState {
            registry,
            config: Arc::new(ArcSwap::from_pointee(ConfigStatus::default())),
            resources: Arc::default(),
            ready: AtomicBool::new(false),
            awaiting_identity: AtomicBool::new(false),
            metrics,
            set_log_level,
            shutdown,
            drain,
            started: Instant::now(),
            stats_sources: std::sync::Mutex::default(),
            audit,
        }
    }

    /// Adds counters to `/stats` and `/stats/prometheus`.
    pub fn add_stats(&self, source: StatsSource) {
        self.stats_sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(source);
    }

    /// The counters of every added source.
    fn extra_stats(&self) -> Vec<(String, u64)> {
        let sources = self
            .stats_sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sources.iter().flat_map(|source| source()).collect()
    }

    /// Marks the proxy ready: every config source's first complete set is applied.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Holds readiness back until [`AdminState::identity_arrived`]: a certificate is
    /// requested from a CA, and Istio mutual TLS fails without one.
    pub fn await_identity(&self) {
        self.awaiting_identity.store(true, Ordering::Release);
    }

    /// The workload's certificate is in use.
    pub fn identity_arrived(&self) {
        self.awaiting_identity.store(false, Ordering::Release);
    }

    /// Whether `/ready` answers `LIVE`: config applied, the certificate (if awaited) in
    /// use, and not draining (a drain is for good).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.awaiting_identity.load(Ordering::Acquire)
            && !self.drain.is_cancelled()
    }
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// The full admin API (loopback only by default).
    Admin,
    /// Only `/stats/prometheus` (Istio's 15090).
    Metrics,
    /// Only `/healthz/ready` (Istio's 15021).
    Health,
}

/// Serves `endpoints` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    endpoints: Endpoints,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, endpoints, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr`, for callers that want to fail early on a taken port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// The admin page: the registry, the mode and the denials, with no external assets.
const PAGE: &str = include_str!("page.html");

/// The value of `key` in the request's query, as given.
fn query_value(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

fn route(
    state: &AdminState,
    endpoints: Endpoints,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    let text = "text/plain; charset=UTF-8";
    match (endpoints, method, path) {
        (Endpoints::Admin | Endpoints::Metrics, &Method::GET, "/stats/prometheus") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            exposition::prometheus(
                &state.metrics,
                &state.extra_stats(),
                &render::cluster_gauges(&state.registry.load()),
            ),
        ),
        (Endpoints::Health, &Method::GET, "/healthz/ready")
        | (Endpoints::Admin, &Method::GET, "/ready") => {
            if state.is_ready() {
                reply(StatusCode::OK, text, "LIVE\n")
            } else if state.drain.is_cancelled() {
                reply(StatusCode::SERVICE_UNAVAILABLE, text, "DRAINING\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, text, "PRE_INITIALIZING\n")
            }
        }
        (Endpoints::Admin, &Method::GET, "/config_dump") => {
            reply(StatusCode::OK, "application/json", {
                let registry = state.registry.load();
                render::config_dump(
                    &state.resources.load().state(&registry),
                    &registry,
                    &state.config.load(),
                )
            })
        }
        (Endpoints::Admin, &Method::GET, "/clusters") => reply(
            StatusCode::OK,
            text,
            render::clusters(&state.registry.load()),
        ),
        (Endpoints::Admin, &Method::GET, "/stats") => reply(
            StatusCode::OK,
            text,
            render::stats(&state.registry.load(), &state.metrics, &state.extra_stats()),
        ),
        (Endpoints::Admin, &Method::GET, "/server_info") => reply(
            StatusCode::OK,
            "application/json",
            render::server_info(state.is_ready(), state.started.elapsed()),
        ),
        (Endpoints::Admin, &Method::POST, "/logging") => {
            let level = query_value(&req, "level");
            match level {
                Some(level) => match (state.set_log_level)(&level) {
                    Ok(()) => reply(StatusCode::OK, text, format!("log level set to {level}\n")),
                    Err(e) => reply(StatusCode::BAD_REQUEST, text, format!("{e}\n")),
                },
                None => reply(
                    StatusCode::BAD_REQUEST,
                    text,
                    "usage: POST /logging?level=<filter>\n",
                ),
            }
        }
        (Endpoints::Admin, &Method::POST, "/quitquitquit") => {
            state.shutdown.cancel();
            reply(StatusCode::OK, text, "OK\n")
        }
        (Endpoints::Admin, &Method::POST, "/drain_listeners") => {
            state.drain.cancel();
            reply(StatusCode::OK, text, "OK\n")
        }
        (Endpoints::Admin, &Method::GET, "/") => {
            let mut page = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE);
            // Everything the page needs is in it; it may only call the admin port back.
            page.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                ),
            );
            page
        }
        (Endpoints::Admin, &Method::GET, "/registry") => reply(
            StatusCode::OK,
            "application/json",
            render::registry(&state.registry.load()),
        ),
        (Endpoints::Admin, &Method::GET, "/mode") => reply(
            StatusCode::OK,
            "application/json",
            state.audit.mode_json(state.registry.load().enforcement),
        ),
        (Endpoints::Admin, &Method::POST, "/mode") => {
            let value = query_value(&req, "value");
            let mode = match value.as_deref() {
                Some("reset") => Ok(None),
                Some(v) => Enforcement::parse(v).map(Some).ok_or(()),
                None => Err(()),
            };
            match mode {
                Ok(mode) => {
                    state.audit.mode().set_admin(mode);
                    let (now, source) = state
                        .audit
                        .mode()
                        .effective(state.registry.load().enforcement);
                    tracing::info!(
                        mode = now.as_str(),
                        source = source.as_str(),
                        "enforcement mode set from the admin port"
                    );
                    reply(
                        StatusCode::OK,
                        text,
                        format!("mode {} (from {})\n", now.as_str(), source.as_str()),
                    )
                }
                Err(()) => reply(
                    StatusCode::BAD_REQUEST,
                    text,
                    "usage: POST /mode?value=enforce|audit|reset\n",
                ),
            }
        }
        (Endpoints::Admin, &Method::GET, "/denials") => reply(
            StatusCode::OK,
            "application/json",
            state.audit.denials_json(state.registry.load().enforcement),
        ),
        (Endpoints::Admin, &Method::POST, "/denials/reset") => {
            state.audit.reset();
            reply(StatusCode::OK, text, "OK\n")
        }
        (Endpoints::Admin, &Method::GET, "/learned") => {
            reply(StatusCode::OK, "application/yaml", state.audit.learned())
        }
        (Endpoints::Admin, _, "/mode" | "/denials/reset") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, text, "use POST\n")
        }
        (Endpoints::Admin, _, "/quitquitquit" | "/drain_listeners" | "/logging") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, text, "use POST\n")
        }
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n"),
    }
}

#[cfg(test)]
mod readiness_tests {
    use super::*;

    #[test]
    fn an_awaited_certificate_holds_readiness_back_until_it_arrives() {
        let mut metrics = Registry::default();
        let state = AdminState::new(
            Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            Arc::new(Audit::new(Enforcement::Enforce, "default", &mut metrics)),
            Registry::default(),
            Box::new(|_| Ok(())),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        state.await_identity();
        state.set_ready();
        assert!(!state.is_ready());
        state.identity_arrived();
        assert!(state.is_ready());
    }
}
