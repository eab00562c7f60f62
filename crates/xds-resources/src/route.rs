//! RDS: `RouteConfiguration` into the model (also inline route configs of an HCM).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as rds;
use portcullis_envoy::json::FAULT_FILTER;
use portcullis_envoy::{
    AbortError, ClusterSpecifier, CookieAttribute, Denominator, DirectBody, FaultAbort, FaultDelay,
    Forward, FractionalPercent, HashKey, HashPolicy, HeaderMatch, HeaderMatcher, HttpFault,
    PathMatch, QueryParameterMatcher, Redirect, RegexRewrite, RequestBufferLimit,
    RequestMirrorPolicy, RetryBackOff, RetryPolicy, Route, RouteAction, RouteConfiguration,
    RouteMatch, StringMatcher, StringPattern, VirtualHost, WeightedCluster,
};

use crate::common::{
    At, Invalid, duration, each, headers_to_add, headers_to_remove, port, regex, string_matcher,
    unpack,
};

/// Envoy's default number of retries when a retry policy leaves it unset.
const DEFAULT_RETRIES: u32 = 1;

/// Converts a route configuration.
pub fn route_configuration(rc: &rds::RouteConfiguration) -> Result<RouteConfiguration, Invalid> {
    if rc.vhds.is_some() {
        return Err(Invalid::new("vhds", "VHDS is not supported"));
    }
    let virtual_hosts = each("virtual_hosts", &rc.virtual_hosts, virtual_host)?;
    // Envoy 1.40: "Only unique values for domains are permitted".
    let mut domains = HashSet::new();
    for (i, v) in virtual_hosts.iter().enumerate() {
        for d in &v.domains {
            if !domains.insert(d.as_str()) {
                return Err(Invalid::new(
                    format!("virtual_hosts[{i}].domains"),
                    format!("only unique values for domains are permitted: {d} is duplicated"),
                ));
            }
        }
    }
    Ok(RouteConfiguration {
        name: rc.name.clone(),
        virtual_hosts,
        request_headers_to_add: headers_to_add(
            "request_headers_to_add",
            &rc.request_headers_to_add,
        )?,
        request_headers_to_remove: headers_to_remove(
            "request_headers_to_remove",
            &rc.request_headers_to_remove,
        )?,
        response_headers_to_add: headers_to_add(
            "response_headers_to_add",
            &rc.response_headers_to_add,
        )?,
        response_headers_to_remove: headers_to_remove(
            "response_headers_to_remove",
            &rc.response_headers_to_remove,
        )?,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
    })
}

/// The request body buffer limit of a route or virtual host: the deprecated
/// `per_request_buffer_limit_bytes` (still honoured by Envoy) or `request_body_buffer_limit`,
/// not both.
fn buffer_limit(
    per_request: Option<envoy_types::pb::google::protobuf::UInt32Value>,
    request_body: Option<envoy_types::pb::google::protobuf::UInt64Value>,
) -> Result<Option<RequestBufferLimit>, Invalid> {
    match (per_request, request_body) {
        (Some(_), Some(_)) => Err(Invalid::new(
            "request_body_buffer_limit",
            "only one of per_request_buffer_limit_bytes and request_body_buffer_limit may be set",
        )),
        (Some(b), None) => Ok(Some(RequestBufferLimit::PerRequest(b.value))),
        (None, Some(b)) => Ok(Some(RequestBufferLimit::RequestBody(b.value))),
        (None, None) => Ok(None),
    }
}

fn virtual_host(v: &rds::VirtualHost) -> Result<VirtualHost, Invalid> {
    if v.domains.is_empty() {
        return Err(Invalid::new("domains", "at least one domain is required"));
    }
    if v.matcher.is_some() {
        return Err(Invalid::new("matcher", "the matcher API is not supported"));
    }
    Ok(VirtualHost {
        name: v.name.clone(),
        // Envoy matches domains case-insensitively.
        domains: v.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes: each("routes", &v.routes, route)?,
        retry_policy: v
            .retry_policy
            .as_ref()
            .map(retry_policy)
            .transpose()
            .at("retry_policy")?
            .map(Box::new),
        #[allow(deprecated)]
        request_buffer_limit: buffer_limit(
            v.per_request_buffer_limit_bytes,
            v.request_body_buffer_limit,
        )?,
        include_request_attempt_count: v.include_request_attempt_count,
        request_headers_to_add: headers_to_add(
            "request_headers_to_add",
            &v.request_headers_to_add,
        )?,
        request_headers_to_remove: headers_to_remove(
            "request_headers_to_remove",
            &v.request_headers_to_remove,
        )?,
        response_headers_to_add: headers_to_add(
            "response_headers_to_add",
            &v.response_headers_to_add,
        )?,
        response_headers_to_remove: headers_to_remove(
            "response_headers_to_remove",
            &v.response_headers_to_remove,
        )?,
    })
}

fn route(r: &rds::Route) -> Result<Route, Invalid> {
    let route_match = route_match(
        r.r#match
            .as_ref()
            .ok_or_else(|| Invalid::new("match", "required"))?,
    )
    .at("match")?;
    use rds::route::Action as A;
    let action = match &r.action {
        Some(A::Route(a)) => RouteAction::Forward(Arc::new(forward(a).at("route")?)),
        Some(A::Redirect(a)) => RouteAction::Redirect(Box::new(redirect(a).at("redirect")?)),
        Some(A::DirectResponse(d)) => direct_response(d).at("direct_response")?,
        Some(A::FilterAction(_)) | Some(A::NonForwardingAction(_)) => {
            return Err(Invalid::new(
                "action",
                "only route, redirect and direct_response are supported",
            ));
        }
        None => return Err(Invalid::new("action", "the route has no action")),
    };
    Ok(Route {
        name: r.name.clone(),
        route_match,
        action,
        request_headers_to_add: headers_to_add(
            "request_headers_to_add",
            &r.request_headers_to_add,
        )?,
        request_headers_to_remove: headers_to_remove(
            "request_headers_to_remove",
            &r.request_headers_to_remove,
        )?,
        response_headers_to_add: headers_to_add(
            "response_headers_to_add",
            &r.response_headers_to_add,
        )?,
        response_headers_to_remove: headers_to_remove(
            "response_headers_to_remove",
            &r.response_headers_to_remove,
        )?,
        fault: r
            .typed_per_filter_config
            .get(FAULT_FILTER)
            .map(fault)
            .transpose()
            .at(format_args!("typed_per_filter_config[{FAULT_FILTER}]"))?
            .map(Box::new),
        #[allow(deprecated)]
        request_buffer_limit: buffer_limit(
            r.per_request_buffer_limit_bytes,
            r.request_body_buffer_limit,
        )?,
    })
}

/// The fault filter's per-route config, as istiod writes a VirtualService's `fault`.
fn fault(any: &envoy_types::pb::google::protobuf::Any) -> Result<HttpFault, Invalid> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier as D;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault as Pb;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType as E;
    let f: Pb = unpack(any)?;
    let delay = f
        .delay
        .as_ref()
        .map(|d| match &d.fault_delay_secifier {
            Some(D::FixedDelay(fixed)) => Ok(FaultDelay {
                fixed_delay: duration("fixed_delay", fixed)?,
                percentage: d.percentage.map(fraction).transpose()?.unwrap_or(NONE),
            }),
            _ => Err(Invalid::new(
                "fault_delay_secifier",
                "only fixed_delay is supported",
            )),
        })
        .transpose()
        .at("delay")?;
    let abort = f
        .abort
        .as_ref()
        .map(|a| {
            let error = match a.error_type {
                Some(E::HttpStatus(status)) => AbortError::HttpStatus(
                    u16::try_from(status)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| {
                            Invalid::new("http_status", format!("status {status} is invalid"))
                        })?,
                ),
                Some(E::GrpcStatus(code)) => AbortError::GrpcStatus(code),
                _ => {
                    return Err(Invalid::new(
                        "error_type",
                        "only http_status and grpc_status are supported",
                    ));
                }
            };
            Ok(FaultAbort {
                error,
                percentage: a.percentage.map(fraction).transpose()?.unwrap_or(NONE),
            })
        })
        .transpose()
        .at("abort")?;
    Ok(HttpFault { delay, abort })
}

/// Envoy's default of an unset `FractionalPercent`: none.
const NONE: FractionalPercent = FractionalPercent {
    numerator: 0,
    denominator: Denominator::Hundred,
};

fn fraction(
    f: envoy_types::pb::envoy::r#type::v3::FractionalPercent,
) -> Result<FractionalPercent, Invalid> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType as T;
    let denominator = match T::try_from(f.denominator) {
        Ok(T::Hundred) => Denominator::Hundred,
        Ok(T::TenThousand) => Denominator::TenThousand,
        Ok(T::Million) => Denominator::Million,
        Err(_) => {
            return Err(Invalid::new(
                "denominator",
                format!("unknown denominator {}", f.denominator),
            ));
        }
    };
    Ok(FractionalPercent {
        numerator: f.numerator,
        denominator,
    })
}

fn route_match(m: &rds::RouteMatch) -> Result<RouteMatch, Invalid> {
    use rds::route_match::PathSpecifier as P;
    let path = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Path(p.clone()),
        Some(P::SafeRegex(re)) => PathMatch::Regex(regex("safe_regex", re)?),
        Some(P::PathSeparatedPrefix(p)) => {
            // Envoy 1.40's validation: `^[^?#]+[^?#/]$`.
            if p.len() < 2 || p.contains(['?', '#']) || p.ends_with('/') {
                return Err(Invalid::new(
                    "path_separated_prefix",
                    format!("{p:?} must have no query, fragment or trailing /"),
                ));
            }
            PathMatch::PathSeparatedPrefix(p.clone())
        }
        Some(P::ConnectMatcher(_)) | Some(P::PathMatchPolicy(_)) => {
            return Err(Invalid::new(
                "path_specifier",
                "only prefix, path, safe_regex and path_separated_prefix are supported",
            ));
        }
        None => return Err(Invalid::new("path_specifier", "required")),
    };
    if m.runtime_fraction.is_some()
        || !m.cookies.is_empty()
        || m.grpc.is_some()
        || m.tls_context.is_some()
        || !m.dynamic_metadata.is_empty()
        || !m.filter_state.is_empty()
    {
        return Err(Invalid::new(
            "",
            "only path, headers and query_parameters can be matched on",
        ));
    }
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers: each("headers", &m.headers, header_matcher)?,
        query_parameters: each("query_parameters", &m.query_parameters, query_parameter)?,
    })
}

#[allow(deprecated)]
fn header_matcher(h: &rds::HeaderMatcher) -> Result<HeaderMatcher, Invalid> {
    use rds::header_matcher::HeaderMatchSpecifier as H;
    let plain = |pattern| {
        HeaderMatch::String(StringMatcher {
            pattern,
            ignore_case: false,
        })
    };
    let matcher = match &h.header_match_specifier {
        Some(H::ExactMatch(v)) => plain(StringPattern::Exact(v.clone())),
        Some(H::PrefixMatch(v)) => plain(StringPattern::Prefix(v.clone())),
        Some(H::SuffixMatch(v)) => plain(StringPattern::Suffix(v.clone())),
        Some(H::ContainsMatch(v)) => plain(StringPattern::Contains(v.clone())),
        Some(H::SafeRegexMatch(re)) => plain(StringPattern::Regex(regex("safe_regex_match", re)?)),
        Some(H::StringMatch(m)) => HeaderMatch::String(string_matcher(m).at("string_match")?),
        Some(H::PresentMatch(p)) => HeaderMatch::Present(*p),
        Some(H::RangeMatch(_)) => {
            return Err(Invalid::new("range_match", "not supported"));
        }
        // Envoy: a matcher without a specifier matches when the header is present.
        None => HeaderMatch::Present(true),
    };
    if h.name.is_empty() {
        return Err(Invalid::new("name", "must not be empty"));
    }
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        matcher,
        invert_match: h.invert_match,
        treat_missing_header_as_empty: h.treat_missing_header_as_empty,
    })
}

fn query_parameter(q: &rds::QueryParameterMatcher) -> Result<QueryParameterMatcher, Invalid> {
    use rds::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
    if q.name.is_empty() {
        return Err(Invalid::new("name", "must not be empty"));
    }
    let matcher = match &q.query_parameter_match_specifier {
        Some(Q::StringMatch(m)) => Some(string_matcher(m).at("string_match")?),
        // Envoy 1.40 matches presence for `present_match: false` too.
        Some(Q::PresentMatch(_)) | None => None,
    };
    Ok(QueryParameterMatcher {
        name: q.name.clone(),
        matcher,
    })
}

/// Checks a weighted set as Envoy 1.40 does: the sum is above zero and fits in 32 bits.
pub(crate) fn checked_weights(
    clusters: Vec<WeightedCluster>,
) -> Result<Vec<WeightedCluster>, Invalid> {
    if clusters.is_empty() {
        return Err(Invalid::new("clusters", "at least one cluster is required"));
    }
    let sum = clusters
        .iter()
        .try_fold(0u32, |sum, c| sum.checked_add(c.weight))
        .ok_or_else(|| Invalid::new("clusters", "the sum of the weights overflows 32 bits"))?;
    if sum == 0 {
        return Err(Invalid::new(
            "clusters",
            "the sum of the weights must be greater than 0",
        ));
    }
    Ok(clusters)
}

fn forward(a: &rds::RouteAction) -> Result<Forward, Invalid> {
    use rds::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let cluster = match &a.cluster_specifier {
        Some(C::Cluster(name)) if !name.is_empty() => ClusterSpecifier::Cluster(name.clone()),
        Some(C::Cluster(_)) => return Err(Invalid::new("cluster", "must not be empty")),
        Some(C::WeightedClusters(w)) => {
            let clusters = each("weighted_clusters.clusters", &w.clusters, |c| {
                if c.name.is_empty() {
                    return Err(Invalid::new(
                        "name",
                        "a cluster name is required (cluster_header is not supported)",
                    ));
                }
                if c.host_rewrite_specifier.is_some() {
                    return Err(Invalid::new(
                        "host_rewrite_specifier",
                        "not supported per weighted cluster",
                    ));
                }
                Ok(WeightedCluster {
                    name: c.name.clone(),
                    weight: c.weight.map_or(0, |w| w.value),
                    request_headers_to_add: headers_to_add(
                        "request_headers_to_add",
                        &c.request_headers_to_add,
                    )?,
                    request_headers_to_remove: headers_to_remove(
                        "request_headers_to_remove",
                        &c.request_headers_to_remove,
                    )?,
                    response_headers_to_add: headers_to_add(
                        "response_headers_to_add",
                        &c.response_headers_to_add,
                    )?,
                    response_headers_to_remove: headers_to_remove(
                        "response_headers_to_remove",
                        &c.response_headers_to_remove,
                    )?,
                })
            })?;
            ClusterSpecifier::Weighted(checked_weights(clusters).at("weighted_clusters")?)
        }
        Some(C::ClusterHeader(_))
        | Some(C::ClusterSpecifierPlugin(_))
        | Some(C::InlineClusterSpecifierPlugin(_)) => {
            return Err(Invalid::new(
                "cluster_specifier",
                "only cluster and weighted_clusters are supported",
            ));
        }
        None => return Err(Invalid::new("cluster_specifier", "a cluster is required")),
    };
    let host_rewrite_literal = match &a.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(H::AutoHostRewrite(b)) if !b.value => None,
        None => None,
        Some(_) => {
            return Err(Invalid::new(
                "host_rewrite_specifier",
                "only host_rewrite_literal is supported",
            ));
        }
    };
    if a.path_rewrite_policy.is_some() || !a.path_rewrite.is_empty() {
        return Err(Invalid::new(
            "path_rewrite_policy",
            "only prefix_rewrite and regex_rewrite are supported",
        ));
    }
    let regex_rewrite = a
        .regex_rewrite
        .as_ref()
        .map(|r| {
            let pattern = r
                .pattern
                .as_ref()
                .ok_or_else(|| Invalid::new("pattern", "required"))?;
            Ok(RegexRewrite {
                pattern: regex("pattern", pattern)?,
                substitution: r.substitution.clone(),
            })
        })
        .transpose()
        .at("regex_rewrite")?;
    if !a.prefix_rewrite.is_empty() && regex_rewrite.is_some() {
        return Err(Invalid::new(
            "prefix_rewrite",
            "prefix_rewrite and regex_rewrite are exclusive",
        ));
    }
    Ok(Forward {
        cluster,
        timeout: a
            .timeout
            .as_ref()
            .map(|d| duration("timeout", d))
            .transpose()?,
        idle_timeout: a
            .idle_timeout
            .as_ref()
            .map(|d| duration("idle_timeout", d))
            .transpose()?,
        retry_policy: a
            .retry_policy
            .as_ref()
            .map(retry_policy)
            .transpose()
            .at("retry_policy")?
            .map(Arc::new),
        host_rewrite_literal,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        request_mirror_policies: each(
            "request_mirror_policies",
            &a.request_mirror_policies,
            |m| {
                if m.cluster.is_empty() {
                    return Err(Invalid::new(
                        "cluster",
                        "a cluster name is required (cluster_header is not supported)",
                    ));
                }
                Ok(RequestMirrorPolicy {
                    cluster: m.cluster.clone(),
                    runtime_fraction: m
                        .runtime_fraction
                        .as_ref()
                        .and_then(|r| r.default_value)
                        .map(fraction)
                        .transpose()
                        .at("runtime_fraction.default_value")?,
                })
            },
        )?,
        hash_policy: each("hash_policy", &a.hash_policy, hash_policy)?
            .into_iter()
            .flatten()
            .collect(),
    })
}

/// One hash policy; `None` for one that never yields a hash (`source_ip: false`).
fn hash_policy(h: &rds::route_action::HashPolicy) -> Result<Option<HashPolicy>, Invalid> {
    use rds::route_action::hash_policy::PolicySpecifier as S;
    let key = match &h.policy_specifier {
        Some(S::Header(header)) => {
            if header.header_name.is_empty() {
                return Err(Invalid::new("header.header_name", "must not be empty"));
            }
            if header.regex_rewrite.is_some() {
                return Err(Invalid::new("header.regex_rewrite", "not supported"));
            }
            HashKey::Header(header.header_name.to_ascii_lowercase())
        }
        Some(S::Cookie(cookie)) => {
            if cookie.name.is_empty() {
                return Err(Invalid::new("cookie.name", "must not be empty"));
            }
            let attributes = each("cookie.attributes", &cookie.attributes, |a| {
                // Envoy's validation: a name of header-name characters, both bounded.
                let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
                if a.name.is_empty() || a.name.len() > 16384 || !a.name.chars().all(token) {
                    return Err(Invalid::new("name", "must be a non-empty token"));
                }
                if a.value.len() > 16384 || a.value.contains(['\r', '\n', '\0']) {
                    return Err(Invalid::new("value", "must be a header value"));
                }
                Ok(CookieAttribute {
                    name: a.name.clone(),
                    value: a.value.clone(),
                })
            })?;
            HashKey::Cookie {
                attributes,
                name: cookie.name.clone(),
                path: (!cookie.path.is_empty()).then(|| cookie.path.clone()),
                ttl: cookie
                    .ttl
                    .as_ref()
                    .map(|d| duration("cookie.ttl", d))
                    .transpose()?,
            }
        }
        Some(S::ConnectionProperties(p)) if p.source_ip => HashKey::SourceIp,
        Some(S::ConnectionProperties(_)) => return Ok(None),
        Some(S::QueryParameter(q)) => {
            if q.name.is_empty() {
                return Err(Invalid::new("query_parameter.name", "must not be empty"));
            }
            HashKey::QueryParameter(q.name.clone())
        }
        Some(S::FilterState(_)) => {
            return Err(Invalid::new("filter_state", "not supported"));
        }
        None => return Err(Invalid::new("policy_specifier", "required")),
    };
    Ok(Some(HashPolicy {
        key,
        terminal: h.terminal,
    }))
}

fn retry_policy(r: &rds::RetryPolicy) -> Result<RetryPolicy, Invalid> {
    let retriable_status_codes = each("retriable_status_codes", &r.retriable_status_codes, |c| {
        u16::try_from(*c).map_err(|_| Invalid::new("", format!("status code {c} is invalid")))
    })?;
    Ok(RetryPolicy {
        retry_on: r
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        num_retries: r.num_retries.map_or(DEFAULT_RETRIES, |n| n.value),
        per_try_timeout: r
            .per_try_timeout
            .as_ref()
            .map(|d| duration("per_try_timeout", d))
            .transpose()?,
        retriable_status_codes,
        retriable_headers: each("retriable_headers", &r.retriable_headers, header_matcher)?,
        avoid_previous_hosts: r
            .retry_host_predicate
            .iter()
            .any(|p| p.name == "envoy.retry_host_predicates.previous_hosts"),
        previous_priorities: r
            .retry_priority
            .as_ref()
            .map(previous_priorities)
            .transpose()
            .at("retry_priority")?,
        host_selection_retry_max_attempts: u32::try_from(
            r.host_selection_retry_max_attempts.max(0),
        )
        .unwrap_or(u32::MAX),
        retry_back_off: r
            .retry_back_off
            .as_ref()
            .map(retry_back_off)
            .transpose()
            .at("retry_back_off")?
            .map(Box::new),
    })
}

/// The one retry priority Envoy has, `previous_priorities`, and its `update_frequency`
/// (above zero, as Envoy validates it).
fn previous_priorities(p: &rds::retry_policy::RetryPriority) -> Result<u32, Invalid> {
    use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    use rds::retry_policy::retry_priority::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &p.config_type else {
        return Err(Invalid::new("typed_config", "required"));
    };
    let config: PreviousPrioritiesConfig = unpack(any).at("typed_config")?;
    if config.update_frequency <= 0 {
        return Err(Invalid::new(
            "typed_config.update_frequency",
            "must be greater than 0",
        ));
    }
    Ok(config.update_frequency.unsigned_abs())
}

/// Envoy's checks: a base interval above zero (below 1 ms taken as 1 ms), and a maximum,
/// when given, not below it.
fn retry_back_off(b: &rds::retry_policy::RetryBackOff) -> Result<RetryBackOff, Invalid> {
    let base_interval = b
        .base_interval
        .as_ref()
        .map(|d| duration("base_interval", d))
        .transpose()?
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Invalid::new("base_interval", "must be greater than zero"))?
        .max(Duration::from_millis(1));
    let max_interval = b
        .max_interval
        .as_ref()
        .map(|d| duration("max_interval", d))
        .transpose()?;
    if max_interval.is_some_and(|max| max < base_interval) {
        return Err(Invalid::new(
            "max_interval",
            "must not be below base_interval",
        ));
    }
    Ok(RetryBackOff {
        base_interval,
        max_interval,
    })
}

fn redirect(r: &rds::RedirectAction) -> Result<Redirect, Invalid> {
    use rds::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let (path, prefix_rewrite) = match &r.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None),
        Some(P::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(P::RegexRewrite(_)) | Some(P::PathRewrite(_)) => {
            return Err(Invalid::new(
                "path_rewrite_specifier",
                "only path_redirect and prefix_rewrite are supported",
            ));
        }
        None => (None, None),
    };
    let status = match C::try_from(r.response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => return Err(Invalid::new("response_code", "unknown response code")),
    };
    Ok(Redirect {
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port: match r.port_redirect {
            0 => None,
            p => Some(port("port_redirect", p)?),
        },
        path,
        prefix_rewrite,
        status,
        strip_query: r.strip_query,
    })
}

fn direct_response(d: &rds::DirectResponseAction) -> Result<RouteAction, Invalid> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as S;
    if !(200..600).contains(&d.status) {
        return Err(Invalid::new(
            "status",
            format!("{} is not in [200, 600)", d.status),
        ));
    }
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        Some(S::InlineString(s)) => Some(DirectBody::String(s.clone())),
        Some(S::InlineBytes(b)) => Some(DirectBody::Bytes(b.clone())),
        Some(S::Filename(_)) | Some(S::EnvironmentVariable(_)) => {
            return Err(Invalid::new("body", "only inline bodies are supported"));
        }
        None => None,
    };
    Ok(RouteAction::DirectResponse {
        status: u16::try_from(d.status).map_err(|_| Invalid::new("status", "out of range"))?,
        body,
    })
}
