#![forbid(unsafe_code)]
//! What the registry gate refused, or would have: the enforcement mode (enforce or audit)
//! and where it comes from, one record, log line and metric sample per refusal, the
//! aggregated list behind `GET /denials`, and the ServiceEntries that would allow it
//! (`GET /learned`, `portcullis learn`).

mod learn;
mod mode;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::SystemTime;

use portcullis_registry::{Enforcement, Refused, Snapshot};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

pub use learn::learned_yaml;
pub use mode::{MODE_ANNOTATION, ModeSource, ModeSwitch, annotation_mode};

/// Distinct (host, port, protocol) records kept; past it new ones are only counted.
const MAX_RECORDS: usize = 4096;
/// Individual refusals kept for `recent`.
const RECENT: usize = 100;
/// The `host` and `destination` labels of refusals past the record limit.
const OVERFLOW: &str = "other";
/// Destination addresses kept per record.
const MAX_DESTINATIONS: usize = 16;

/// How the refused traffic was spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// An HTTP request (HTTP/1.x or h2c), named by Host or `:authority`.
    Http,
    /// A TLS connection, named by its SNI.
    Tls,
    /// Opaque TCP, named by its destination only.
    Tcp,
    /// A `CONNECT host:port` tunnel of the explicit proxy.
    Connect,
}

impl Protocol {
    /// The name used in logs, labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
            Protocol::Connect => "CONNECT",
        }
    }
}

/// One refused connection or request, as the data path saw it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Host, `:authority`, SNI or CONNECT target, without its port.
    pub host: Option<&'a str>,
    /// The original destination, when intercepted.
    pub destination: Option<SocketAddr>,
    /// The port the client meant.
    pub port: u16,
    /// How it was spoken.
    pub protocol: Protocol,
    /// The listener that took it (Envoy's listener name, or the proxy's own listener).
    pub listener: &'a str,
}

/// What the data path does with a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refuse it (enforce mode).
    Deny,
    /// Forward it to where the client meant, as ALLOW_ANY would (audit mode).
    Forward,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Deny => "deny",
            Verdict::Forward => "would_deny",
        }
    }
}

/// Labels of `portcullis_denials_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DenialLabels {
    action: &'static str,
    protocol: &'static str,
    host: String,
    destination: String,
    listener: String,
    port: u16,
    reason: &'static str,
}

/// A name to aggregate by: the host, or the destination address when there is none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    Host(String),
    Address(IpAddr),
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    target: Target,
    port: u16,
    protocol: Protocol,
}

/// One aggregated record.
#[derive(Debug, Clone)]
struct Record {
    denied: u64,
    would_deny: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
    reason: String,
    reason_code: &'static str,
    /// The snapshot version and destination the reason was worked out for.
    explained_for: (u64, Option<SocketAddr>),
    destinations: BTreeSet<SocketAddr>,
    listener: String,
}

#[derive(Debug, Clone)]
struct Recent {
    at: SystemTime,
    host: Option<String>,
    destination: Option<SocketAddr>,
    port: u16,
    protocol: Protocol,
    listener: String,
    verdict: Verdict,
    reason: String,
}

#[derive(Debug, Default)]
struct Store {
    records: HashMap<Key, Record>,
    recent: VecDeque<Recent>,
    /// Refusals not aggregated because the record limit was reached.
    unrecorded: u64,
}

/// The gate's memory of refusals, and the mode that decides what a refusal does.
pub struct Audit {
    mode: ModeSwitch,
    /// The namespace learned ServiceEntries are written for (the workload's).
    namespace: String,
    store: Mutex<Store>,
    denials: Family<DenialLabels, Counter>,
}

impl Audit {
    /// An empty record in `flag` mode (the command line's) for a workload of `namespace`,
    /// its metric registered in `metrics`.
    pub fn new(flag: Enforcement, namespace: &str, metrics: &mut Registry) -> Self {
        let denials = Family::<DenialLabels, Counter>::default();
        metrics.register(
            "portcullis_denials",
            "Refused (action=deny) and audited (action=would_deny) connections and requests to unregistered destinations",
            denials.clone(),
        );
        Audit {
            mode: ModeSwitch::new(flag),
            namespace: namespace.to_string(),
            store: Mutex::default(),
            denials,
        }
    }

    /// The mode switch (admin and annotation settings).
    pub fn mode(&self) -> &ModeSwitch {
        &self.mode
    }

    /// Records a refusal of `seen` by `snapshot`: one log line, one metric sample, one
    /// record; returns what to do with it in the mode in force.
    pub fn refused(&self, snapshot: &Snapshot, seen: Observation<'_>) -> Verdict {
        let verdict = match self.mode.effective(snapshot.enforcement).0 {
            Enforcement::Enforce => Verdict::Deny,
            Enforcement::Audit => Verdict::Forward,
        };
        let host = seen.host.map(|h| {
            h.strip_suffix('.')
                .unwrap_or(h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        });
        let named = host.as_deref().map(|h| (h, h.parse::<IpAddr>().ok()));
        let target = match (named, seen.destination) {
            (Some((_, Some(ip))), _) => Target::Address(ip.to_canonical()),
            (Some((h, None)), _) => Target::Host(h.to_string()),
            (None, Some(d)) => Target::Address(d.ip().to_canonical()),
            (None, None) => Target::Nothing,
        };
        let key = Key {
            target,
            port: seen.port,
            protocol: seen.protocol,
        };
        let now = SystemTime::now();
        let explained_for = (snapshot.version, seen.destination);
        let explain = || {
            snapshot.explain(Refused {
                host: seen.host,
                destination: seen.destination,
                port: seen.port,
            })
        };
        let (reason, code, recorded) = {
            let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
            let store = &mut *store;
            let known = store
                .records
                .get(&key)
                .filter(|r| r.explained_for == explained_for)
                .map(|r| (r.reason.clone(), r.reason_code));
            let (reason, code) = known.unwrap_or_else(|| {
                let r = explain();
                (r.to_string(), r.code())
            });
            let full = store.records.len() >= MAX_RECORDS;
            let recorded = !full || store.records.contains_key(&key);
            match store.records.get_mut(&key) {
                Some(record) => {
                    record.last_seen = now;
                    record.reason.clone_from(&reason);
                    record.reason_code = code;
                    record.explained_for = explained_for;
                    record.listener = seen.listener.to_string();
                    count(record, verdict, seen.destination);
                }
                None if full => store.unrecorded += 1,
                None => {
                    let mut record = Record {
                        denied: 0,
                        would_deny: 0,
                        first_seen: now,
                        last_seen: now,
                        reason: reason.clone(),
                        reason_code: code,
                        explained_for,
                        destinations: BTreeSet::new(),
                        listener: seen.listener.to_string(),
                    };
                    count(&mut record, verdict, seen.destination);
                    store.records.insert(key, record);
                }
            }
            if store.recent.len() == RECENT {
                store.recent.pop_front();
            }
            store.recent.push_back(Recent {
                at: now,
                host: host.clone(),
                destination: seen.destination,
                port: seen.port,
                protocol: seen.protocol,
                listener: seen.listener.to_string(),
                verdict,
                reason: reason.clone(),
            });
            (reason, code, recorded)
        };
        let destination = seen
            .destination
            .map_or_else(|| "-".to_string(), |d| d.to_string());
        let shown_host = host.as_deref().unwrap_or("-");
        let what = match verdict {
            Verdict::Deny => "denied",
            Verdict::Forward => "would deny (audit mode, forwarded)",
        };
        tracing::warn!(
            target: "denial",
            host = shown_host,
            destination = %destination,
            port = seen.port,
            protocol = seen.protocol.as_str(),
            listener = seen.listener,
            reason_code = code,
            "{what}: {reason}"
        );
        // Past the record limit the names are clients' to choose: one series takes them
        // all, so that made-up hosts cannot grow the metrics without bound.
        let (host, destination) = if recorded {
            (shown_host.to_string(), destination)
        } else {
            (OVERFLOW.to_string(), OVERFLOW.to_string())
        };
        self.denials
            .get_or_create(&DenialLabels {
                action: verdict.as_str(),
                protocol: seen.protocol.as_str(),
                host,
                destination,
                listener: seen.listener.to_string(),
                port: seen.port,
                reason: code,
            })
            .inc();
        verdict
    }

    /// `GET /mode`: the mode in force and each layer that may set it, as JSON.
    pub fn mode_json(&self, mesh: Option<Enforcement>) -> String {
        let (mode, source) = self.mode.effective(mesh);
        let layer = |e: Option<Enforcement>| e.map_or(Value::Null, |e| json!(e.as_str()));
        let body = json!({
            "mode": mode.as_str(),
            "source": source.as_str(),
            "admin": layer(self.mode.admin()),
            "annotation": layer(self.mode.annotation()),
            "mesh_config": layer(mesh),
            "flag": self.mode.flag().as_str(),
        });
        format!("{body:#}\n")
    }

    /// `GET /denials`: the aggregated records (most recent first) and the latest
    /// refusals, as JSON.
    pub fn denials_json(&self, mesh: Option<Enforcement>) -> String {
        let (mode, source) = self.mode.effective(mesh);
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<(&Key, &Record)> = store.records.iter().collect();
        records.sort_by(|a, b| b.1.last_seen.cmp(&a.1.last_seen).then(a.0.cmp(b.0)));
        let aggregated: Vec<Value> = records
            .iter()
            .map(|(key, r)| {
                json!({
                    "host": match &key.target { Target::Host(h) => json!(h), _ => Value::Null },
                    "address": match &key.target { Target::Address(a) => json!(a.to_string()), _ => Value::Null },
                    "port": key.port,
                    "protocol": key.protocol.as_str(),
                    "count": r.denied + r.would_deny,
                    "denied": r.denied,
                    "would_deny": r.would_deny,
                    "first_seen": rfc3339(r.first_seen),
                    "last_seen": rfc3339(r.last_seen),
                    "reason": r.reason,
                    "reason_code": r.reason_code,
                    "listener": r.listener,
                    "destinations": r.destinations.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        let recent: Vec<Value> = store
            .recent
            .iter()
            .rev()
            .map(|r| {
                json!({
                    "time": rfc3339(r.at),
                    "host": r.host,
                    "destination": r.destination.map(|d| d.to_string()),
                    "port": r.port,
                    "protocol": r.protocol.as_str(),
                    "listener": r.listener,
                    "action": r.verdict.as_str(),
                    "reason": r.reason,
                })
            })
            .collect();
        let body = json!({
            "mode": mode.as_str(),
            "mode_source": source.as_str(),
            "denials": aggregated,
            "recent": recent,
            "unrecorded": store.unrecorded,
        });
        format!("{body:#}\n")
    }

    /// `GET /learned`: ServiceEntries in the workload's namespace that would allow every
    /// recorded refusal.
    pub fn learned(&self) -> String {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let seen: Vec<learn::Seen<'_>> = store
            .records
            .iter()
            .map(|(key, r)| learn::Seen {
                host: match &key.target {
                    Target::Host(h) => Some(h.as_str()),
                    _ => None,
                },
                address: match &key.target {
                    Target::Address(a) => Some(*a),
                    _ => None,
                },
                port: key.port,
                protocol: key.protocol,
                destinations: r
                    .destinations
                    .iter()
                    .map(|d| d.ip().to_canonical())
                    .collect(),
                count: r.denied + r.would_deny,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
            })
            .collect();
        learned_yaml(&seen, &self.namespace)
    }

    /// Forgets every record (`POST /denials/reset`).
    pub fn reset(&self) {
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = Store::default();
    }
}

fn count(record: &mut Record, verdict: Verdict, destination: Option<SocketAddr>) {
    match verdict {
        Verdict::Deny => record.denied += 1,
        Verdict::Forward => record.would_deny += 1,
    }
    if let Some(d) = destination
        && record.destinations.len() < MAX_DESTINATIONS
    {
        record.destinations.insert(d);
    }
}

/// A time as RFC 3339 in UTC, to the second.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests;
