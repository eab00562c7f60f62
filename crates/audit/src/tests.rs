use std::path::PathBuf;
use std::sync::Arc;

use portcullis_registry::{BuildOptions, Connection, Decision, Request, build};

use super::*;

const BASE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: known, namespace: default}
spec:
  hosts: [known.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
  location: MESH_EXTERNAL
"#;

fn snapshot(yaml: &str) -> Snapshot {
    let loaded = portcullis_model::load_str(yaml, &Arc::new(PathBuf::from("t.yaml")));
    assert!(
        loaded
            .findings
            .iter()
            .all(|f| f.severity != portcullis_model::Severity::Error),
        "{:#?}\n{yaml}",
        loaded.findings
    );
    build(&loaded.resources, &BuildOptions::default(), None, 1)
}

fn audit(flag: Enforcement) -> Audit {
    Audit::new(flag, "default", &mut Registry::default())
}

fn http(host: &'static str, dst: &str) -> Observation<'static> {
    let destination: SocketAddr = dst.parse().unwrap();
    Observation {
        host: Some(host),
        destination: Some(destination),
        port: destination.port(),
        protocol: Protocol::Http,
        listener: "0.0.0.0_80",
    }
}

fn tls(sni: &'static str, dst: &str) -> Observation<'static> {
    Observation {
        protocol: Protocol::Tls,
        listener: "virtualOutbound",
        ..http(sni, dst)
    }
}

fn tcp(dst: &str) -> Observation<'static> {
    Observation {
        host: None,
        protocol: Protocol::Tcp,
        listener: "virtualOutbound",
        ..http("-", dst)
    }
}

/// Whether `snapshot` lets `seen` through (a cluster of the registry takes it).
fn allowed(snapshot: &Snapshot, seen: &Observation<'_>) -> bool {
    let dst = seen.destination.unwrap();
    let decision = match seen.protocol {
        Protocol::Http => {
            let conn = Connection {
                destination: Some(dst.ip()),
                port: dst.port(),
                application_protocols: &["http/1.1"],
                ..Connection::default()
            };
            let req = Request {
                authority: seen.host.unwrap(),
                path: "/",
                method: "GET",
                scheme: "http",
                headers: &(),
            };
            if snapshot.is_tcp_destination(dst.ip(), dst.port()) {
                snapshot.route_tcp(dst.ip(), dst.port())
            } else {
                snapshot.route_request(&conn, &req).decision
            }
        }
        Protocol::Tls => snapshot.route_tls(seen.host, dst.ip(), dst.port()),
        Protocol::Tcp | Protocol::Connect => snapshot.route_tcp(dst.ip(), dst.port()),
    };
    let decision = match decision {
        Decision::Cluster(c)
            if c.resolution == portcullis_registry::Resolution::None
                && !Snapshot::owns_destination(&c, dst.ip()) =>
        {
            Decision::BlackHole
        }
        d => d,
    };
    matches!(decision, Decision::Cluster(_))
}

#[test]
fn enforce_denies_and_audit_forwards_both_recorded_with_their_reason() {
    let base = snapshot(BASE);
    let gate = audit(Enforcement::Enforce);
    let seen = tls("api.foo.com", "203.0.113.7:443");
    assert_eq!(gate.refused(&base, seen), Verdict::Deny);
    gate.mode().set_admin(Some(Enforcement::Audit));
    assert_eq!(gate.refused(&base, seen), Verdict::Forward);
    let json: Value = serde_json::from_str(&gate.denials_json(None)).unwrap();
    assert_eq!(json["mode"], "audit");
    assert_eq!(json["mode_source"], "admin");
    let record = &json["denials"][0];
    assert_eq!(record["host"], "api.foo.com");
    assert_eq!(record["port"], 443);
    assert_eq!(record["protocol"], "TLS");
    assert_eq!(record["count"], 2);
    assert_eq!(record["denied"], 1);
    assert_eq!(record["would_deny"], 1);
    assert_eq!(
        record["reason"],
        "no ServiceEntry for host \"api.foo.com\" on port 443"
    );
    assert_eq!(record["destinations"][0], "203.0.113.7:443");
    assert_eq!(json["recent"][0]["action"], "would_deny");
    assert_eq!(json["recent"][1]["action"], "deny");
}

#[test]
fn the_mesh_config_mode_applies_under_the_admin_and_annotation() {
    let mut base = snapshot(BASE);
    base.enforcement = Some(Enforcement::Audit);
    let gate = audit(Enforcement::Enforce);
    let seen = tcp("10.1.2.3:5432");
    assert_eq!(gate.refused(&base, seen), Verdict::Forward);
    gate.mode().set_annotation(Some(Enforcement::Enforce));
    assert_eq!(gate.refused(&base, seen), Verdict::Deny);
    let json: Value = serde_json::from_str(&gate.denials_json(base.enforcement)).unwrap();
    assert_eq!(json["denials"][0]["address"], "10.1.2.3");
    assert_eq!(
        json["denials"][0]["reason"],
        "port 5432 has no TCP service at 10.1.2.3"
    );
}

#[test]
fn records_are_bounded_and_the_rest_counted() {
    let base = snapshot(BASE);
    let mut metrics = Registry::default();
    let gate = Audit::new(Enforcement::Enforce, "default", &mut metrics);
    for port in 1..=u16::try_from(MAX_RECORDS + 5).unwrap() {
        let dst = format!("10.0.0.1:{port}");
        let dst: &'static str = Box::leak(dst.into_boxed_str());
        gate.refused(&base, tcp(dst));
    }
    let json: Value = serde_json::from_str(&gate.denials_json(None)).unwrap();
    assert_eq!(json["denials"].as_array().unwrap().len(), MAX_RECORDS);
    assert_eq!(json["recent"].as_array().unwrap().len(), RECENT);
    assert_eq!(json["unrecorded"], 5);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("portcullis_denials_total{"))
        .count();
    assert_eq!(
        series,
        MAX_RECORDS + 5,
        "one series per port, the overflow's own"
    );
    assert!(
        text.lines().any(|l| l.contains("host=\"other\"")
            && l.contains("destination=\"other\"")
            && l.contains("port=\"4097\"")),
        "past the limit, host and destination are folded"
    );
    gate.reset();
    let json: Value = serde_json::from_str(&gate.denials_json(None)).unwrap();
    assert!(json["denials"].as_array().unwrap().is_empty());
}

#[test]
fn learned_entries_allow_exactly_what_was_refused() {
    let base = snapshot(BASE);
    let gate = audit(Enforcement::Audit);
    let seen = [
        http("api.foo.com", "203.0.113.7:80"),
        http("API.foo.com", "203.0.113.7:80"),
        tls("pay.bar.com", "203.0.113.8:443"),
        tcp("10.1.2.3:5432"),
        http("10.1.2.4", "10.1.2.4:8080"),
    ];
    for s in seen {
        assert_eq!(gate.refused(&base, s), Verdict::Forward);
        assert!(!allowed(&base, &s));
    }
    let learned = gate.learned();
    let applied = snapshot(&format!("{BASE}---\n{learned}"));
    for s in seen {
        assert!(allowed(&applied, &s), "{s:?} still refused by\n{learned}");
    }
    let unseen = [
        http("other.foo.com", "203.0.113.7:80"),
        http("api.foo.com", "203.0.113.7:8080"),
        tls("pay.bar.com", "203.0.113.8:8443"),
        tls("evil.bar.com", "203.0.113.8:443"),
        tcp("10.1.2.3:5433"),
        tcp("10.1.2.5:5432"),
    ];
    for s in unseen {
        assert!(!allowed(&applied, &s), "{s:?} allowed by\n{learned}");
    }
}
