//! Route tables: virtual hosts chosen by domain with Envoy's precedence, routes tried in
//! order, regexes compiled once here rather than per request.

use std::borrow::Cow;
use std::sync::Arc;

use portcullis_envoy as envoy;
use regex::Regex;

use crate::Map;
use crate::cluster::Target;
use crate::host::{Normalized, normalized, split_host_port, with_host_port};
use crate::retry::RetryPolicy;
use crate::snapshot::{Decision, Wildcards};

/// A request's headers as route matching reads them.
pub trait Headers: Sync {
    /// Every value of the header `name` (lower case), joined with `,` as Envoy does; `None`
    /// when absent.
    fn get(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// No headers at all.
impl Headers for () {
    fn get(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
}

/// A request as route matching sees it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Host or `:authority`.
    pub authority: &'a str,
    /// `:path`, with any query string.
    pub path: &'a str,
    /// `:method`.
    pub method: &'a str,
    /// `:scheme` (`http` unless the client said otherwise).
    pub scheme: &'a str,
    /// The other headers.
    pub headers: &'a dyn Headers,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":authority" | "host" => Some(Cow::Borrowed(self.authority)),
            ":path" => Some(Cow::Borrowed(self.path)),
            ":method" => Some(Cow::Borrowed(self.method)),
            ":scheme" => Some(Cow::Borrowed(self.scheme)),
            _ => self.headers.get(name),
        }
    }

    /// The path without query string or fragment.
    fn path_only(&self) -> &str {
        self.path
            .split_once(['?', '#'])
            .map_or(self.path, |(p, _)| p)
    }

    fn query(&self) -> &str {
        let rest = self.path.split_once('?').map_or("", |(_, q)| q);
        rest.split_once('#').map_or(rest, |(q, _)| q)
    }
}

/// A route configuration, indexed.
#[derive(Debug)]
pub struct RouteTable {
    /// Its name (Istio: the port, `80`).
    pub name: Arc<str>,
    vhosts: Vec<VirtualHost>,
    exact: Map<Box<str>, usize>,
    /// `*.suffix` domains: the virtual host and the suffix's length.
    dot_suffixes: Wildcards<(usize, usize)>,
    /// Other `*suffix` domains, by suffix length, longest first.
    suffixes: Vec<(usize, Map<Box<str>, usize>)>,
    /// `prefix*` domains, by prefix length, longest first.
    prefixes: Vec<(usize, Map<Box<str>, usize>)>,
    any: Option<usize>,
    ignore_port: bool,
}

/// A virtual host, indexed.
#[derive(Debug)]
pub struct VirtualHost {
    /// Its name (Istio: `host:port`, `allow_any`, `block_all`).
    pub name: Arc<str>,
    routes: Vec<Arc<Route>>,
}

impl VirtualHost {
    /// Its first route that matches `req`.
    fn matching(&self, req: &Request<'_>) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

/// A route, compiled.
#[derive(Debug)]
pub struct Route {
    /// Its name (Istio: `default`, `allow_any`, `block_all`, or the VirtualService's).
    pub name: Arc<str>,
    matcher: Matcher,
    /// What it does.
    pub action: Action,
    /// The retry policy in force (the route's, else its virtual host's) as the data path
    /// reads it; none without one, as Envoy. Shared by the routes of a table that have the
    /// same one (every default route of istiod's has Istio's).
    pub retries: Arc<RetryPolicy>,
    /// The request body buffer limit in force (the route's, else its virtual host's): how
    /// much of a request body is kept for retries and mirrors.
    pub request_buffer_limit: Option<envoy::RequestBufferLimit>,
    /// What few routes have, out of line so that the many without it stay small.
    rare: Option<Box<Rare>>,
    /// The fault filter's configuration for the route (Istio's `fault`), with something
    /// to inject.
    pub fault: Option<Box<envoy::HttpFault>>,
}

/// The parts of a route that few routes have.
#[derive(Debug, Default)]
struct Rare {
    /// Request header changes of the route, its virtual host and its table, in the order
    /// Envoy applies them (the table's last, so that it wins).
    request_headers: Vec<HeaderMutation>,
    /// Response header changes, in the same order.
    response_headers: Vec<HeaderMutation>,
    /// Where copies of its requests go (Envoy's `request_mirror_policies`).
    mirrors: Vec<Mirror>,
    /// `regex_rewrite`, compiled, with the substitution in the `regex` crate's syntax.
    regex_rewrite: Option<(Regex, String)>,
    /// Header changes of each weighted cluster, in the order of the route's weighted
    /// choices (clusters of weight 0 left out); `None` for one that changes nothing.
    weighted_headers: Vec<Option<Arc<ClusterHeaders>>>,
}

/// One of a route's request mirrors: the cluster copies go to, resolved with the route.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// The cluster (or why there is none).
    pub decision: Decision,
    /// The share of requests copied; `None`: all.
    pub fraction: Option<envoy::FractionalPercent>,
}

/// The header changes of one weighted cluster, which Envoy applies before its route's.
#[derive(Debug, Default, PartialEq)]
pub struct ClusterHeaders {
    /// Changes to the request sent to the cluster.
    pub request: Vec<HeaderMutation>,
    /// Changes to the response it sends back.
    pub response: Vec<HeaderMutation>,
}

/// One header change.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMutation {
    /// Removes every value of the header.
    Remove(String),
    /// Adds a value as the action says.
    Add(envoy::HeaderValueOption),
}

/// The changes of one level: removals first, then additions, as Envoy's header parser.
fn mutations<'a>(
    remove: &'a [String],
    add: &'a [envoy::HeaderValueOption],
) -> impl Iterator<Item = HeaderMutation> + 'a {
    remove
        .iter()
        .map(|n| HeaderMutation::Remove(n.to_ascii_lowercase()))
        .chain(add.iter().cloned().map(HeaderMutation::Add))
}

/// What a matched route does.
#[derive(Debug)]
pub enum Action {
    /// Forwards: where, and how (timeouts, retries, rewrites), the settings shared with
    /// the model the route was compiled from.
    Forward(Target, Arc<envoy::Forward>),
    /// Answers with this.
    Direct(Decision),
    /// Answers with a redirect.
    Redirect(Box<envoy::Redirect>),
}

/// The answer of a direct response or a redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectResponse {
    /// Status code.
    pub status: u16,
    /// Body, if any.
    pub body: Option<Vec<u8>>,
    /// The `location` of a redirect.
    pub location: Option<String>,
}

/// The outcome of routing one request.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// What to do with it.
    pub decision: Decision,
    /// The route that matched, if one did.
    pub route: Option<Arc<Route>>,
    /// The header changes of the weighted cluster chosen, if it has any.
    pub cluster_headers: Option<Arc<ClusterHeaders>>,
}

impl HttpRoute {
    /// No route: Envoy's 404 `NR`.
    pub(crate) fn none() -> HttpRoute {
        HttpRoute::unrouted(Decision::NoRoute)
    }

    /// `decision`, reached without a route.
    pub(crate) fn unrouted(decision: Decision) -> HttpRoute {
        HttpRoute {
            decision,
            route: None,
            cluster_headers: None,
        }
    }
}

impl RouteTable {
    /// Compiles a route configuration; routes Envoy would reject are left out and reported
    /// in `warnings`.
    pub fn compile(
        rc: &envoy::RouteConfiguration,
        target: &dyn Fn(&envoy::ClusterSpecifier) -> Target,
        warnings: &mut Vec<String>,
    ) -> RouteTable {
        let mut table = RouteTable {
            name: rc.name.as_str().into(),
            vhosts: Vec::with_capacity(rc.virtual_hosts.len()),
            exact: Map::default(),
            dot_suffixes: Wildcards::default(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
            ignore_port: rc.ignore_port_in_host_matching,
        };
        let mut retries = Retries::default();
        for (i, vh) in rc.virtual_hosts.iter().enumerate() {
            for domain in &vh.domains {
                if !table.claim(&domain.to_ascii_lowercase(), i) {
                    // Envoy rejects the whole table; the first virtual host keeps the domain.
                    warnings.push(format!(
                        "route configuration {}: domain {domain:?} of virtual host {} is already taken; ignored",
                        rc.name, vh.name
                    ));
                }
            }
            let routes = vh
                .routes
                .iter()
                .filter_map(|r| match Route::compile(r, vh, rc, target, &mut retries) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) => {
                        warnings.push(format!(
                            "route configuration {}: virtual host {}: route {:?}: {e}; ignored",
                            rc.name, vh.name, r.name
                        ));
                        None
                    }
                })
                .collect();
            table.vhosts.push(VirtualHost {
                name: vh.name.as_str().into(),
                routes,
            });
        }
        table
            .suffixes
            .sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        table
            .prefixes
            .sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        table
    }

    /// Registers `domain` for virtual host `vh`; false when another one holds it.
    fn claim(&mut self, domain: &str, vh: usize) -> bool {
        fn by_length(list: &mut Vec<(usize, Map<Box<str>, usize>)>, key: &str, vh: usize) -> bool {
            let i = match list.iter().position(|(len, _)| *len == key.len()) {
                Some(i) => i,
                None => {
                    list.push((key.len(), Map::default()));
                    list.len() - 1
                }
            };
            let map = &mut list[i].1;
            if map.contains_key(key) {
                return false;
            }
            map.insert(key.into(), vh);
            true
        }
        if domain == "*" {
            if self.any.is_some() {
                return false;
            }
            self.any = Some(vh);
            return true;
        }
        if let Some(suffix) = domain.strip_prefix('*') {
            if suffix.starts_with('.') {
                if self.dot_suffixes.get(suffix).is_some() {
                    return false;
                }
                self.dot_suffixes.insert(suffix, (vh, suffix.len()));
                return true;
            }
            return by_length(&mut self.suffixes, suffix, vh);
        }
        if let Some(prefix) = domain.strip_suffix('*') {
            return by_length(&mut self.prefixes, prefix, vh);
        }
        if self.exact.contains_key(domain) {
            return false;
        }
        self.exact.insert(domain.into(), vh);
        true
    }

    /// The virtual host for an authority, in Envoy's precedence: exact domain, then the
    /// longest `*suffix`, then the longest `prefix*`, then `*`. The port is left out
    /// with `ignore_port_in_host_matching`, else matched as part of the domain.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        // Most authorities carry no port: then the whole is the host. One that is no host
        // at all still matches `*`, as in Envoy.
        let split =
            if authority.ends_with(|c: char| c.is_ascii_digit()) || authority.starts_with('[') {
                split_host_port(authority).ok()
            } else {
                Some((authority, None))
            };
        let Some((host, port)) = split else {
            return self.any.and_then(|i| self.vhosts.get(i));
        };
        // Envoy compares the host with the domains as sent: with a trailing dot it matches
        // none of them but `*`.
        if host.ends_with('.') {
            return self.any.and_then(|i| self.vhosts.get(i));
        }
        let Ok(host) = normalized(host) else {
            return self.any.and_then(|i| self.vhosts.get(i));
        };
        match port {
            Some(port) if !self.ignore_port => {
                with_host_port(&host.text, host.is_v6(), port, |key| {
                    self.by_domain(key, host.dots)
                })
            }
            _ => self.by_domain(&host.text, host.dots),
        }
    }

    /// The virtual host of `host` (normalized) whose routing key, `host:port`, is already
    /// written: the explicit proxy's lookup, which builds that key for the request anyway.
    fn virtual_host_keyed(&self, host: &Normalized<'_>, key: &str) -> Option<&VirtualHost> {
        let domain = if self.ignore_port { &host.text } else { key };
        self.by_domain(domain, host.dots)
    }

    /// The virtual host of the domain `key` (a normalized host, with its port unless
    /// ignored), whose host has `dots` dots.
    fn by_domain(&self, key: &str, dots: usize) -> Option<&VirtualHost> {
        let i = self
            .exact
            .get(key)
            .copied()
            .or_else(|| self.by_suffix(key, dots))
            .or_else(|| {
                self.prefixes.iter().find_map(|(len, m)| {
                    (*len < key.len())
                        .then(|| key.get(..*len).and_then(|p| m.get(p)).copied())
                        .flatten()
                })
            })
            .or(self.any)?;
        self.vhosts.get(i)
    }

    fn by_suffix(&self, key: &str, dots: usize) -> Option<usize> {
        let dotted = self.dot_suffixes.longest_match(key, dots).copied();
        let other = self.suffixes.iter().find_map(|(len, m)| {
            (*len < key.len())
                .then(|| {
                    key.get(key.len() - len..)
                        .and_then(|s| m.get(s))
                        .map(|vh| (*vh, *len))
                })
                .flatten()
        });
        match (dotted, other) {
            (Some(a), Some(b)) => Some(if b.1 > a.1 { b.0 } else { a.0 }),
            (a, b) => a.or(b).map(|(vh, _)| vh),
        }
    }

    /// Routes a request: its virtual host, then the first route that matches.
    pub fn route(&self, req: &Request<'_>) -> HttpRoute {
        decided(self.matching(req), req)
    }

    /// As [`RouteTable::route`] for a request whose authority is the routing key of the
    /// normalized `host`: `host:port`, as [`with_host_port`] writes it.
    pub(crate) fn route_keyed(&self, host: &Normalized<'_>, req: &Request<'_>) -> HttpRoute {
        let vh = self.virtual_host_keyed(host, req.authority);
        decided(vh.and_then(|vh| vh.matching(req)), req)
    }

    /// The first route of the request's virtual host that matches it.
    pub(crate) fn matching(&self, req: &Request<'_>) -> Option<&Arc<Route>> {
        self.virtual_host(req.authority)?.matching(req)
    }
}

/// The answer for a request whose first matching route is `matched` (none: Envoy's `NR`).
fn decided(matched: Option<&Arc<Route>>, req: &Request<'_>) -> HttpRoute {
    match matched {
        Some(route) => {
            let (decision, cluster_headers) = route.decide(req);
            HttpRoute {
                decision,
                route: Some(Arc::clone(route)),
                cluster_headers,
            }
        }
        None => HttpRoute::none(),
    }
}

/// The retry policies of one table's routes as compiled, shared between routes: none, and
/// the last one compiled, which the next route usually has too (istiod gives every default
/// route Istio's).
#[derive(Default)]
struct Retries<'a> {
    none: Option<Arc<RetryPolicy>>,
    last: Option<(&'a envoy::RetryPolicy, Arc<RetryPolicy>)>,
}

impl<'a> Retries<'a> {
    /// The compiled `policy`; no retries without one, as Envoy.
    fn get(
        &mut self,
        policy: Option<&'a envoy::RetryPolicy>,
    ) -> Result<Arc<RetryPolicy>, regex::Error> {
        let Some(policy) = policy else {
            return Ok(Arc::clone(
                self.none.get_or_insert_with(|| Arc::new(RetryPolicy::NONE)),
            ));
        };
        if let Some((source, compiled)) = &self.last
            && *source == policy
        {
            return Ok(Arc::clone(compiled));
        }
        let compiled = Arc::new(RetryPolicy::from_envoy(policy)?);
        self.last = Some((policy, Arc::clone(&compiled)));
        Ok(compiled)
    }
}

/// The `location` of a redirect, from the request and the redirect's replacements.
fn location(r: &envoy::Redirect, matched: &PathMatcher, req: &Request<'_>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let (host, port) = split_host_port(req.authority).unwrap_or((req.authority, None));
    let host = r.host.as_deref().unwrap_or(host);
    // A new scheme drops the old port unless one is given, as the old one belonged to it.
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => port,
    };
    let path = req.path_only();
    let mut path = match (&r.path, &r.prefix_rewrite, matched) {
        (Some(p), _, _) => p.clone(),
        (None, Some(new), PathMatcher::Prefix(old) | PathMatcher::Separated(old)) => {
            format!("{new}{}", path.get(old.len()..).unwrap_or(""))
        }
        _ => path.to_string(),
    };
    let query = req.query();
    if !r.strip_query && !query.is_empty() && !path.contains('?') {
        path.push('?');
        path.push_str(query);
    }
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

impl Route {
    fn compile<'a>(
        r: &'a envoy::Route,
        vh: &'a envoy::VirtualHost,
        rc: &envoy::RouteConfiguration,
        target: &dyn Fn(&envoy::ClusterSpecifier) -> Target,
        retries: &mut Retries<'a>,
    ) -> Result<Route, regex::Error> {
        let action = match &r.action {
            envoy::RouteAction::Forward(f) => Action::Forward(target(&f.cluster), Arc::clone(f)),
            envoy::RouteAction::DirectResponse { status, body } => {
                Action::Direct(Decision::Direct(Arc::new(DirectResponse {
                    status: *status,
                    body: body.as_ref().map(|b| b.as_bytes().to_vec()),
                    location: None,
                })))
            }
            envoy::RouteAction::Redirect(redirect) => Action::Redirect(redirect.clone()),
        };
        let forward = match &r.action {
            envoy::RouteAction::Forward(f) => Some(&**f),
            _ => None,
        };
        let regex_rewrite = match forward.and_then(|f| f.regex_rewrite.as_ref()) {
            Some(rw) => Some((Regex::new(&rw.pattern)?, substitution(&rw.substitution))),
            None => None,
        };
        let request_headers = mutations(&r.request_headers_to_remove, &r.request_headers_to_add)
            .chain(mutations(
                &vh.request_headers_to_remove,
                &vh.request_headers_to_add,
            ))
            .chain(mutations(
                &rc.request_headers_to_remove,
                &rc.request_headers_to_add,
            ))
            .collect();
        let response_headers = mutations(&r.response_headers_to_remove, &r.response_headers_to_add)
            .chain(mutations(
                &vh.response_headers_to_remove,
                &vh.response_headers_to_add,
            ))
            .chain(mutations(
                &rc.response_headers_to_remove,
                &rc.response_headers_to_add,
            ))
            .collect();
        let weighted_headers: Vec<_> = match forward.map(|f| &f.cluster) {
            Some(envoy::ClusterSpecifier::Weighted(clusters)) => clusters
                .iter()
                .filter(|w| w.weight > 0)
                .map(|w| {
                    let headers = ClusterHeaders {
                        request: mutations(&w.request_headers_to_remove, &w.request_headers_to_add)
                            .collect(),
                        response: mutations(
                            &w.response_headers_to_remove,
                            &w.response_headers_to_add,
                        )
                        .collect(),
                    };
                    (headers != ClusterHeaders::default()).then(|| Arc::new(headers))
                })
                .collect(),
            _ => Vec::new(),
        };
        let retry_policy = match &r.action {
            envoy::RouteAction::Forward(f) => {
                f.retry_policy.as_deref().or(vh.retry_policy.as_deref())
            }
            _ => None,
        };
        let mirrors: Vec<Mirror> = match &r.action {
            envoy::RouteAction::Forward(f) => f
                .request_mirror_policies
                .iter()
                .map(|m| Mirror {
                    decision: target(&envoy::ClusterSpecifier::Cluster(m.cluster.clone())).decide(),
                    fraction: m.runtime_fraction,
                })
                .collect(),
            _ => Vec::new(),
        };
        let rare = Rare {
            request_headers,
            response_headers,
            mirrors,
            regex_rewrite,
            weighted_headers,
        };
        let common = rare.request_headers.is_empty()
            && rare.response_headers.is_empty()
            && rare.mirrors.is_empty()
            && rare.regex_rewrite.is_none()
            && rare.weighted_headers.is_empty();
        Ok(Route {
            name: r.name.as_str().into(),
            matcher: Matcher::compile(&r.route_match)?,
            action,
            retries: retries.get(retry_policy)?,
            request_buffer_limit: r.request_buffer_limit.or(vh.request_buffer_limit),
            rare: (!common).then(|| Box::new(rare)),
            fault: r
                .fault
                .as_ref()
                .filter(|f| f.delay.is_some() || f.abort.is_some())
                .cloned(),
        })
    }

    /// Request header changes of the route, its virtual host and its table, in the order
    /// Envoy applies them (the table's last, so that it wins).
    pub fn request_headers(&self) -> &[HeaderMutation] {
        self.rare.as_ref().map_or(&[], |r| &r.request_headers)
    }

    /// Response header changes, in the same order.
    pub fn response_headers(&self) -> &[HeaderMutation] {
        self.rare.as_ref().map_or(&[], |r| &r.response_headers)
    }

    /// Where copies of its requests go (Envoy's `request_mirror_policies`).
    pub fn mirrors(&self) -> &[Mirror] {
        self.rare.as_ref().map_or(&[], |r| &r.mirrors)
    }

    /// What the route does with `req`, with the header changes of the weighted cluster
    /// it chose.
    pub(crate) fn decide(&self, req: &Request<'_>) -> (Decision, Option<Arc<ClusterHeaders>>) {
        match &self.action {
            Action::Forward(target, _) => {
                let (at, decision) = target.choose();
                let headers = self
                    .rare
                    .as_ref()
                    .and_then(|r| r.weighted_headers.get(at).cloned().flatten());
                (decision, headers)
            }
            Action::Direct(d) => (d.clone(), None),
            Action::Redirect(r) => (
                Decision::Direct(Arc::new(DirectResponse {
                    status: r.status,
                    body: None,
                    location: Some(location(r, &self.matcher.path, req)),
                })),
                None,
            ),
        }
    }

    /// The forwarding settings, when the route forwards.
    pub fn forward(&self) -> Option<&envoy::Forward> {
        match &self.action {
            Action::Forward(_, f) => Some(f),
            _ => None,
        }
    }

    /// Whether the route changes the request or response beyond routing it: headers, host
    /// or path.
    pub fn rewrites(&self) -> bool {
        !self.request_headers().is_empty()
            || !self.response_headers().is_empty()
            || self
                .rare
                .as_ref()
                .is_some_and(|r| r.weighted_headers.iter().any(Option::is_some))
            || self.forward().is_some_and(|f| {
                f.host_rewrite_literal.is_some()
                    || f.prefix_rewrite.is_some()
                    || f.regex_rewrite.is_some()
            })
    }

    /// The path (with query) the upstream gets for `path_and_query`: the matched prefix
    /// replaced by `prefix_rewrite` (the whole path under an exact `path` match), or every
    /// match of `regex_rewrite` substituted; `None` when the route rewrites no path.
    pub fn rewrite_path(&self, path_and_query: &str) -> Option<String> {
        let f = self.forward()?;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let rewritten = if let Some(new) = &f.prefix_rewrite {
            let rest = match &self.matcher.path {
                PathMatcher::Prefix(old) | PathMatcher::Separated(old) => {
                    path.get(old.len()..).unwrap_or("")
                }
                PathMatcher::Path(_) | PathMatcher::Regex(_) => "",
            };
            format!("{new}{rest}")
        } else {
            let (re, with) = self.rare.as_ref()?.regex_rewrite.as_ref()?;
            re.replace_all(path, with.as_str()).into_owned()
        };
        Some(match query {
            Some(q) => format!("{rewritten}?{q}"),
            None => rewritten,
        })
    }
}

/// An RE2 substitution (`\1` for a group) in the `regex` crate's syntax (`${1}`).
fn substitution(re2: &str) -> String {
    let mut out = String::with_capacity(re2.len());
    let mut chars = re2.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            other => out.push(other),
        }
    }
    out
}

#[derive(Debug)]
enum PathMatcher {
    Prefix(Box<str>),
    Path(Box<str>),
    Regex(Regex),
    Separated(Box<str>),
}

#[derive(Debug)]
struct Matcher {
    path: PathMatcher,
    case_sensitive: bool,
    headers: Vec<HeaderCheck>,
    query: Vec<(Box<str>, Option<StringCheck>)>,
}

/// One of Envoy's `HeaderMatcher`s, compiled.
#[derive(Debug)]
pub(crate) struct HeaderCheck {
    name: Box<str>,
    check: Option<StringCheck>,
    present: bool,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug)]
enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Contains(Box<str>),
    Regex(Regex),
}

#[derive(Debug)]
pub(crate) struct StringCheck {
    pattern: Pattern,
    ignore_case: bool,
}

/// An RE2-style pattern that must match the whole input, as Envoy's `safe_regex`.
fn whole(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    s.len() >= prefix.len()
        && if case_sensitive {
            s.as_bytes().starts_with(prefix.as_bytes())
        } else {
            s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        }
}

impl Matcher {
    fn compile(m: &envoy::RouteMatch) -> Result<Matcher, regex::Error> {
        let path = match &m.path {
            envoy::PathMatch::Prefix(p) => PathMatcher::Prefix(p.as_str().into()),
            envoy::PathMatch::Path(p) => PathMatcher::Path(p.as_str().into()),
            envoy::PathMatch::Regex(r) => PathMatcher::Regex(whole(r)?),
            envoy::PathMatch::PathSeparatedPrefix(p) => PathMatcher::Separated(p.as_str().into()),
        };
        let headers = m
            .headers
            .iter()
            .map(HeaderCheck::compile)
            .collect::<Result<_, regex::Error>>()?;
        let query = m
            .query_parameters
            .iter()
            .map(|q| {
                let check = q.matcher.as_ref().map(StringCheck::compile).transpose()?;
                Ok((q.name.as_str().into(), check))
            })
            .collect::<Result<_, regex::Error>>()?;
        Ok(Matcher {
            path,
            case_sensitive: m.case_sensitive,
            headers,
            query,
        })
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        let path = req.path_only();
        let cs = self.case_sensitive;
        let path_ok = match &self.path {
            PathMatcher::Prefix(p) => starts_with(path, p, cs),
            PathMatcher::Path(p) => path.len() == p.len() && starts_with(path, p, cs),
            PathMatcher::Regex(r) => r.is_match(path),
            PathMatcher::Separated(p) => {
                starts_with(path, p, cs)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|(name, check)| {
                let value = req.query().split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == &**name).then_some(v)
                });
                match (value, check) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(c)) => c.matches(v),
                }
            })
    }
}

impl HeaderCheck {
    pub(crate) fn compile(h: &envoy::HeaderMatcher) -> Result<HeaderCheck, regex::Error> {
        let (check, present) = match &h.matcher {
            envoy::HeaderMatch::Present(p) => (None, *p),
            envoy::HeaderMatch::String(s) => (Some(StringCheck::compile(s)?), true),
        };
        Ok(HeaderCheck {
            name: h.name.to_ascii_lowercase().into(),
            check,
            present,
            invert: h.invert_match,
            missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// The header's lower-case name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        self.matches_value(req.header(&self.name))
    }

    /// Whether the header, with `value` (`None`: absent), matches.
    pub(crate) fn matches_value(&self, value: Option<Cow<'_, str>>) -> bool {
        let value = match value {
            Some(v) => v,
            None if self.missing_as_empty => Cow::Borrowed(""),
            // Envoy: an absent header matches only `present: false`, or inverted only
            // `present: true`; every value matcher fails on it, inverted or not.
            None => return self.check.is_none() && self.present == self.invert,
        };
        let result = match &self.check {
            None => self.present,
            Some(c) => c.matches(&value),
        };
        result != self.invert
    }
}

impl StringCheck {
    pub(crate) fn compile(s: &envoy::StringMatcher) -> Result<StringCheck, regex::Error> {
        let text = |t: &str| -> Box<str> {
            if s.ignore_case {
                t.to_ascii_lowercase().into()
            } else {
                t.into()
            }
        };
        let pattern = match &s.pattern {
            envoy::StringPattern::Exact(t) => Pattern::Exact(text(t)),
            envoy::StringPattern::Prefix(t) => Pattern::Prefix(text(t)),
            envoy::StringPattern::Suffix(t) => Pattern::Suffix(text(t)),
            envoy::StringPattern::Contains(t) => Pattern::Contains(text(t)),
            envoy::StringPattern::Regex(r) => Pattern::Regex(whole(r)?),
        };
        Ok(StringCheck {
            pattern,
            ignore_case: s.ignore_case,
        })
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        let value: Cow<'_, str> = if self.ignore_case && !matches!(self.pattern, Pattern::Regex(_))
        {
            Cow::Owned(value.to_ascii_lowercase())
        } else {
            Cow::Borrowed(value)
        };
        match &self.pattern {
            Pattern::Exact(t) => *value == **t,
            Pattern::Prefix(t) => value.starts_with(&**t),
            Pattern::Suffix(t) => value.ends_with(&**t),
            Pattern::Contains(t) => value.contains(&**t),
            Pattern::Regex(r) => r.is_match(&value),
        }
    }
}
