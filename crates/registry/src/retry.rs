//! A route's retry policy as the data path reads it: the conditions of Envoy's
//! `retry_policy`, compiled once per snapshot into flags and bit sets so that a request
//! decides a retry without comparing strings.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use crate::route::{HeaderCheck, Headers};

/// HTTP status codes below 640, as bits: a route's `retriable_status_codes` read per request
/// without an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// No status.
    pub const EMPTY: StatusSet = StatusSet([0; 10]);

    /// The set with `code` added; codes of 640 and above are left out (no such status).
    pub const fn with(mut self, code: u16) -> StatusSet {
        let i = (code / 64) as usize;
        if i < self.0.len() {
            self.0[i] |= 1 << (code % 64);
        }
        self
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: u16) -> bool {
        self.0
            .get(usize::from(code / 64))
            .is_some_and(|bits| bits & (1 << (code % 64)) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 10]
    }
}

/// The response headers of a `retriable-headers` policy: a response carrying any one of
/// them is retried.
#[derive(Debug)]
pub struct RetriableHeaders {
    checks: Box<[HeaderCheck]>,
    /// What they were compiled from, to compare policies.
    source: Box<[portcullis_envoy::HeaderMatcher]>,
}

impl RetriableHeaders {
    fn compile(
        matchers: &[portcullis_envoy::HeaderMatcher],
    ) -> Result<RetriableHeaders, regex::Error> {
        Ok(RetriableHeaders {
            checks: matchers
                .iter()
                .map(HeaderCheck::compile)
                .collect::<Result<_, _>>()?,
            source: matchers.into(),
        })
    }

    /// Whether a response head with `status` and `headers` matches one of them.
    pub fn any_in(&self, status: u16, headers: &dyn Headers) -> bool {
        self.checks.iter().any(|check| {
            let value = match check.name() {
                ":status" => Some(Cow::Owned(status.to_string())),
                name => headers.get(name),
            };
            check.matches_value(value)
        })
    }
}

impl PartialEq for RetriableHeaders {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// When a failed upstream attempt is made again: the conditions of Envoy's route
/// `retry_policy` that the data path tells apart. Its `Default` is Istio's.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// `num_retries`: attempts after the first.
    pub num_retries: u8,
    /// `retry_on: connect-failure`: no connection to the upstream could be made.
    pub connect_failure: bool,
    /// `retry_on: refused-stream`: an HTTP/2 upstream refused the stream (`REFUSED_STREAM`),
    /// so it never processed it (a request whose body was streamed away cannot go again).
    pub refused_stream: bool,
    /// `retry_on: reset`: the upstream reset or closed after the request was sent, before
    /// the response headers (a request whose body was streamed away cannot go again).
    pub reset: bool,
    /// The `previous_hosts` predicate: a retry goes to an endpoint not tried yet while the
    /// cluster has one. The pick excludes tried endpoints outright, so Envoy's
    /// `host_selection_retry_max_attempts` has nothing left to bound.
    pub previous_hosts: bool,
    /// `retry_on: 5xx`: the upstream answered with any 5xx status.
    pub five_xx: bool,
    /// `retry_on: gateway-error`: the upstream answered 502, 503 or 504.
    pub gateway_error: bool,
    /// `retry_on: retriable-status-codes`: the upstream answered one of these
    /// (`retriable-4xx` adds 409).
    pub status_codes: StatusSet,
    /// `retry_on`'s gRPC conditions (`cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`, `unavailable`): the `grpc-status` codes of a response head
    /// (a trailers-only gRPC response) that are retried, one bit per code.
    pub grpc_statuses: u32,
    /// `retry_on: retriable-headers`: the response headers that are retried (`None`
    /// without the condition or without headers).
    pub retriable_headers: Option<Arc<RetriableHeaders>>,
    /// The `previous_priorities` retry priority's update frequency: every that many
    /// attempts, retries leave the priorities already attempted.
    pub previous_priorities: Option<u32>,
    /// `per_try_timeout`: how long one attempt may wait for the response head.
    pub per_try_timeout: Option<Duration>,
    /// The first back-off ceiling (`retry_back_off.base_interval`).
    pub backoff_base: Duration,
    /// The highest back-off ceiling (`retry_back_off.max_interval`).
    pub backoff_max: Duration,
}

/// Envoy's default retry back-off base interval (`upstream.base_retry_backoff_ms`).
const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Envoy caps the back-off at ten times the base interval unless told otherwise.
const BACKOFF_CEILING_FACTOR: u32 = 10;

/// The `retry_on` names of gRPC conditions and the status codes they cover.
const GRPC_CONDITIONS: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

/// The bit of a gRPC status code in [`RetryPolicy::grpc_statuses`].
const fn grpc_bit(code: u32) -> u32 {
    1 << code
}

impl RetryPolicy {
    /// What istiod puts on every service route: `connect-failure,refused-stream,unavailable,
    /// cancelled,retriable-status-codes`, 2 retries, `previous_hosts`. No `reset`: a reset
    /// after the request was sent is answered at once (`UC`). `retriable-status-codes` with
    /// 503, as istiod's `DefaultPolicy` writes it.
    pub const ISTIO: RetryPolicy = RetryPolicy {
        num_retries: 2,
        connect_failure: true,
        refused_stream: true,
        reset: false,
        previous_hosts: true,
        five_xx: false,
        gateway_error: false,
        status_codes: StatusSet::EMPTY.with(503),
        grpc_statuses: grpc_bit(1) | grpc_bit(14),
        retriable_headers: None,
        previous_priorities: None,
        per_try_timeout: None,
        backoff_base: BACKOFF_BASE,
        backoff_max: BACKOFF_BASE.saturating_mul(BACKOFF_CEILING_FACTOR),
    };

    /// No retries: a route without a retry policy.
    pub const NONE: RetryPolicy = RetryPolicy {
        num_retries: 0,
        connect_failure: false,
        refused_stream: false,
        reset: false,
        previous_hosts: false,
        five_xx: false,
        gateway_error: false,
        status_codes: StatusSet::EMPTY,
        grpc_statuses: 0,
        retriable_headers: None,
        previous_priorities: None,
        per_try_timeout: None,
        backoff_base: BACKOFF_BASE,
        backoff_max: BACKOFF_BASE.saturating_mul(BACKOFF_CEILING_FACTOR),
    };

    /// Whether a response with `status` is retried (when attempts are left).
    pub fn retry_status(&self, status: u16) -> bool {
        (self.five_xx && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || self.status_codes.contains(status)
    }

    /// Whether a response head carrying `grpc-status: code` is retried.
    pub fn retry_grpc(&self, code: u32) -> bool {
        code < 32 && self.grpc_statuses & grpc_bit(code) != 0
    }

    /// Whether a response head with `status` and `headers` is retried for its headers.
    pub fn retry_headers(&self, status: u16, headers: &dyn Headers) -> bool {
        self.retriable_headers
            .as_ref()
            .is_some_and(|h| h.any_in(status, headers))
    }

    /// Whether some response head is retried.
    pub fn retries_statuses(&self) -> bool {
        self.five_xx
            || self.gateway_error
            || !self.status_codes.is_empty()
            || self.grpc_statuses != 0
            || self.retriable_headers.is_some()
    }

    /// Attempts in all, the first included.
    pub fn attempts(&self) -> usize {
        usize::from(self.num_retries) + 1
    }

    /// Whether another attempt may follow attempt `attempt` (0 for the first).
    pub fn another(&self, attempt: usize) -> bool {
        attempt + 1 < self.attempts()
    }

    /// Marks the endpoint `index` as tried, when retries avoid tried endpoints.
    pub fn tried(&self, tried: &mut Vec<usize>, index: Option<usize>) {
        if self.previous_hosts {
            tried.extend(index);
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::ISTIO
    }
}

impl RetryPolicy {
    /// The conditions of Envoy's `retry_policy` the data path tells apart; an error for a
    /// retriable header's regex that does not compile.
    pub fn from_envoy(policy: &portcullis_envoy::RetryPolicy) -> Result<RetryPolicy, regex::Error> {
        let on = |conditions: &[&str]| {
            policy
                .retry_on
                .iter()
                .any(|c| conditions.contains(&c.as_str()))
        };
        let retriable_headers =
            if on(&["retriable-headers"]) && !policy.retriable_headers.is_empty() {
                Some(Arc::new(RetriableHeaders::compile(
                    &policy.retriable_headers,
                )?))
            } else {
                None
            };
        Ok(RetryPolicy {
            num_retries: u8::try_from(policy.num_retries).unwrap_or(u8::MAX),
            // Envoy's `5xx` and `gateway-error` take in a failed connect and any reset, a
            // refused stream included.
            connect_failure: on(&["connect-failure", "5xx", "gateway-error"]),
            refused_stream: on(&["refused-stream", "reset", "5xx", "gateway-error"]),
            reset: on(&["reset", "5xx", "gateway-error"]),
            previous_hosts: policy.avoid_previous_hosts,
            five_xx: on(&["5xx"]),
            gateway_error: on(&["gateway-error"]),
            status_codes: {
                let listed = if on(&["retriable-status-codes"]) {
                    policy
                        .retriable_status_codes
                        .iter()
                        .fold(StatusSet::EMPTY, |set, &code| set.with(code))
                } else {
                    StatusSet::EMPTY
                };
                if on(&["retriable-4xx"]) {
                    listed.with(409)
                } else {
                    listed
                }
            },
            grpc_statuses: GRPC_CONDITIONS
                .iter()
                .filter(|(name, _)| on(&[name]))
                .fold(0, |bits, (_, code)| bits | grpc_bit(*code)),
            retriable_headers,
            previous_priorities: policy.previous_priorities.filter(|&f| f > 0),
            per_try_timeout: policy.per_try_timeout.filter(|t| !t.is_zero()),
            backoff_base: policy
                .retry_back_off
                .as_ref()
                .map_or(BACKOFF_BASE, |b| b.base_interval),
            backoff_max: policy.retry_back_off.as_ref().map_or(
                BACKOFF_BASE.saturating_mul(BACKOFF_CEILING_FACTOR),
                |b| {
                    b.max_interval
                        .unwrap_or(b.base_interval.saturating_mul(BACKOFF_CEILING_FACTOR))
                },
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_default_retries_connect_failures_twice_on_other_endpoints() {
        let policy = RetryPolicy::default();
        assert_eq!(policy, RetryPolicy::ISTIO);
        assert!(policy.connect_failure && policy.refused_stream && !policy.reset);
        assert_eq!(policy.attempts(), 3);
        assert!(policy.another(0) && policy.another(1) && !policy.another(2));
        let mut tried = Vec::new();
        policy.tried(&mut tried, Some(4));
        policy.tried(&mut tried, None);
        assert_eq!(tried, [4]);
        let anywhere = RetryPolicy {
            previous_hosts: false,
            ..policy
        };
        anywhere.tried(&mut tried, Some(5));
        assert_eq!(tried, [4]);
    }

    #[test]
    fn response_statuses_are_retried_as_the_route_says() {
        // Istio's default: only 503, through `retriable-status-codes`.
        let istio = RetryPolicy::ISTIO;
        assert!(istio.retries_statuses());
        assert!(istio.retry_status(503) && !istio.retry_status(502));
        assert!(!RetryPolicy::NONE.retries_statuses());

        let route = |retry_on: &[&str], codes: &[u16]| {
            RetryPolicy::from_envoy(&portcullis_envoy::RetryPolicy {
                retry_on: retry_on.iter().map(|c| (*c).to_owned()).collect(),
                num_retries: 2,
                per_try_timeout: None,
                retriable_status_codes: codes.to_vec(),
                retriable_headers: Vec::new(),
                avoid_previous_hosts: true,
                host_selection_retry_max_attempts: 5,
                previous_priorities: None,
                retry_back_off: None,
            })
            .unwrap()
        };
        let five = route(&["5xx"], &[]);
        assert!(five.retry_status(500) && five.retry_status(599) && !five.retry_status(404));
        // `5xx` also covers connect failures and resets, as in Envoy.
        assert!(five.connect_failure && five.reset);
        let gateway = route(&["gateway-error"], &[]);
        assert!(gateway.retry_status(502) && gateway.retry_status(504));
        assert!(!gateway.retry_status(500));
        // Codes count only under `retriable-status-codes`.
        let listed = route(&["retriable-status-codes"], &[409]);
        assert!(listed.retry_status(409) && !listed.retry_status(503));
        let unlisted = route(&["connect-failure"], &[409]);
        assert!(!unlisted.retries_statuses());
    }

    #[test]
    fn retriable_headers_count_only_under_their_condition_and_any_one_matches() {
        use portcullis_envoy::{HeaderMatch, HeaderMatcher, StringMatcher, StringPattern};

        struct Two;
        impl Headers for Two {
            fn get(&self, name: &str) -> Option<Cow<'_, str>> {
                match name {
                    "x-busy" => Some(Cow::Borrowed("yes")),
                    "x-load" => Some(Cow::Borrowed("high")),
                    _ => None,
                }
            }
        }
        let matcher = |name: &str, matcher| HeaderMatcher {
            name: name.to_owned(),
            matcher,
            invert_match: false,
            treat_missing_header_as_empty: false,
        };
        let exact = |v: &str| {
            HeaderMatch::String(StringMatcher {
                pattern: StringPattern::Exact(v.to_owned()),
                ignore_case: false,
            })
        };
        let policy = |retry_on: &str, headers: Vec<HeaderMatcher>| {
            RetryPolicy::from_envoy(&portcullis_envoy::RetryPolicy {
                retry_on: vec![retry_on.to_owned()],
                num_retries: 1,
                per_try_timeout: None,
                retriable_status_codes: Vec::new(),
                retriable_headers: headers,
                avoid_previous_hosts: true,
                host_selection_retry_max_attempts: 0,
                previous_priorities: None,
                retry_back_off: None,
            })
        };
        let headers = vec![
            matcher("x-load", exact("low")),
            matcher("x-busy", HeaderMatch::Present(true)),
        ];
        let on = policy("retriable-headers", headers.clone()).unwrap();
        assert!(on.retries_statuses());
        assert!(on.retry_headers(200, &Two));
        assert!(!on.retry_headers(200, &()));
        // Another condition: the headers are not read.
        let off = policy("5xx", headers).unwrap();
        assert_eq!(off.retriable_headers, None);
        assert!(!off.retry_headers(200, &Two));
        // The condition without headers retries nothing.
        assert_eq!(
            policy("retriable-headers", Vec::new())
                .unwrap()
                .retriable_headers,
            None
        );
        // `:status` is the response's status.
        let status = policy("retriable-headers", vec![matcher(":status", exact("429"))]).unwrap();
        assert!(status.retry_headers(429, &()) && !status.retry_headers(200, &()));
        let bad = HeaderMatch::String(StringMatcher {
            pattern: StringPattern::Regex("(".to_owned()),
            ignore_case: false,
        });
        assert!(policy("retriable-headers", vec![matcher("x-busy", bad)]).is_err());
    }
}
