//! A DestinationRule's `tls` as istiod compiles it into a cluster's transport socket
//! (`pilot/pkg/networking/core/cluster_tls.go`): SIMPLE and MUTUAL become an
//! `UpstreamTlsContext` with the rule's SNI (else `auto_sni`), the rule's SANs (else the
//! ServiceEntry's, else `auto_san_validation` when no SNI is set), the rule's CA file (else
//! the system's, istiod's `file-root:system`), no validation with `insecureSkipVerify`, TLS
//! 1.2 to 1.3, and ALPN `h2` for HTTP/2 clusters. `credentialName` names a Secret of the
//! rule's namespace present among the resources, read as istio-agent reads one.

use std::collections::BTreeMap;

use portcullis_envoy::{
    CertificateValidationContext, DataSource, IstioMutual, StringMatcher, StringPattern,
    TlsCertificate, TlsVersion, TransportSocketMatch, TrustedCa, UpstreamTls, UpstreamTransport,
};
use portcullis_model::{ClientTlsSettings, Object, Secret, TlsMode};

use crate::snapshot::Protocol;

/// A DestinationRule's `tls`, with the namespace its `credentialName` is looked up in.
#[derive(Clone, Copy)]
pub(crate) struct TlsRule<'a> {
    /// The settings.
    pub settings: &'a ClientTlsSettings,
    /// The rule's namespace.
    pub namespace: &'a str,
    /// The subset whose cluster this is, if any (it is part of Istio's SNI).
    pub subset: Option<&'a str>,
}

/// The key of an endpoint's `envoy.transport_socket_match` metadata istiod writes.
pub(crate) const TLS_MODE_KEY: &str = "tlsMode";

/// The SANs a rule without `subjectAltNames` verifies the peer against (istiod's
/// `serviceAccounts` fallback).
#[derive(Clone, Copy)]
pub(crate) struct ServiceSans<'a> {
    /// For ISTIO_MUTUAL: the service's accounts (its workloads' identities and a
    /// ServiceEntry's `subjectAltNames`).
    pub istio_mutual: &'a [String],
    /// For SIMPLE and MUTUAL: the same for a ServiceEntry, none for a Kubernetes Service.
    pub simple: &'a [String],
}

/// The transport of a cluster that `rule` applies to, with `service_sans` when the rule
/// names none. An error is why the cluster's endpoints get no connection: the settings
/// ask for TLS that cannot be set up, and plaintext is never the fallback.
pub(crate) fn transport(
    rule: TlsRule<'_>,
    (host, port, protocol): (&str, u16, Protocol),
    service_sans: ServiceSans<'_>,
    secrets: &[&Object<Secret>],
) -> Result<UpstreamTransport, String> {
    let tls = rule.settings;
    let sni = tls.sni.clone().filter(|s| !s.is_empty());
    let mutual = match tls.mode {
        TlsMode::Disable => return Ok(UpstreamTransport::Plaintext),
        TlsMode::IstioMutual => {
            let sni = sni.unwrap_or_else(|| istio_sni(port, rule.subset, host));
            let sans = if tls.subject_alt_names.is_empty() {
                service_sans.istio_mutual
            } else {
                &tls.subject_alt_names
            };
            return Ok(istio_mutual(sni, protocol, sans));
        }
        TlsMode::Simple => false,
        TlsMode::Mutual => true,
    };
    let service_sans = service_sans.simple;
    let insecure = tls.insecure_skip_verify.unwrap_or(false);
    let sans = if tls.subject_alt_names.is_empty() {
        service_sans
    } else {
        &tls.subject_alt_names
    };
    let (client_certificate, trusted_ca) = match tls.credential_name.as_deref() {
        Some(name) if !name.is_empty() => {
            credential(name, rule.namespace, mutual, insecure, secrets)?
        }
        _ => {
            let client = if mutual {
                match (&tls.client_certificate, &tls.private_key) {
                    (Some(cert), Some(key)) if !cert.is_empty() && !key.is_empty() => {
                        Some(TlsCertificate {
                            certificate_chain: DataSource::File(cert.clone()),
                            private_key: DataSource::File(key.clone()),
                        })
                    }
                    _ => {
                        return Err(
                            "client certificate and private key must not be empty".to_string()
                        );
                    }
                }
            } else {
                None
            };
            let ca = match tls.ca_certificates.as_deref() {
                Some(path) if !path.is_empty() => TrustedCa::Pem(DataSource::File(path.into())),
                _ => TrustedCa::System,
            };
            let crl = tls
                .ca_crl
                .as_deref()
                .filter(|path| !path.is_empty())
                .map(|path| DataSource::File(path.into()));
            (client, (!insecure).then_some((ca, crl)))
        }
    };
    let validation = trusted_ca.map(|(trusted_ca, crl)| CertificateValidationContext {
        trusted_ca,
        match_subject_alt_names: sans.iter().map(|san| exact(san)).collect(),
        crl,
        only_verify_leaf_cert_crl: false,
    });
    Ok(UpstreamTransport::Tls(std::sync::Arc::new(UpstreamTls {
        auto_sni: sni.is_none(),
        auto_san_validation: sni.is_none() && tls.subject_alt_names.is_empty() && !insecure,
        sni,
        alpn_protocols: if protocol == Protocol::Http2 {
            vec!["h2".into()]
        } else {
            Vec::new()
        },
        min_version: TlsVersion::Tls12,
        max_version: TlsVersion::Tls13,
        client_certificate,
        validation,
    })))
}

/// istiod's SNI for Istio mutual TLS to a service port (and subset):
/// `outbound_.PORT_.SUBSET_.HOST`.
pub(crate) fn istio_sni(port: u16, subset: Option<&str>, host: &str) -> String {
    let subset = subset.unwrap_or_default();
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// ISTIO_MUTUAL as istiod writes it (`buildIstioMutualTLS`): SNI `sni`, the peer's
/// identities `sans`, ALPN with Istio's metadata exchange (and `h2` for HTTP/2 clusters);
/// the certificates are the workload's.
pub(crate) fn istio_mutual(sni: String, protocol: Protocol, sans: &[String]) -> UpstreamTransport {
    let mut alpn_protocols = vec!["istio-peer-exchange".to_owned(), "istio".to_owned()];
    if protocol == Protocol::Http2 {
        alpn_protocols.push("h2".into());
    }
    UpstreamTransport::IstioMutualTls(std::sync::Arc::new(IstioMutual {
        sni: Some(sni),
        alpn_protocols,
        match_subject_alt_names: sans.iter().map(|san| exact(san)).collect(),
    }))
}

/// istiod's auto mutual TLS matches: `mutual` for endpoints whose metadata says
/// `tlsMode: istio`, plaintext for every other.
pub(crate) fn auto_mtls_matches(mutual: UpstreamTransport) -> Vec<TransportSocketMatch> {
    vec![
        TransportSocketMatch {
            name: "tlsMode-istio".to_owned(),
            match_metadata: BTreeMap::from([(TLS_MODE_KEY.to_owned(), "istio".to_owned())]),
            transport: mutual,
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".to_owned(),
            match_metadata: BTreeMap::new(),
            transport: UpstreamTransport::Plaintext,
        },
    ]
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        pattern: StringPattern::Exact(value.to_owned()),
        ignore_case: false,
    }
}

/// Trusted CAs, and the revocation list if there is one.
type Validation = (TrustedCa, Option<DataSource>);

/// The client certificate (MUTUAL) and trusted CA (unless `insecure`) of `credentialName`:
/// a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`) or a generic one (`cert`,
/// `key`, `cacert`), the CA also from a `NAME-cacert` Secret, which wins, with that
/// Secret's revocation list (`ca.crl`) if it has one.
fn credential(
    name: &str,
    namespace: &str,
    mutual: bool,
    insecure: bool,
    secrets: &[&Object<Secret>],
) -> Result<(Option<TlsCertificate>, Option<Validation>), String> {
    let find = |name: &str| {
        secrets
            .iter()
            .find(|s| s.meta.name == name && s.meta.namespace == namespace)
    };
    let value = |secret: &Object<Secret>, keys: [&str; 2]| {
        keys.iter()
            .find_map(|k| secret.spec.data.get(*k))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let secret = find(name);
    let client = if mutual {
        let secret =
            secret.ok_or_else(|| format!("credentialName {name}: no Secret {namespace}/{name}"))?;
        match (
            value(secret, ["tls.crt", "cert"]),
            value(secret, ["tls.key", "key"]),
        ) {
            (Some(cert), Some(key)) => Some(TlsCertificate {
                certificate_chain: DataSource::Inline(cert),
                private_key: DataSource::Inline(key),
            }),
            _ => {
                return Err(format!(
                    "credentialName {name}: Secret {namespace}/{name} has no tls.crt and tls.key (or cert and key)"
                ));
            }
        }
    } else {
        None
    };
    if insecure {
        return Ok((client, None));
    }
    let ca_of = |s: &Object<Secret>| {
        let crl = s.spec.data.get("ca.crl").filter(|v| !v.is_empty()).cloned();
        value(s, ["ca.crt", "cacert"]).map(|ca| (ca, crl))
    };
    let (ca, crl) = find(&format!("{name}-cacert"))
        .and_then(|s| ca_of(s))
        .or_else(|| secret.and_then(|s| ca_of(s)))
        .ok_or_else(|| {
            format!(
                "credentialName {name}: no CA certificate (ca.crt or cacert) in Secret {namespace}/{name} or {namespace}/{name}-cacert"
            )
        })?;
    Ok((
        client,
        Some((
            TrustedCa::Pem(DataSource::Inline(ca)),
            crl.map(DataSource::Inline),
        )),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use portcullis_model::{ObjectMeta, Origin, Position};

    use super::*;

    const NO_SANS: ServiceSans<'static> = ServiceSans {
        istio_mutual: &[],
        simple: &[],
    };

    fn same(sans: &[String]) -> ServiceSans<'_> {
        ServiceSans {
            istio_mutual: sans,
            simple: sans,
        }
    }

    fn svc(protocol: Protocol) -> (&'static str, u16, Protocol) {
        ("api.example.com", 443, protocol)
    }

    fn rule(settings: &ClientTlsSettings) -> TlsRule<'_> {
        TlsRule {
            settings,
            namespace: "default",
            subset: None,
        }
    }

    fn context(t: UpstreamTransport) -> UpstreamTls {
        match t {
            UpstreamTransport::Tls(tls) => (*tls).clone(),
            other => panic!("not TLS: {other:?}"),
        }
    }

    fn secret(name: &str, data: &[(&str, &str)]) -> Object<Secret> {
        Object {
            meta: ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            },
            spec: Secret {
                kind: "kubernetes.io/tls".into(),
                data: data
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                    .collect::<BTreeMap<_, _>>(),
            },
            origin: Origin {
                file: Arc::new(PathBuf::from("s.yaml")),
                line: 1,
                name: Position { line: 1, column: 1 },
            },
        }
    }

    #[test]
    fn simple_without_sni_or_ca_is_auto_sni_and_system_roots_as_istiod_writes_it() {
        let settings = ClientTlsSettings {
            mode: TlsMode::Simple,
            ..Default::default()
        };
        let tls = context(transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[]).unwrap());
        assert!(tls.auto_sni && tls.auto_san_validation && tls.sni.is_none());
        assert_eq!(
            (tls.min_version, tls.max_version),
            (TlsVersion::Tls12, TlsVersion::Tls13)
        );
        let v = tls.validation.unwrap();
        assert_eq!(v.trusted_ca, TrustedCa::System);
        assert!(v.match_subject_alt_names.is_empty());
        assert!(tls.alpn_protocols.is_empty() && tls.client_certificate.is_none());
    }

    #[test]
    fn sni_sans_ca_file_and_http2_alpn_are_the_rules() {
        let settings = ClientTlsSettings {
            mode: TlsMode::Simple,
            sni: Some("api.example.com".into()),
            ca_certificates: Some("/etc/certs/ca.pem".into()),
            ..Default::default()
        };
        // The ServiceEntry's subjectAltNames when the rule has none.
        let sans = ["spiffe://example/ns/a/sa/b".to_owned()];
        let tls =
            context(transport(rule(&settings), svc(Protocol::Http2), same(&sans), &[]).unwrap());
        assert_eq!(tls.sni.as_deref(), Some("api.example.com"));
        assert!(!tls.auto_sni && !tls.auto_san_validation);
        assert_eq!(tls.alpn_protocols, ["h2"]);
        let v = tls.validation.unwrap();
        assert_eq!(
            v.trusted_ca,
            TrustedCa::Pem(DataSource::File("/etc/certs/ca.pem".into()))
        );
        assert_eq!(
            v.match_subject_alt_names[0].pattern,
            StringPattern::Exact(sans[0].clone())
        );
        // insecureSkipVerify: no validation context at all.
        let insecure = ClientTlsSettings {
            insecure_skip_verify: Some(true),
            ..settings
        };
        let tls = context(transport(rule(&insecure), svc(Protocol::Http), NO_SANS, &[]).unwrap());
        assert!(tls.validation.is_none() && !tls.auto_san_validation);
    }

    #[test]
    fn mutual_needs_its_certificate_and_key() {
        let settings = ClientTlsSettings {
            mode: TlsMode::Mutual,
            client_certificate: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[]).is_err());
        let settings = ClientTlsSettings {
            private_key: Some("/k.pem".into()),
            ..settings
        };
        let tls = context(transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[]).unwrap());
        assert_eq!(
            tls.client_certificate.unwrap().private_key,
            DataSource::File("/k.pem".into())
        );
    }

    #[test]
    fn credential_name_reads_the_secret_and_its_cacert_companion() {
        let settings = ClientTlsSettings {
            mode: TlsMode::Mutual,
            credential_name: Some("client".into()),
            ..Default::default()
        };
        let tls_secret = secret(
            "client",
            &[("tls.crt", "CERT"), ("tls.key", "KEY"), ("ca.crt", "CA")],
        );
        let tls = context(
            transport(
                rule(&settings),
                svc(Protocol::Http),
                NO_SANS,
                &[&tls_secret],
            )
            .unwrap(),
        );
        let cert = tls.client_certificate.unwrap();
        assert_eq!(cert.certificate_chain, DataSource::Inline(b"CERT".to_vec()));
        let validation = tls.validation.unwrap();
        assert_eq!(
            validation.trusted_ca,
            TrustedCa::Pem(DataSource::Inline(b"CA".to_vec()))
        );
        assert_eq!(validation.crl, None);
        let generic = secret("client", &[("cert", "C2"), ("key", "K2")]);
        let companion = secret("client-cacert", &[("cacert", "CA2"), ("ca.crl", "CRL2")]);
        let tls = context(
            transport(
                rule(&settings),
                svc(Protocol::Http),
                NO_SANS,
                &[&generic, &companion],
            )
            .unwrap(),
        );
        let validation = tls.validation.unwrap();
        assert_eq!(
            validation.trusted_ca,
            TrustedCa::Pem(DataSource::Inline(b"CA2".to_vec()))
        );
        // The companion's revocation list comes with its CA.
        assert_eq!(validation.crl, Some(DataSource::Inline(b"CRL2".to_vec())));
        // No CA anywhere, or no Secret: refused, never plaintext.
        assert!(transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[&generic]).is_err());
        assert!(transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[]).is_err());
        // Another namespace's Secret is not the rule's.
        let mut elsewhere = tls_secret.clone();
        elsewhere.meta.namespace = "other".into();
        assert!(transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[&elsewhere]).is_err());
    }

    #[test]
    fn disable_and_istio_mutual() {
        let mut settings = ClientTlsSettings::default();
        assert_eq!(
            transport(rule(&settings), svc(Protocol::Http), NO_SANS, &[]),
            Ok(UpstreamTransport::Plaintext)
        );
        settings.mode = TlsMode::IstioMutual;
        let sans = ["spiffe://cluster.local/ns/default/sa/api".to_owned()];
        let Ok(UpstreamTransport::IstioMutualTls(m)) =
            transport(rule(&settings), svc(Protocol::Http2), same(&sans), &[])
        else {
            panic!("not Istio mutual TLS");
        };
        assert_eq!(m.sni.as_deref(), Some("outbound_.443_._.api.example.com"));
        assert_eq!(m.alpn_protocols, ["istio-peer-exchange", "istio", "h2"]);
        assert_eq!(m.match_subject_alt_names, [exact(&sans[0])]);
        let in_subset = TlsRule {
            subset: Some("v1"),
            ..rule(&settings)
        };
        let Ok(UpstreamTransport::IstioMutualTls(m)) =
            transport(in_subset, svc(Protocol::Http), same(&sans), &[])
        else {
            panic!("not Istio mutual TLS");
        };
        assert_eq!(m.sni.as_deref(), Some("outbound_.443_.v1_.api.example.com"));
    }
}
