//! The one upstream attempt engine: every forwarding path (the HTTP/1.1 fast path, the
//! hyper path, CONNECT tunnels, TCP proxying) makes its attempts through it, so the
//! circuit breakers, the endpoint pick, the retry conditions, the back-off and the
//! timeouts of a route's policy are decided in one place. A path only knows how to send
//! once; it reports how far an attempt got, and the error says which retry condition
//! covers it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use portcullis_registry::{Decision, Headers, Resource, Slot};
use tokio::time::Instant;

use portcullis_balance::PreviousPriorities;
use portcullis_balance::outlier::Outcome;

use crate::Proxy;
use crate::error::ProxyError;
use crate::metrics::{ClusterCounter, ClusterLabels, Label};
use crate::origin::Transport;
use crate::upstream::{Original, Pick, RetryPolicy, Target};

/// The retry condition of Envoy's `retry_on` that covers a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Condition {
    /// No connection could be made (`connect-failure`).
    ConnectFailure,
    /// An HTTP/2 upstream refused the stream (`refused-stream`).
    RefusedStream,
    /// The upstream reset or closed before the response head, or the attempt's per-try
    /// timeout ended it (Envoy resets the stream then) (`reset`, `5xx`, `gateway-error`).
    Reset,
}

/// How far a failed attempt got.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request did not leave: no connection, or a connection that failed before the
    /// request was written. Nothing was processed upstream.
    Unsent(ProxyError),
    /// The request left, at least in part, and no response head came back.
    Sent(ProxyError),
}

impl Failure {
    fn into_error(self) -> ProxyError {
        match self {
            Failure::Unsent(e) | Failure::Sent(e) => e,
        }
    }
}

/// How many times a request whose HTTP/2 stream was refused is sent again before a
/// refusal counts as a failed attempt (see [`Attempts::failed`]).
const RESENDS: u8 = 2;

/// What to do with a response head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer<R> {
    /// Drop it (and its connection) and make the next attempt with this request.
    Retry(R),
    /// Pass it on; the response flag Envoy logs for it when a retry would have been due
    /// (`URX` out of retries, `UO` past `max_retries`).
    Deliver(Option<&'static str>),
}

/// One attempt in progress: its endpoint and how to reach it.
pub(crate) struct Attempt {
    /// 1 for the first attempt (`x-envoy-attempt-count`).
    pub number: usize,
    /// The endpoint, with what it holds while the request is in flight.
    pub pick: Pick,
}

/// The attempts of one request or connection under one retry policy.
pub(crate) struct Attempts<'a> {
    proxy: &'a Proxy,
    decision: &'a Decision,
    original: Original<'a>,
    cluster: &'a str,
    policy: RetryPolicy,
    /// The circuit breaker each attempt takes a unit of (`Requests` for HTTP,
    /// `Connections` for TCP), if any.
    admission: Option<Resource>,
    connect_timeout: Duration,
    /// The route timeout: the whole exchange, retries included, up to the response head.
    deadline: Option<Instant>,
    /// Endpoints tried, avoided by later picks under `previous_hosts`.
    tried: Vec<usize>,
    /// Endpoints attempted, in order, under a `previous_priorities` retry priority.
    attempted: Vec<usize>,
    /// The request's hash under the route's hash policy, for a consistent-hash cluster.
    hash: Option<u64>,
    /// Attempts started.
    made: usize,
    /// The endpoint of the attempt in flight.
    current: Option<usize>,
    /// The next back-off ceiling (Envoy's jittered exponential back-off).
    backoff: Duration,
    /// Held while a retry is in flight: the cluster's `max_retries` bounds them.
    retrying: Option<Slot>,
    /// Resends of refused HTTP/2 streams made, which are not attempts of the policy.
    resent: u8,
    /// The next attempt is such a resend.
    resend_due: bool,
    /// When the request began, which the first pick is judged at instead of a clock read
    /// of its own: ejections and slow start move in seconds, a clock read costs a request
    /// about 1 % of its user-space cycles.
    since: Option<Instant>,
}

impl<'a> Attempts<'a> {
    /// Attempts at `decision` under `policy`, each taking a unit of `admission`.
    pub(crate) fn new(
        proxy: &'a Proxy,
        (decision, original): (&'a Decision, Original<'a>),
        cluster: &'a str,
        policy: RetryPolicy,
        admission: Option<Resource>,
    ) -> Self {
        let backoff = policy.backoff_base;
        Attempts {
            proxy,
            decision,
            original,
            cluster,
            policy,
            admission,
            connect_timeout: proxy.connect_timeout(decision),
            deadline: None,
            tried: Vec::new(),
            attempted: Vec::new(),
            hash: None,
            made: 0,
            current: None,
            backoff,
            retrying: None,
            resent: 0,
            resend_due: false,
            since: None,
        }
    }

    /// Judges the first pick at `start`, the request's beginning, just read.
    pub(crate) fn since(mut self, start: Instant) -> Self {
        self.since = Some(start);
        self
    }

    /// Bounds the whole exchange, retries and back-off included, by the route timeout.
    pub(crate) fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.deadline = timeout.map(|t| Instant::now() + t);
        self
    }

    /// Picks by `hash` where the cluster hashes (Envoy's route `hash_policy`).
    pub(crate) fn with_hash(mut self, hash: Option<u64>) -> Self {
        self.hash = hash;
        self
    }

    /// Starts the next attempt: waits out the back-off after a failed one, takes the
    /// circuit breaker unit, and picks an endpoint (another than those tried, where the
    /// policy says so).
    pub(crate) async fn start(&mut self) -> Result<Attempt, ProxyError> {
        let resend = std::mem::take(&mut self.resend_due);
        if !resend && self.made > 0 {
            let ceiling = self.backoff;
            self.backoff = (self.backoff * 2).min(self.policy.backoff_max);
            let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
            let pause = Duration::from_millis(fastrand::u64(0..millis.max(1)));
            self.pause(pause).await?;
        }
        let slot = match self.admission {
            Some(resource) => self.proxy.admit(self.decision, resource)?,
            None => None,
        };
        let previous = self
            .policy
            .previous_priorities
            .map(|update_frequency| PreviousPriorities {
                attempted: &self.attempted,
                update_frequency,
            });
        // A retry comes after a back-off: it reads the clock.
        let now = self.since.take().unwrap_or_else(Instant::now);
        let mut pick = self
            .proxy
            .pick(
                self.decision,
                self.original,
                (&self.tried, previous, self.hash),
                now,
            )
            .await?;
        pick.guard.slot = slot;
        self.current = pick.index;
        if !resend {
            self.made += 1;
        }
        Ok(Attempt {
            number: self.made,
            pick,
        })
    }

    /// How to reach the endpoint of `pick` over `transport`.
    pub(crate) fn target<'p>(&'p self, pick: &'p Pick, transport: &'p Transport) -> Target<'p> {
        Target {
            addr: pick.addr,
            transport,
            connect_timeout: self.connect_timeout,
            cluster: self.cluster,
            decision: self.decision,
            endpoint: pick.guard.endpoint(),
        }
    }

    /// Runs one attempt's exchange up to the response head within the attempt's per-try
    /// timeout and what is left of the route timeout: one timer, at the earlier of the two,
    /// and the exchange's future held once (it is the largest state of a request).
    pub(crate) fn send<F>(&self, exchange: F) -> Bounded<F> {
        let per_try = self.policy.per_try_timeout.map(|t| Instant::now() + t);
        let (deadline, per_try) = match (per_try, self.deadline) {
            (Some(p), Some(r)) if r < p => (Some(r), false),
            (Some(p), _) => (Some(p), true),
            (None, r) => (r, false),
        };
        Bounded {
            exchange,
            timer: deadline.map(tokio::time::sleep_until),
            per_try,
        }
    }

    /// Waits out `pause` before a retry, within the route timeout (Envoy's `UT` when it
    /// ends first).
    async fn pause(&self, pause: Duration) -> Result<(), ProxyError> {
        let wake = Instant::now() + pause;
        match self.deadline {
            Some(deadline) if deadline <= wake => {
                tokio::time::sleep_until(deadline).await;
                Err(ProxyError::UpstreamTimeout)
            }
            _ => {
                tokio::time::sleep_until(wake).await;
                Ok(())
            }
        }
    }

    /// Judges a failed attempt: the request to send again when another attempt follows
    /// (start it), else the error to answer with. `again` is the request as it can be sent
    /// again, `None` when it cannot (its body streamed away).
    pub(crate) fn failed<R>(
        &mut self,
        failure: Failure,
        again: Option<R>,
    ) -> Result<R, ProxyError> {
        // A stream the HTTP/2 upstream refused was never processed (RFC 9113, 8.7); nginx,
        // for one, refuses every stream opened between its last request on a connection
        // and the client's reading of its GOAWAY, which comes behind the responses to all
        // the streams before. Such a request goes again at once, on a new pick, without
        // counting as an attempt, a retry or an endpoint's failure, as gRPC's transparent
        // retry does; past `RESENDS` a refusal is judged as any other failure.
        let refused = match &failure {
            Failure::Unsent(e) | Failure::Sent(e) => e.refused_stream(),
        };
        let again = match again {
            Some(again) if refused && self.resent < RESENDS => {
                self.resent += 1;
                self.resend_due = true;
                tracing::debug!(
                    attempt = self.made,
                    "upstream refused the stream; sending it again"
                );
                return Ok(again);
            }
            again => again,
        };
        let elsewhere = self.on_cluster();
        let condition = failure_condition(&failure);
        if condition.is_some() {
            self.report(Outcome::LocalFailure);
        }
        let retry = match (&failure, condition) {
            // Nothing was processed; a failed connect only goes to a cluster's endpoint.
            (Failure::Unsent(_), Some(Condition::ConnectFailure)) => {
                self.policy.connect_failure && elsewhere
            }
            (Failure::Unsent(_), Some(_)) => true,
            (Failure::Sent(_), Some(condition)) => covers(&self.policy, condition),
            (_, None) => false,
        };
        let error = failure.into_error();
        let again = match again {
            Some(again) if retry && self.judged(true) => again,
            _ => {
                if !retry {
                    self.judged(false);
                }
                return Err(self.last(error));
            }
        };
        if self.admit_retry().is_err() {
            return Err(ProxyError::RetryOverflow(Box::new(self.last(error))));
        }
        tracing::debug!(error = %error, attempt = self.made, "upstream attempt failed; retrying");
        Ok(again)
    }

    /// Judges a response head with `status` and `headers` (and `grpc-status`, for a
    /// trailers-only gRPC response): one the policy retries goes again while attempts and
    /// the retry budget last and the request can be sent again (`again` makes it, only for
    /// a response that is retried).
    pub(crate) fn answered<R>(
        &mut self,
        (status, headers): (u16, &dyn Headers),
        grpc_status: Option<u32>,
        again: impl FnOnce() -> Option<R>,
    ) -> Answer<R> {
        // Envoy's router tells outlier detection a gRPC status as the HTTP status it maps to.
        self.report(Outcome::Status(grpc_status.map_or(status, grpc_to_http)));
        let retried = self.policy.retry_status(status)
            || grpc_status.is_some_and(|code| self.policy.retry_grpc(code))
            || self.policy.retry_headers(status, headers);
        if !retried {
            self.judged(false);
            return Answer::Deliver(None);
        }
        // The request to send again is made only now: most responses are not retried.
        let again = match self.judged(true).then(again).flatten() {
            Some(again) => again,
            None => return Answer::Deliver((self.made > 1).then_some("URX")),
        };
        if self.admit_retry().is_err() {
            return Answer::Deliver(Some("UO"));
        }
        tracing::debug!(
            status,
            attempt = self.made,
            "retriable upstream status; retrying"
        );
        Answer::Retry(again)
    }

    /// Tells the cluster's outlier detection how the attempt on its endpoint ended.
    fn report(&self, outcome: Outcome) {
        let (Decision::Cluster(c), Some(index)) = (self.decision, self.current) else {
            return;
        };
        let (Some(outliers), Some(endpoint)) = (&c.outlier, c.endpoints.get(index)) else {
            return;
        };
        let now = Instant::now().into_std();
        let detection = &outliers.detection;
        // Envoy ejects while the share ejected stays within `max_ejection_percent`, and
        // always at least one endpoint.
        let may_eject = || {
            let ejected = c
                .endpoints
                .iter()
                .filter(|e| e.state.outlier.ejected(now))
                .count();
            let share = 100 * (ejected + 1) / c.endpoints.len().max(1);
            ejected == 0 || share <= detection.max_ejection_percent as usize
        };
        if let Some(reason) = endpoint
            .state
            .outlier
            .report(detection, outcome, now, may_eject)
        {
            self.proxy.count_ejection(&c.name, reason);
            tracing::info!(cluster = %c.name, endpoint = %endpoint.display(), ?reason, "endpoint ejected by outlier detection");
        }
    }

    /// Whether the policy has an attempt left for an outcome it would retry (`due`), counted
    /// in Envoy's per-cluster stats: an outcome of a retry that is not retried again is a
    /// `upstream_rq_retry_success`, one due past the attempts `upstream_rq_retry_limit_exceeded`.
    fn judged(&self, due: bool) -> bool {
        let metrics = &self.proxy.metrics;
        if !due {
            if self.made > 1 {
                self.count(&metrics.upstream_rq_retry_success);
            }
            return false;
        }
        let left = self.policy.another(self.made - 1);
        if !left && self.policy.num_retries > 0 {
            self.count(&metrics.upstream_rq_retry_limit_exceeded);
        }
        left
    }

    /// Counts one in `family` for the attempts' cluster.
    fn count(&self, family: &ClusterCounter) {
        let name = match self.decision {
            Decision::Cluster(c) => Arc::clone(&c.name),
            _ => Arc::from(self.cluster),
        };
        family
            .get_or_create(&ClusterLabels {
                cluster_name: Label(name),
            })
            .inc();
    }

    /// Takes a unit of the cluster's `max_retries` for the next attempt, and marks the
    /// endpoint just tried as one to avoid; counted as a retry made.
    fn admit_retry(&mut self) -> Result<(), ProxyError> {
        self.retrying = None;
        self.retrying = self.proxy.admit(self.decision, Resource::Retries)?;
        self.count(&self.proxy.metrics.upstream_rq_retry);
        if self.on_cluster() {
            self.policy.tried(&mut self.tried, self.current);
            if self.policy.previous_priorities.is_some() {
                self.attempted.extend(self.current);
            }
        }
        Ok(())
    }

    /// Whether the attempt in flight went to a cluster's endpoint (retries may go to
    /// another one), not to an original destination.
    fn on_cluster(&self) -> bool {
        matches!(self.decision, Decision::Cluster(_)) && self.current.is_some()
    }

    /// The final error, marked as retried (Envoy's `URX`) when attempts were made before.
    fn last(&self, e: ProxyError) -> ProxyError {
        if self.made > 1 {
            ProxyError::Retried(Box::new(e))
        } else {
            e
        }
    }
}

pin_project! {
    /// An attempt's exchange up to the response head, ended by its timer with the timeout
    /// that fired first (see [`Attempts::send`]).
    pub(crate) struct Bounded<F> {
        #[pin]
        exchange: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        // The timer is the attempt's per-try timeout, not the route's.
        per_try: bool,
    }
}

impl<T, E, F> Future for Bounded<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<Failure>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(done) = this.exchange.poll(cx) {
            return Poll::Ready(done);
        }
        match this.timer.as_pin_mut() {
            Some(timer) => {
                ready!(timer.poll(cx));
                let e = if *this.per_try {
                    ProxyError::PerTryTimeout
                } else {
                    ProxyError::UpstreamTimeout
                };
                Poll::Ready(Err(Failure::Sent(e).into()))
            }
            None => Poll::Pending,
        }
    }
}

/// Whether `policy` retries an attempt that failed under `condition`.
fn covers(policy: &RetryPolicy, condition: Condition) -> bool {
    match condition {
        Condition::ConnectFailure => policy.connect_failure,
        Condition::RefusedStream => policy.refused_stream,
        Condition::Reset => policy.reset,
    }
}

/// Envoy's `Grpc::Utility::grpcToHttpStatus`.
fn grpc_to_http(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

fn failure_condition(failure: &Failure) -> Option<Condition> {
    match failure {
        Failure::Unsent(e) | Failure::Sent(e) => e.retry_condition(),
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use portcullis_envoy::{self as envoy, Discovery, Resources, Thresholds};
    use portcullis_registry::Snapshot;

    use super::*;
    use crate::Proxy;
    use portcullis_registry::StatusSet;

    /// A proxy whose one cluster `api` has `endpoints` (never connected to here) and
    /// `max_retries` of `retries`.
    fn proxy(endpoints: u16, retries: u32) -> (Arc<Proxy>, Decision) {
        let mut r = Resources::default();
        let mut c = envoy::Cluster::new("api", Discovery::Static);
        c.load_assignment = Some(envoy::ClusterLoadAssignment {
            cluster_name: "api".into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: (1..=endpoints)
                    .map(|n| {
                        let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + n));
                        envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(addr))
                    })
                    .collect(),
                ..Default::default()
            }],
        });
        c.circuit_breakers = Thresholds {
            max_retries: retries,
            ..Thresholds::default()
        };
        r.clusters.insert(c.name.clone(), Arc::new(c));
        let snapshot = Snapshot::index(&r, &|_| None, None, 1);
        let decision = Decision::Cluster(Arc::clone(snapshot.cluster("api").unwrap()));
        let proxy = Proxy::for_tests_unmetered(snapshot);
        (proxy, decision)
    }

    fn refused() -> ProxyError {
        ProxyError::ConnectFailure(io::Error::from(io::ErrorKind::ConnectionRefused))
    }

    fn reset() -> ProxyError {
        ProxyError::UpstreamClosed(io::Error::from(io::ErrorKind::ConnectionReset))
    }

    /// HTTP attempts at `decision` under `policy`.
    fn http<'a>(proxy: &'a Proxy, decision: &'a Decision, policy: RetryPolicy) -> Attempts<'a> {
        Attempts::new(
            proxy,
            (decision, ANY),
            "api",
            policy,
            Some(Resource::Requests),
        )
    }

    const ANY: Original<'static> = Original::Address(SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        80,
    ));

    #[tokio::test(start_paused = true)]
    async fn connect_failures_go_to_other_endpoints_after_a_jittered_backoff() {
        let (proxy, decision) = proxy(3, 3);
        let mut attempts = http(&proxy, &decision, RetryPolicy::ISTIO);
        let mut seen = Vec::new();
        let mut waits = Vec::new();
        let error = loop {
            let before = Instant::now();
            let attempt = attempts.start().await.unwrap();
            waits.push(before.elapsed());
            assert_eq!(attempt.number, seen.len() + 1);
            seen.push(attempt.pick.addr);
            if let Err(e) = attempts.failed(Failure::Unsent(refused()), Some(())) {
                break e;
            }
        };
        // Istio's policy: two retries, each on an endpoint not tried yet.
        assert_eq!(seen.len(), 3);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "{seen:?}");
        // No wait before the first; then under 25 ms, then under 50 ms (Envoy's back-off).
        assert_eq!(waits[0], Duration::ZERO);
        assert!(waits[1] < Duration::from_millis(25), "{waits:?}");
        assert!(waits[2] < Duration::from_millis(50), "{waits:?}");
        assert_eq!(error.flag(), "URX,UF");
    }

    /// An HTTP/2 stream the upstream refused (`REFUSED_STREAM`, or above its GOAWAY).
    fn refused_stream() -> ProxyError {
        ProxyError::UpstreamReset(h2::Error::from(h2::Reason::REFUSED_STREAM).into())
    }

    #[tokio::test(start_paused = true)]
    async fn refused_streams_are_sent_again_at_once_before_they_count_as_attempts() {
        let (proxy, decision) = proxy(2, 3);
        // Even with retries off, a refused stream goes again, at once and as the same
        // attempt, whether it was refused before or after it left.
        let mut attempts = http(&proxy, &decision, RetryPolicy::NONE);
        let first = attempts.start().await.unwrap();
        assert!(
            attempts
                .failed(Failure::Sent(refused_stream()), Some(()))
                .is_ok()
        );
        let before = Instant::now();
        let again = attempts.start().await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!((first.number, again.number), (1, 1));
        assert!(
            attempts
                .failed(Failure::Unsent(refused_stream()), Some(()))
                .is_ok()
        );
        assert_eq!(attempts.start().await.unwrap().number, 1);
        // Past its resends a refusal is a failed attempt: not retried without a policy.
        let e = attempts
            .failed(Failure::Sent(refused_stream()), Some(()))
            .unwrap_err();
        assert_eq!(e.flag(), "UR");

        // Under Istio's policy the third refusal is its first retry, after a back-off, and
        // a request that cannot be made again is not resent.
        let mut attempts = http(&proxy, &decision, RetryPolicy::ISTIO);
        for _ in 0..=RESENDS {
            attempts.start().await.unwrap();
            attempts
                .failed(Failure::Sent(refused_stream()), Some(()))
                .unwrap();
        }
        assert_eq!(attempts.start().await.unwrap().number, 2);
        let e = attempts
            .failed::<()>(Failure::Sent(refused_stream()), None)
            .unwrap_err();
        assert_eq!(e.flag(), "URX,UR");
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_policy_does_not_retry_is_answered_at_once() {
        let (proxy, decision) = proxy(2, 3);
        let mut attempts = http(&proxy, &decision, RetryPolicy::ISTIO);
        attempts.start().await.unwrap();
        // Istio's default does not resend after a reset.
        let e = attempts
            .failed(Failure::Sent(reset()), Some(()))
            .unwrap_err();
        assert_eq!(e.flag(), "UC");
        // A reset before the request left is retried whatever the policy says...
        let mut attempts = Attempts::new(
            &proxy,
            (&decision, ANY),
            "api",
            RetryPolicy {
                num_retries: 1,
                ..RetryPolicy::NONE
            },
            Some(Resource::Requests),
        );
        attempts.start().await.unwrap();
        assert!(attempts.failed(Failure::Unsent(reset()), Some(())).is_ok());
        // ...but a request whose body streamed away cannot go again.
        let mut reset_policy = RetryPolicy {
            num_retries: 2,
            ..RetryPolicy::NONE
        };
        reset_policy.reset = true;
        let mut attempts = http(&proxy, &decision, reset_policy);
        attempts.start().await.unwrap();
        let e = attempts
            .failed::<()>(Failure::Sent(reset()), None)
            .unwrap_err();
        assert_eq!(e.flag(), "UC");
        // A failed connect to an original destination has nowhere else to go.
        let mut attempts = Attempts::new(
            &proxy,
            (&Decision::Passthrough, ANY),
            "PassthroughCluster",
            RetryPolicy::ISTIO,
            Some(Resource::Requests),
        );
        attempts.start().await.unwrap();
        let e = attempts
            .failed(Failure::Unsent(refused()), Some(()))
            .unwrap_err();
        assert_eq!(e.flag(), "UF");
    }

    /// A policy retrying 503 responses `num_retries` times.
    fn retrying_503(num_retries: u8) -> RetryPolicy {
        let mut policy = RetryPolicy {
            num_retries,
            ..RetryPolicy::NONE
        };
        policy.status_codes = StatusSet::EMPTY.with(503);
        policy
    }

    #[tokio::test(start_paused = true)]
    async fn retriable_statuses_are_retried_then_delivered_with_urx() {
        let (proxy, decision) = proxy(2, 3);
        let mut attempts = http(&proxy, &decision, retrying_503(2));
        attempts.start().await.unwrap();
        // The request to send again is made only for a response that is retried.
        let mut made = 0;
        assert_eq!(
            attempts.answered((200, &()), None, || {
                made += 1;
                Some(())
            }),
            Answer::Deliver(None)
        );
        assert_eq!(made, 0);
        assert_eq!(
            attempts.answered((503, &()), None, || {
                made += 1;
                Some(())
            }),
            Answer::Retry(())
        );
        assert_eq!(made, 1);
        attempts.start().await.unwrap();
        // A request that cannot be sent again gets the response as it is.
        assert_eq!(
            attempts.answered((503, &()), None, || None::<()>),
            Answer::Deliver(Some("URX"))
        );
        assert_eq!(
            attempts.answered((503, &()), None, || Some(())),
            Answer::Retry(())
        );
        attempts.start().await.unwrap();
        assert_eq!(
            attempts.answered((503, &()), None, || Some(())),
            Answer::Deliver(Some("URX"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_counted_in_envoys_per_cluster_retry_stats() {
        let (proxy, decision) = proxy(2, 3);
        let policy = retrying_503(1);
        // Answered at once; retried once and answered; retried once and 503 again, with no
        // attempt left.
        for statuses in [&[200][..], &[503, 200], &[503, 503]] {
            let mut attempts = http(&proxy, &decision, policy.clone());
            for &status in statuses {
                attempts.start().await.unwrap();
                if attempts.answered((status, &()), None, || Some(())) != Answer::Retry(()) {
                    break;
                }
            }
        }
        let count = |family: &ClusterCounter| {
            let labels = ClusterLabels {
                cluster_name: Label("api".into()),
            };
            family.get_or_create(&labels).get()
        };
        let m = &proxy.metrics;
        assert_eq!(count(&m.upstream_rq_retry), 2);
        assert_eq!(count(&m.upstream_rq_retry_success), 1);
        assert_eq!(count(&m.upstream_rq_retry_limit_exceeded), 1);
        assert_eq!(count(&m.upstream_rq_retry_overflow), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_statuses_of_a_trailers_only_response_are_retried_as_the_policy_says() {
        let (proxy, decision) = proxy(3, 3);
        // Istio's default: `unavailable` (14) and `cancelled` (1), whatever the HTTP status.
        let mut attempts = http(&proxy, &decision, RetryPolicy::ISTIO);
        attempts.start().await.unwrap();
        assert_eq!(
            attempts.answered((200, &()), Some(14), || Some(())),
            Answer::Retry(())
        );
        attempts.start().await.unwrap();
        assert_eq!(
            attempts.answered((200, &()), Some(1), || Some(())),
            Answer::Retry(())
        );
        attempts.start().await.unwrap();
        assert_eq!(
            attempts.answered((200, &()), Some(14), || Some(())),
            Answer::Deliver(Some("URX"))
        );
        let mut attempts = http(&proxy, &decision, RetryPolicy::ISTIO);
        attempts.start().await.unwrap();
        // `internal` (13) is not among them, nor is a plain 200.
        assert_eq!(
            attempts.answered((200, &()), Some(13), || Some(())),
            Answer::Deliver(None)
        );
        assert_eq!(
            attempts.answered((200, &()), Some(0), || Some(())),
            Answer::Deliver(None)
        );
        let policy = RetryPolicy::from_envoy(&portcullis_envoy::RetryPolicy {
            retry_on: vec!["internal".into(), "deadline-exceeded".into()],
            num_retries: 1,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            avoid_previous_hosts: true,
            host_selection_retry_max_attempts: 5,
            previous_priorities: None,
            retry_back_off: None,
        })
        .unwrap();
        assert!(policy.retry_grpc(13) && policy.retry_grpc(4));
        assert!(!policy.retry_grpc(14) && !policy.retry_grpc(99));
    }

    #[tokio::test(start_paused = true)]
    async fn a_routes_back_off_sets_the_first_ceiling_and_the_cap() {
        let (proxy, decision) = proxy(5, 5);
        let policy = RetryPolicy::from_envoy(&portcullis_envoy::RetryPolicy {
            retry_on: vec!["connect-failure".into()],
            num_retries: 4,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            avoid_previous_hosts: true,
            host_selection_retry_max_attempts: 5,
            previous_priorities: None,
            retry_back_off: Some(Box::new(portcullis_envoy::RetryBackOff {
                base_interval: Duration::from_secs(1),
                max_interval: Some(Duration::from_secs(3)),
            })),
        })
        .unwrap();
        // Ceilings of 1 s, 2 s, then 3 s (the cap) twice; each wait is below its ceiling,
        // and over 50 requests the last waits go past the base (odds of missing: 3^-50).
        let mut longest_last = Duration::ZERO;
        for _ in 0..50 {
            let mut attempts = http(&proxy, &decision, policy.clone());
            let mut waits = Vec::new();
            loop {
                let before = Instant::now();
                attempts.start().await.unwrap();
                waits.push(before.elapsed());
                if attempts
                    .failed(Failure::Unsent(refused()), Some(()))
                    .is_err()
                {
                    break;
                }
            }
            assert_eq!(waits.len(), 5);
            for (wait, ceiling) in waits[1..].iter().zip([1, 2, 3, 3]) {
                assert!(*wait < Duration::from_secs(ceiling), "{waits:?}");
            }
            longest_last = longest_last.max(waits[4]);
        }
        assert!(longest_last > Duration::from_secs(1), "{longest_last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn max_retries_turns_a_due_retry_into_the_answer_with_uo() {
        let (proxy, decision) = proxy(2, 0);
        let mut policy = RetryPolicy::ISTIO;
        policy.five_xx = true;
        let mut attempts = http(&proxy, &decision, policy);
        attempts.start().await.unwrap();
        assert_eq!(
            attempts.answered((500, &()), None, || Some(())),
            Answer::Deliver(Some("UO"))
        );
        let e = attempts
            .failed(Failure::Unsent(refused()), Some(()))
            .unwrap_err();
        assert_eq!(e.flag(), "UO,UF");
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeouts_are_retried_as_resets_within_the_route_timeout() {
        let (proxy, decision) = proxy(3, 3);
        let mut policy = RetryPolicy {
            num_retries: 2,
            ..RetryPolicy::NONE
        };
        policy.per_try_timeout = Some(Duration::from_secs(1));
        policy.reset = true;
        let hang = || async {
            std::future::pending::<()>().await;
            Ok::<(), Failure>(())
        };
        // Three attempts of one second each: out of retries, Envoy's `URX,UT` and 504.
        let mut attempts = http(&proxy, &decision, policy.clone());
        let start = Instant::now();
        let error = loop {
            attempts.start().await.unwrap();
            let failure = attempts.send(hang()).await.unwrap_err();
            if let Err(e) = attempts.failed(failure, Some(())) {
                break e;
            }
        };
        assert_eq!(error.flag(), "URX,UT");
        assert_eq!(error.to_response().status(), 504);
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(3), "{took:?}");
        assert!(took < Duration::from_millis(3100), "{took:?}");
        // The route timeout covers every attempt: it ends the second one.
        let mut attempts =
            http(&proxy, &decision, policy).with_timeout(Some(Duration::from_millis(1500)));
        let start = Instant::now();
        let error = loop {
            let started = attempts.start().await;
            let failure = match started {
                Ok(_) => attempts.send(hang()).await.unwrap_err(),
                Err(e) => break e,
            };
            if let Err(e) = attempts.failed(failure, Some(())) {
                break e;
            }
        };
        // The route timeout is not an attempt's failure: no `URX`, whatever came before.
        assert_eq!(error.flag(), "UT");
        assert_eq!(error.to_response().status(), 504);
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
    }
}
