//! VirtualServices compiled into routes as istiod compiles them for a sidecar
//! (`pilot/pkg/networking/core/route/route.go`, `route/retry/retry.go`, and the TLS and TCP
//! routes of its outbound listeners).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use portcullis_envoy::{
    AbortError, AppendAction, ClusterSpecifier, Denominator, DirectBody, FaultAbort, FaultDelay,
    Forward, FractionalPercent, HashPolicy, HeaderMatch, HeaderMatcher, HeaderValueOption,
    HttpFault, PathMatch, QueryParameterMatcher, Redirect, RegexRewrite, RequestMirrorPolicy,
    RetryBackOff, RetryPolicy, Route, RouteAction, RouteMatch, StringMatcher, StringPattern,
    WeightedCluster,
};
use portcullis_model::{
    DerivePort, Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, Object,
    Percent, StringMatch, VirtualServiceSpec,
};

use super::{Builder, labels_match, visible};
use crate::order::Age;

/// `retryOn` conditions the data path tells apart; others are accepted and not acted on.
const RETRY_ON_APPLIED: [&str; 14] = [
    "5xx",
    "gateway-error",
    "reset",
    // A request that never left is always sent again while attempts last.
    "reset-before-request",
    "connect-failure",
    "refused-stream",
    "retriable-status-codes",
    "retriable-4xx",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    // A VirtualService has no field for the headers, and the sidecar drops a client's
    // `x-envoy-retriable-header-names`: as in Envoy, nothing is retried for it.
    "retriable-headers",
];

/// A VirtualService with the name it is reported by.
pub(super) type Vs<'a> = &'a Object<VirtualServiceSpec>;

/// A host written in a VirtualService or destination as istiod resolves it: a short name
/// (no dot) is a Kubernetes service of `namespace`.
pub(super) fn fqdn(host: &str, namespace: &str, domain: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.contains('.') || host == "*" {
        host
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// Whether a VirtualService host covers a service host: equal, or a wildcard over it.
/// `Some(specificity)` (exact beats any wildcard, a longer wildcard a shorter one).
fn covers(vs_host: &str, service_host: &str) -> Option<(bool, usize)> {
    if vs_host == service_host {
        return Some((true, vs_host.len()));
    }
    let suffix = vs_host.strip_prefix('*')?;
    let service = service_host.strip_prefix('*').unwrap_or(service_host);
    (service.ends_with(suffix) && service.len() > suffix.len()).then_some((false, suffix.len()))
}

/// What istiod warns about or leaves out of a VirtualService, named by field.
pub(super) fn unapplied(o: &Object<VirtualServiceSpec>) -> Vec<String> {
    let mut parts = Vec::new();
    if !o.spec.applies_to_sidecars() {
        parts.push(
            "spec.gateways does not name `mesh`: the rules are for gateways, not this sidecar"
                .to_string(),
        );
    }
    for (i, h) in o.spec.http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        let mut not_yet = |what: &str| parts.push(format!("{at}.{what} is not applied yet"));
        if let Some(f) = &h.fault {
            if f.delay
                .as_ref()
                .is_some_and(|d| d.exponential_delay.is_some())
            {
                not_yet("fault.delay.exponentialDelay");
            }
            if f.abort.as_ref().is_some_and(|a| a.http2_error.is_some()) {
                not_yet("fault.abort.http2Error");
            }
        }
        if h.cors_policy.is_some() {
            not_yet("corsPolicy");
        }
        if h.delegate.is_some() {
            not_yet("delegate");
        }
        if let Some(r) = &h.retries {
            for condition in r.retry_on.split(',').map(str::trim) {
                if !condition.is_empty()
                    && condition.parse::<u16>().is_err()
                    && !RETRY_ON_APPLIED.contains(&condition)
                {
                    not_yet(&format!("retries.retryOn {condition:?}"));
                }
            }
        }
        if h.matches.iter().any(|m| m.stat_prefix.is_some()) {
            not_yet("match.statPrefix");
        }
        if h.route.len() > 1
            && h.route.iter().any(|d| {
                d.headers
                    .as_ref()
                    .is_some_and(|h| operations(h).authority.is_some())
            })
        {
            not_yet("route[].headers authority (per destination of a weighted route)");
        }
    }
    if o.spec
        .tcp
        .iter()
        .flat_map(|t| &t.matches)
        .any(|m| m.source_subnet.is_some())
    {
        parts.push("spec.tcp[].match.sourceSubnet is not applied".to_string());
    }
    parts
        .into_iter()
        .map(|part| {
            format!(
                "VirtualService {}/{}: {part}",
                o.meta.namespace, o.meta.name
            )
        })
        .collect()
}

impl<'a> Builder<'a> {
    /// The VirtualService whose rules apply to `host` on `port` for this sidecar: visible,
    /// bound to the mesh, imported by the Sidecar, naming the host exactly or by the most
    /// specific wildcard; among equals the oldest, as istiod orders them.
    pub(super) fn virtual_service_for(&self, host: &str, port: u16) -> Option<Vs<'a>> {
        let domain = &self.options.cluster_domain;
        let proxy_ns = &self.options.namespace;
        let mut best: Option<((bool, usize), Age, Vs<'a>)> = None;
        for vs in &self.virtual_services {
            let ns = &vs.meta.namespace;
            if !vs.spec.applies_to_sidecars() || !visible(&vs.spec.export_to, ns, proxy_ns) {
                continue;
            }
            let rank = vs
                .spec
                .hosts
                .iter()
                .map(|h| fqdn(h, ns, domain))
                .filter(|h| self.imports(ns, h, Some(port)))
                .filter_map(|h| covers(&h, host))
                .max();
            let Some(rank) = rank else { continue };
            let age = Age::new(vs.meta.creation_timestamp.as_deref(), &vs.meta.name, ns);
            let better = match &best {
                None => true,
                Some((r, a, _)) => rank > *r || (rank == *r && age < *a),
            };
            if better {
                best = Some((rank, age, vs));
            }
        }
        best.map(|(_, _, vs)| vs)
    }

    /// Warns about each host of a VirtualService for this sidecar that names no service it
    /// has: istiod would still give such a host a virtual host on port 80; portcullis
    /// applies rules only to registered services.
    pub(super) fn unmatched_virtual_service_hosts(&mut self, ports: &BTreeMap<String, Vec<u16>>) {
        let domain = &self.options.cluster_domain;
        let proxy_ns = &self.options.namespace;
        for vs in &self.virtual_services {
            let ns = &vs.meta.namespace;
            if !vs.spec.applies_to_sidecars() || !visible(&vs.spec.export_to, ns, proxy_ns) {
                continue;
            }
            for host in &vs.spec.hosts {
                let host = fqdn(host, ns, domain);
                if !ports.keys().any(|service| covers(&host, service).is_some()) {
                    self.vs_warnings.insert(format!(
                        "VirtualService {ns}/{}: host {host} is no registered service of this proxy; its rules apply to nothing here (register it with a ServiceEntry)",
                        vs.meta.name
                    ));
                }
            }
        }
    }

    /// Whether a match's source conditions hold for this sidecar: gateways naming `mesh`
    /// when it names any, else its labels within the workload's and its namespace.
    fn source_matches(&self, m: &HttpMatchRequest) -> bool {
        source_holds(
            &m.gateways,
            &m.source_labels,
            &m.source_namespace,
            &self.options.workload_labels,
            &self.options.namespace,
        )
    }

    /// The cluster a destination names, as istiod's `GetDestinationCluster`: the port given,
    /// else the service's only port, else the listener's.
    pub(super) fn destination_cluster(
        &self,
        d: &Destination,
        namespace: &str,
        listener_port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> String {
        let host = fqdn(&d.host, namespace, &self.options.cluster_domain);
        let port = match (&d.port, ports.get(&host).map(Vec::as_slice)) {
            (Some(p), _) => p.number,
            (None, Some([only])) => u32::from(*only),
            (None, _) => u32::from(listener_port),
        };
        format!("outbound|{port}|{}|{host}", d.subset)
    }

    /// The hash policy of a destination's DestinationRule (its subset's and port's
    /// settings merged over the rule's), as istiod's `hashForHTTPDestination`.
    fn destination_hash(
        &self,
        d: &Destination,
        namespace: &str,
        listener_port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> Option<HashPolicy> {
        let host = fqdn(&d.host, namespace, &self.options.cluster_domain);
        let port = match (&d.port, ports.get(&host).map(Vec::as_slice)) {
            (Some(p), _) => u16::try_from(p.number).ok()?,
            (None, Some([only])) => *only,
            (None, _) => listener_port,
        };
        self.hash_for(&host, &d.subset, port)
    }

    /// The routes of `vs` for a virtual host on `port`, in order, ending at the first
    /// catch-all; `None` when no route applies to this sidecar on this port (istiod then
    /// leaves the service its default route).
    pub(super) fn http_routes(
        &mut self,
        vs: Vs<'_>,
        port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> Option<Vec<Route>> {
        let mut out = Vec::new();
        'http: for http in &vs.spec.http {
            if http.delegate.is_some() {
                continue;
            }
            let matches: Vec<Option<&HttpMatchRequest>> = if http.matches.is_empty() {
                vec![None]
            } else {
                http.matches.iter().map(Some).collect()
            };
            for m in matches {
                if let Some(m) = m
                    && (m.port.is_some_and(|p| p != 0 && p != u32::from(port))
                        || !self.source_matches(m))
                {
                    continue;
                }
                let Some(route) = self.http_route(vs, http, m, port, ports) else {
                    continue;
                };
                let catch_all = is_catch_all(&route.route_match);
                out.push(route);
                if catch_all {
                    break 'http;
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }

    fn http_route(
        &mut self,
        vs: Vs<'_>,
        http: &HttpRoute,
        m: Option<&HttpMatchRequest>,
        port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> Option<Route> {
        let mut name = http.name.clone();
        if let Some(match_name) = m.map(|m| m.name.as_str()).filter(|n| !n.is_empty()) {
            name = format!("{name}.{match_name}");
        }
        let ops = http.headers.as_ref().map(operations).unwrap_or_default();
        let action = if let Some(r) = &http.redirect {
            let status = match r.redirect_code.unwrap_or(301) {
                code @ (301 | 302 | 303 | 307 | 308) => code as u16,
                code => {
                    self.vs_warnings.insert(format!(
                        "VirtualService {}/{}: redirect code {code} is not supported (as istiod); the route is left out",
                        vs.meta.namespace, vs.meta.name
                    ));
                    return None;
                }
            };
            RouteAction::Redirect(Box::new(redirect(r, port, status)))
        } else if let Some(d) = &http.direct_response {
            RouteAction::DirectResponse {
                status: u16::try_from(d.status).ok()?,
                body: d.body.as_ref().and_then(|b| match (&b.string, &b.bytes) {
                    (Some(s), _) => Some(DirectBody::String(s.clone())),
                    (None, Some(bytes)) => Some(DirectBody::Bytes(bytes.clone())),
                    (None, None) => None,
                }),
            }
        } else {
            RouteAction::Forward(Arc::new(self.forward(
                vs,
                http,
                port,
                ports,
                ops.authority.clone(),
            )))
        };
        let mut route = Route::new(name, route_match(m), action);
        route.request_headers_to_add = ops.request_add;
        route.request_headers_to_remove = ops.request_remove;
        route.response_headers_to_add = ops.response_add;
        route.response_headers_to_remove = ops.response_remove;
        if let RouteAction::Forward(_) = &route.action
            && let [only] = &http.route[..]
            && let Some(dst) = only.headers.as_ref().map(operations)
        {
            // A single destination's header changes go on the route, after its own.
            route.request_headers_to_add.extend(dst.request_add);
            route.request_headers_to_remove.extend(dst.request_remove);
            route.response_headers_to_add.extend(dst.response_add);
            route.response_headers_to_remove.extend(dst.response_remove);
        }
        route.fault = http.fault.as_ref().map(|f| Box::new(fault(f)));
        Some(route)
    }

    fn forward(
        &self,
        vs: Vs<'_>,
        http: &HttpRoute,
        port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
        authority: Option<String>,
    ) -> Forward {
        let ns = vs.meta.namespace.as_str();
        let cluster = |d: &Destination| self.destination_cluster(d, ns, port, ports);
        let mut host_rewrite = authority;
        let (mut prefix_rewrite, mut regex_rewrite) = (None, None);
        if let Some(rw) = &http.rewrite {
            if let Some(r) = &rw.uri_regex_rewrite {
                regex_rewrite = Some(RegexRewrite {
                    pattern: r.pattern.clone(),
                    substitution: r.rewrite.clone(),
                });
            } else if let Some(uri) = rw.uri.as_ref().filter(|u| !u.is_empty()) {
                prefix_rewrite = Some(uri.clone());
            }
            if let Some(a) = rw.authority.as_ref().filter(|a| !a.is_empty()) {
                host_rewrite = Some(a.clone());
            }
        }
        let hash = |d: &Destination| self.destination_hash(d, ns, port, ports);
        let mut hash_policy = Vec::new();
        let mut consistent_hash = false;
        let specifier = match &http.route[..] {
            [only] => {
                if host_rewrite.is_none() {
                    host_rewrite = only.headers.as_ref().and_then(|h| operations(h).authority);
                }
                hash_policy.extend(hash(&only.destination));
                consistent_hash = !hash_policy.is_empty();
                ClusterSpecifier::Cluster(cluster(&only.destination))
            }
            several => ClusterSpecifier::Weighted(
                several
                    .iter()
                    .filter(|d| d.weight != 0)
                    .map(|d| {
                        // Each destination's hash policy is appended, as istiod does.
                        hash_policy.extend(hash(&d.destination));
                        let ops = d.headers.as_ref().map(operations).unwrap_or_default();
                        WeightedCluster {
                            request_headers_to_add: ops.request_add,
                            request_headers_to_remove: ops.request_remove,
                            response_headers_to_add: ops.response_add,
                            response_headers_to_remove: ops.response_remove,
                            ..WeightedCluster::new(
                                cluster(&d.destination),
                                u32::try_from(d.weight).unwrap_or(0),
                            )
                        }
                    })
                    .collect(),
            ),
        };
        let mut mirrors = Vec::new();
        if let Some(m) = &http.mirror
            && let Some(fraction) = mirror_percent(http.mirror_percentage, http.mirror_percent)
        {
            mirrors.push(RequestMirrorPolicy {
                cluster: cluster(m),
                runtime_fraction: Some(fraction),
            });
        }
        for m in &http.mirrors {
            if let Some(fraction) = mirror_percent(m.percentage, None) {
                mirrors.push(RequestMirrorPolicy {
                    cluster: cluster(&m.destination),
                    runtime_fraction: Some(fraction),
                });
            }
        }
        Forward {
            cluster: specifier,
            // istiod disables the route timeout unless the VirtualService sets one.
            timeout: Some(http.timeout.unwrap_or(Duration::ZERO)),
            idle_timeout: None,
            retry_policy: retry_policy(http.retries.as_ref(), consistent_hash)
                .map(super::compile::shared_retry_policy),
            host_rewrite_literal: host_rewrite,
            prefix_rewrite,
            regex_rewrite,
            request_mirror_policies: mirrors,
            hash_policy,
        }
    }
}

/// Whether source conditions of a match (gateways, labels, namespace) hold for a sidecar
/// with `labels` in `namespace`.
pub(super) fn source_holds(
    gateways: &[String],
    source_labels: &BTreeMap<String, String>,
    source_namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace: &str,
) -> bool {
    if !gateways.is_empty() {
        return gateways.iter().any(|g| g == "mesh");
    }
    labels_match(source_labels, labels)
        && (source_namespace.is_empty() || source_namespace == namespace)
}

/// Istio's `IsCatchAllRoute`: `/` (or the regex `*`) with no header or query condition.
fn is_catch_all(m: &RouteMatch) -> bool {
    let any_path = match &m.path {
        PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => p == "/",
        PathMatch::Regex(r) => r == "*",
        PathMatch::Path(_) => false,
    };
    any_path && m.headers.is_empty() && m.query_parameters.is_empty()
}

/// The header changes of a `headers` block, as istiod's `TranslateHeadersOperations`.
#[derive(Default)]
struct Operations {
    request_add: Vec<HeaderValueOption>,
    request_remove: Vec<String>,
    response_add: Vec<HeaderValueOption>,
    response_remove: Vec<String>,
    /// A `:authority`/`host` set (or added): a host rewrite, not a header.
    authority: Option<String>,
}

/// Headers istiod does not let a VirtualService touch: pseudo-headers and `host`.
fn internal(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

fn authority_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

fn operations(h: &Headers) -> Operations {
    let empty = HeaderOperations::default();
    let request = h.request.as_ref().unwrap_or(&empty);
    let response = h.response.as_ref().unwrap_or(&empty);
    let to_add = |map: &BTreeMap<String, String>, append: AppendAction| -> Vec<HeaderValueOption> {
        map.iter()
            .filter(|(name, _)| !internal(name))
            .map(|(name, value)| HeaderValueOption {
                name: name.to_ascii_lowercase(),
                value: value.clone(),
                append,
            })
            .collect()
    };
    let authority = |map: &BTreeMap<String, String>| {
        map.iter()
            .rfind(|(name, _)| authority_header(name))
            .map(|(_, v)| v.clone())
    };
    let remove = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|n| !internal(n))
            .map(|n| n.to_ascii_lowercase())
            .collect()
    };
    let mut request_add = to_add(&request.set, AppendAction::OverwriteIfExistsOrAdd);
    request_add.extend(to_add(&request.add, AppendAction::AppendIfExistsOrAdd));
    let mut response_add = to_add(&response.set, AppendAction::OverwriteIfExistsOrAdd);
    response_add.extend(to_add(&response.add, AppendAction::AppendIfExistsOrAdd));
    Operations {
        request_add,
        request_remove: remove(&request.remove),
        response_add,
        response_remove: remove(&response.remove),
        authority: authority(&request.set).or_else(|| authority(&request.add)),
    }
}

/// A `StringMatch` as Envoy's; `None` when it is a presence check (empty, or the regex `*`).
fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), _, _) => StringPattern::Exact(e.clone()),
        (_, Some(p), _) => StringPattern::Prefix(p.clone()),
        (_, _, Some(r)) if r != "*" => StringPattern::Regex(r.clone()),
        _ => return None,
    };
    Some(StringMatcher {
        pattern,
        ignore_case: false,
    })
}

fn header_matcher(name: &str, m: &StringMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        matcher: string_matcher(m).map_or(HeaderMatch::Present(true), HeaderMatch::String),
        invert_match: false,
        treat_missing_header_as_empty: false,
    }
}

/// istiod's `TranslateRouteMatch`: headers sorted by name (`withoutHeaders` inverted),
/// then method, authority and scheme; the uri as path, prefix or regex; case sensitive
/// unless `ignoreUriCase`.
fn route_match(m: Option<&HttpMatchRequest>) -> RouteMatch {
    let Some(m) = m else {
        return RouteMatch::any();
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, value)| header_matcher(name, value))
        .collect();
    for (name, value) in &m.without_headers {
        let mut h = header_matcher(name, value);
        h.invert_match = true;
        // A missing header is an empty one, so that "not equal to x" holds for it; a
        // presence check inverted already holds for a missing header.
        h.treat_missing_header_as_empty = !matches!(h.matcher, HeaderMatch::Present(_));
        headers.push(h);
    }
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    for (name, value) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(value) = value {
            headers.push(header_matcher(name, value));
        }
    }
    let path = match m.uri.as_ref() {
        Some(StringMatch { exact: Some(p), .. }) => PathMatch::Path(p.clone()),
        Some(StringMatch {
            prefix: Some(p), ..
        }) => PathMatch::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => PathMatch::Regex(r.clone()),
        _ => PathMatch::Prefix("/".to_string()),
    };
    RouteMatch {
        path,
        case_sensitive: !m.ignore_uri_case,
        headers,
        query_parameters: m
            .query_params
            .iter()
            .map(|(name, value)| QueryParameterMatcher {
                name: name.clone(),
                matcher: string_matcher(value),
            })
            .collect(),
    }
}

/// istiod's `ApplyRedirect`: a derived or given port, left out where it is the scheme's
/// default.
fn redirect(r: &portcullis_model::HttpRedirect, listener_port: u16, status: u16) -> Redirect {
    let mut port = match (r.port, r.derive_port) {
        (Some(p), _) => u16::try_from(p).ok(),
        (None, Some(DerivePort::FromRequestPort)) => Some(listener_port),
        (None, _) => None,
    };
    if r.port.is_some() || r.derive_port.is_some() {
        let scheme = r.scheme.as_deref().unwrap_or("http");
        if matches!((port, scheme), (Some(80), "http") | (Some(443), "https")) {
            port = None;
        }
    }
    Redirect {
        scheme: r.scheme.clone().filter(|s| !s.is_empty()),
        host: r.authority.clone().filter(|a| !a.is_empty()),
        port,
        path: r.uri.clone().filter(|u| !u.is_empty()),
        prefix_rewrite: None,
        status,
        strip_query: false,
    }
}

/// Istio's `Percent` as Envoy's: parts per million.
fn per_million(p: Percent) -> FractionalPercent {
    FractionalPercent {
        numerator: (p.value * 10_000.0) as u32,
        denominator: Denominator::Million,
    }
}

fn per_hundred(p: i64) -> FractionalPercent {
    FractionalPercent {
        numerator: u32::try_from(p).unwrap_or(0),
        denominator: Denominator::Hundred,
    }
}

/// istiod's `MirrorPercent`: all unless set; an explicit zero mirrors nothing (`None`).
fn mirror_percent(percentage: Option<Percent>, percent: Option<i64>) -> Option<FractionalPercent> {
    match (percentage, percent) {
        (Some(p), _) => (p.value > 0.0).then(|| per_million(p)),
        (None, Some(p)) => (p > 0).then(|| per_hundred(p)),
        (None, None) => Some(per_hundred(100)),
    }
}

/// istiod's `TranslateFault`; a delay without a fixed duration and an abort without an
/// HTTP or gRPC status (an HTTP/2 error, which istiod drops too) are left out.
fn fault(f: &portcullis_model::HttpFaultInjection) -> HttpFault {
    let delay = f.delay.as_ref().and_then(|d| {
        Some(FaultDelay {
            fixed_delay: d.fixed_delay?,
            percentage: match d.percentage {
                Some(p) => per_million(p),
                None => per_hundred(d.percent.unwrap_or(0)),
            },
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let error = match (a.http_status, a.grpc_code()) {
            (Some(status), _) => AbortError::HttpStatus(u16::try_from(status).ok()?),
            (None, Some(code)) => AbortError::GrpcStatus(code),
            (None, None) => return None,
        };
        Some(FaultAbort {
            error,
            percentage: a.percentage.map_or(per_hundred(0), per_million),
        })
    });
    HttpFault { delay, abort }
}

/// Istio's default retry policy for outbound routes (see `compile::istio_retry_policy`).
fn default_retry_policy() -> RetryPolicy {
    super::compile::istio_retry_policy()
}

/// istiod's `retry.ConvertPolicy`: the default without `retries`, none with `attempts: 0`;
/// else the default with the attempts, conditions (status codes among them become
/// `retriable-status-codes`), per-try timeout and host predicate given. A route that
/// hashes to its host (`consistent_hash`) does not avoid previous hosts unless asked to.
pub(super) fn retry_policy(
    r: Option<&portcullis_model::HttpRetry>,
    consistent_hash: bool,
) -> Option<RetryPolicy> {
    let mut policy = default_retry_policy();
    policy.avoid_previous_hosts = !consistent_hash;
    let Some(r) = r else {
        return Some(policy);
    };
    if r.attempts <= 0 {
        return None;
    }
    policy.num_retries = u32::try_from(r.attempts).unwrap_or(u32::MAX);
    if !r.retry_on.is_empty() {
        let mut on = Vec::new();
        let mut codes = Vec::new();
        for part in r
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match part.parse::<u16>() {
                Ok(code) if (100..600).contains(&code) => codes.push(code),
                _ => on.push(part.to_string()),
            }
        }
        if !codes.is_empty() && !on.iter().any(|c| c == "retriable-status-codes") {
            on.push("retriable-status-codes".to_string());
        }
        policy.retry_on = on;
        policy.retriable_status_codes = codes;
    }
    policy.per_try_timeout = r.per_try_timeout;
    policy.retry_back_off = r.backoff.map(|base_interval| {
        Box::new(RetryBackOff {
            base_interval,
            max_interval: None,
        })
    });
    if let Some(avoid) = r.retry_ignore_previous_hosts {
        policy.avoid_previous_hosts = avoid;
    }
    // istiod's `previous_priorities` retry priority, updated every second attempt.
    if r.retry_remote_localities == Some(true) {
        policy.previous_priorities = Some(2);
    }
    Some(policy)
}

/// Where a TLS or TCP route sends connections: one cluster, or several by weight (zero
/// weights left out when there are several, as istiod does).
fn l4_target(
    b: &Builder<'_>,
    vs: Vs<'_>,
    route: &[portcullis_model::RouteDestination],
    port: u16,
    ports: &BTreeMap<String, Vec<u16>>,
) -> Option<ClusterSpecifier> {
    let ns = vs.meta.namespace.as_str();
    match route {
        [] => None,
        [only] => Some(ClusterSpecifier::Cluster(b.destination_cluster(
            &only.destination,
            ns,
            port,
            ports,
        ))),
        several => Some(ClusterSpecifier::Weighted(
            several
                .iter()
                .filter(|d| d.weight != 0)
                .map(|d| {
                    WeightedCluster::new(
                        b.destination_cluster(&d.destination, ns, port, ports),
                        u32::try_from(d.weight).unwrap_or(0),
                    )
                })
                .collect(),
        )),
    }
}

/// A TLS route's chain: the SNI names it matches and where it sends them.
pub(super) struct SniRoute {
    /// `server_names` of the chain.
    pub(super) server_names: Vec<String>,
    /// Where it goes.
    pub(super) target: ClusterSpecifier,
}

/// A TCP route's chain for destination ranges, or for the whole port (no ranges).
pub(super) struct SubnetRoute {
    /// `prefix_ranges` of the chain; empty for the service's own chains.
    pub(super) subnets: Vec<ipnet::IpNet>,
    /// Where it goes.
    pub(super) target: ClusterSpecifier,
}

impl Builder<'_> {
    /// The chains a VirtualService's `tls` routes give a TLS service on `port`, as istiod's
    /// `buildSidecarOutboundTLSFilterChainOpts`: one per match that holds on this port and
    /// for this sidecar; `None` without such a match (the service keeps its own chain).
    pub(super) fn tls_routes(
        &self,
        host: &str,
        port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> Option<Vec<SniRoute>> {
        let vs = self.virtual_service_for(host, port)?;
        let mut out = Vec::new();
        for route in &vs.spec.tls {
            for m in &route.matches {
                if m.port.is_some_and(|p| p != 0 && p != u32::from(port))
                    || !self.l4_source_holds(&m.gateways, &m.source_labels, &m.source_namespace)
                {
                    continue;
                }
                let Some(target) = l4_target(self, vs, &route.route, port, ports) else {
                    continue;
                };
                out.push(SniRoute {
                    server_names: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    target,
                });
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// The routes a VirtualService's `tcp` routes give a TCP service on `port`, as istiod's
    /// `buildSidecarOutboundTCPFilterChainOpts`: matches with destination subnets become
    /// chains of their own, in order; the first route that matches the port without subnets
    /// (or has no match) takes the service's own chains, and ends the list.
    pub(super) fn tcp_routes(
        &self,
        host: &str,
        port: u16,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> Vec<SubnetRoute> {
        let Some(vs) = self.virtual_service_for(host, port) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for route in &vs.spec.tcp {
            let Some(target) = l4_target(self, vs, &route.route, port, ports) else {
                continue;
            };
            if route.matches.is_empty() {
                out.push(SubnetRoute {
                    subnets: Vec::new(),
                    target,
                });
                return out;
            }
            for m in &route.matches {
                if m.port.is_some_and(|p| p != 0 && p != u32::from(port))
                    || !self.l4_source_holds(&m.gateways, &m.source_labels, &m.source_namespace)
                {
                    continue;
                }
                let subnets: Vec<ipnet::IpNet> = m
                    .destination_subnets
                    .iter()
                    .filter_map(|s| super::parse_net(s))
                    .collect();
                let whole_port = subnets.is_empty();
                out.push(SubnetRoute {
                    subnets,
                    target: target.clone(),
                });
                if whole_port {
                    return out;
                }
            }
        }
        out
    }

    fn l4_source_holds(
        &self,
        gateways: &[String],
        labels: &BTreeMap<String, String>,
        namespace: &str,
    ) -> bool {
        source_holds(
            gateways,
            labels,
            namespace,
            &self.options.workload_labels,
            &self.options.namespace,
        )
    }
}
