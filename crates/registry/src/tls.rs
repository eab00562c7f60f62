//! TLS origination: an `UpstreamTlsContext` of the model compiled once per snapshot into a
//! rustls client configuration, so that a connection only clones an `Arc`.
//!
//! Verification follows Envoy's, not a browser's: without a validation context nothing is
//! verified; with one, the chain must end in its CAs and, when SAN matchers are given, one
//! SAN (DNS, URI, email or IP) must match one of them. The host name is checked only under
//! `auto_san_validation`, against the SNI sent, and then instead of the matchers. With
//! revocation lists (`crl`), every certificate of the chain below the trusted CA must have
//! its issuer's list and not be on it (only the server's own with
//! `only_verify_leaf_cert_crl`), as Envoy's BoringSSL checks `X509_V_FLAG_CRL_CHECK_ALL`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use crate::route::StringCheck;
use portcullis_envoy as envoy;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A compiled TLS origination: what a connection to an endpoint of the cluster needs.
#[derive(Debug)]
pub struct TlsOrigin {
    /// The rustls configuration, shared by every connection.
    pub config: Arc<ClientConfig>,
    /// The SNI the context names, if any.
    pub sni: Option<Arc<str>>,
    /// Whether the request's host is sent as SNI when `sni` is unset.
    pub auto_sni: bool,
    /// Identifies the context's settings (not the snapshot it was built in): connections
    /// are pooled per endpoint and per this and the SNI, so two contexts never share one.
    pub fingerprint: u64,
}

impl TlsOrigin {
    /// The SNI for a connection: the context's, else (under `auto_sni`) the request's host
    /// without a port; `None` sends no SNI.
    pub fn server_name(&self, host: Option<&str>) -> Option<Arc<str>> {
        if let Some(sni) = &self.sni {
            return Some(Arc::clone(sni));
        }
        let host = host.filter(|_| self.auto_sni)?;
        let (name, _) = crate::split_host_port(host).ok()?;
        let name = name.trim_end_matches('.');
        (!name.is_empty()).then(|| name.to_ascii_lowercase().into())
    }
}

/// The workload's Istio identity: what istio-agent writes with `OUTPUT_CERTS`
/// (`cert-chain.pem`, `key.pem`, `root-cert.pem`), read whole.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// The PEM certificate chain, leaf first.
    pub cert_chain: Vec<u8>,
    /// The PEM private key.
    pub key: Vec<u8>,
    /// The PEM mesh root(s).
    pub root: Vec<u8>,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadIdentity")
    }
}

impl WorkloadIdentity {
    /// Reads istio-agent's three files from `dir`.
    pub fn read(dir: &std::path::Path) -> std::io::Result<WorkloadIdentity> {
        Ok(WorkloadIdentity {
            cert_chain: std::fs::read(dir.join("cert-chain.pem"))?,
            key: std::fs::read(dir.join("key.pem"))?,
            root: std::fs::read(dir.join("root-cert.pem"))?,
        })
    }
}

/// An endpoint's Istio mutual TLS: istiod's settings, compiled with the workload's
/// identity on the first connection after the identity (or the snapshot) changes; later
/// connections clone the result.
#[derive(Debug)]
pub struct IstioPeer {
    settings: Arc<envoy::IstioMutual>,
    compiled: arc_swap::ArcSwapOption<(Arc<WorkloadIdentity>, Arc<TlsOrigin>)>,
}

impl IstioPeer {
    /// The peer for istiod's `settings`.
    pub fn new(settings: Arc<envoy::IstioMutual>) -> IstioPeer {
        IstioPeer {
            settings,
            compiled: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The TLS to originate with `identity`: TLS 1.2 to 1.3, the workload's certificate,
    /// the mesh root as the only trusted CA, the peer's SANs.
    pub fn origin(
        &self,
        identity: &Arc<WorkloadIdentity>,
    ) -> Result<Arc<TlsOrigin>, TlsConfigError> {
        if let Some(done) = &*self.compiled.load()
            && Arc::ptr_eq(&done.0, identity)
        {
            return Ok(Arc::clone(&done.1));
        }
        let m = &self.settings;
        let tls = envoy::UpstreamTls {
            sni: m.sni.clone(),
            auto_sni: false,
            auto_san_validation: false,
            alpn_protocols: m.alpn_protocols.clone(),
            min_version: envoy::TlsVersion::Tls12,
            max_version: envoy::TlsVersion::Tls13,
            client_certificate: Some(envoy::TlsCertificate {
                certificate_chain: envoy::DataSource::Inline(identity.cert_chain.clone()),
                private_key: envoy::DataSource::Inline(identity.key.clone()),
            }),
            validation: Some(envoy::CertificateValidationContext {
                trusted_ca: envoy::TrustedCa::Pem(envoy::DataSource::Inline(identity.root.clone())),
                match_subject_alt_names: m.match_subject_alt_names.clone(),
                crl: None,
                only_verify_leaf_cert_crl: false,
            }),
        };
        let origin = Arc::new(compile(&tls)?);
        self.compiled
            .store(Some(Arc::new((Arc::clone(identity), Arc::clone(&origin)))));
        Ok(origin)
    }
}

/// Why an `UpstreamTlsContext` cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A file of the context cannot be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// PEM data holds no certificate, no key, or is malformed.
    #[error("{what}: {why}")]
    Pem {
        /// Which data (trusted CA, certificate chain, private key).
        what: &'static str,
        /// Why.
        why: String,
    },
    /// rustls refused the settings (e.g. a key that does not match the certificate).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The system trust store has no certificate.
    #[error("no system CA certificates found")]
    NoSystemRoots,
}

/// Compiles a context of the model.
pub fn compile(tls: &envoy::UpstreamTls) -> Result<TlsOrigin, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (envoy::TlsVersion::Tls12, &rustls::version::TLS12),
        (envoy::TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (tls.min_version..=tls.max_version).contains(v))
    .map(|(_, v)| v)
    .collect();
    if versions.is_empty() {
        return Err(TlsConfigError::Pem {
            what: "tls_params",
            why: "no TLS version portcullis speaks (1.2, 1.3) is in the allowed range".into(),
        });
    }
    let verifier = Verifier::new(tls, provider.signature_verification_algorithms)?;
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match &tls.client_certificate {
        Some(cert) => {
            let chain = certificates(&cert.certificate_chain, "certificate chain")?;
            let key = private_key(&cert.private_key)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let mut hasher = DefaultHasher::new();
    tls.hash(&mut hasher);
    Ok(TlsOrigin {
        config: Arc::new(config),
        sni: tls.sni.as_deref().map(Arc::from),
        auto_sni: tls.auto_sni,
        fingerprint: hasher.finish(),
    })
}

fn read(source: &envoy::DataSource) -> Result<Vec<u8>, TlsConfigError> {
    match source {
        envoy::DataSource::Inline(bytes) => Ok(bytes.clone()),
        envoy::DataSource::File(path) => {
            std::fs::read(path).map_err(|error| TlsConfigError::Read {
                path: path.clone(),
                error,
            })
        }
    }
}

fn certificates(
    source: &envoy::DataSource,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read(source)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::Pem {
            what,
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Pem {
            what,
            why: "no PEM certificate".into(),
        });
    }
    Ok(certs)
}

fn private_key(source: &envoy::DataSource) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read(source)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsConfigError::Pem {
        what: "private key",
        why: e.to_string(),
    })
}

fn roots(v: &envoy::CertificateValidationContext) -> Result<Arc<RootCertStore>, TlsConfigError> {
    match &v.trusted_ca {
        envoy::TrustedCa::System => system_roots(),
        envoy::TrustedCa::Pem(source) => {
            let mut store = RootCertStore::empty();
            for cert in certificates(source, "trusted CA")? {
                store.add(cert).map_err(|e| TlsConfigError::Pem {
                    what: "trusted CA",
                    why: e.to_string(),
                })?;
            }
            Ok(Arc::new(store))
        }
    }
}

/// The operating system's trusted CAs, read once: every cluster that trusts them shares
/// one store, and a reload does not parse the bundle again.
fn system_roots() -> Result<Arc<RootCertStore>, TlsConfigError> {
    static SYSTEM: OnceLock<Option<Arc<RootCertStore>>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            (added > 0).then(|| Arc::new(store))
        })
        .clone()
        .ok_or(TlsConfigError::NoSystemRoots)
}

/// Envoy's certificate verification (see the module's documentation).
#[derive(Debug)]
struct Verifier {
    /// `None`: no validation context, nothing is verified.
    roots: Option<Arc<RootCertStore>>,
    subject_alt_names: Vec<SanMatcher>,
    auto_san_validation: bool,
    algorithms: WebPkiSupportedAlgorithms,
    revocation: Option<Revocation>,
}

/// A validation context's revocation lists, parsed once.
#[derive(Debug)]
struct Revocation {
    lists: Vec<webpki::CertRevocationList<'static>>,
    depth: webpki::RevocationCheckDepth,
}

impl Revocation {
    fn compile(
        v: &envoy::CertificateValidationContext,
    ) -> Result<Option<Revocation>, TlsConfigError> {
        let Some(source) = &v.crl else {
            return Ok(None);
        };
        let bad = |why: String| TlsConfigError::Pem {
            what: "certificate revocation list",
            why,
        };
        let pem = read(source)?;
        let lists = CertificateRevocationListDer::pem_slice_iter(&pem)
            .map(|der| {
                let der = der.map_err(|e| bad(e.to_string()))?;
                webpki::OwnedCertRevocationList::from_der(der.as_ref())
                    .map(webpki::CertRevocationList::from)
                    .map_err(|e| bad(format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if lists.is_empty() {
            return Err(bad("no PEM X509 CRL".into()));
        }
        Ok(Some(Revocation {
            lists,
            depth: if v.only_verify_leaf_cert_crl {
                webpki::RevocationCheckDepth::EndEntity
            } else {
                webpki::RevocationCheckDepth::Chain
            },
        }))
    }

    /// Checks the chain of `end_entity` (already verified to end in `roots`) against the
    /// lists, in OpenSSL's words when it fails.
    fn check(
        &self,
        (end_entity, intermediates): (&CertificateDer<'_>, &[CertificateDer<'_>]),
        roots: &RootCertStore,
        now: UnixTime,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<(), rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| verify_failed(format!("{e:?}")))?;
        let lists: Vec<&webpki::CertRevocationList<'_>> = self.lists.iter().collect();
        let options = webpki::RevocationOptionsBuilder::new(&lists)
            .map_err(|_| verify_failed("no certificate revocation list".into()))?
            .with_depth(self.depth)
            .with_status_policy(webpki::UnknownStatusPolicy::Deny)
            .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
            .build();
        cert.verify_for_usage(
            algorithms.all,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(options),
            None,
        )
        .map(|_| ())
        .map_err(|e| {
            let reason = match e {
                webpki::Error::CertRevoked => "certificate revoked".to_string(),
                webpki::Error::UnknownRevocationStatus => {
                    "unable to get certificate CRL".to_string()
                }
                other => format!("{other:?}"),
            };
            verify_failed(format!(
                "X509_verify_cert: certificate verification error at depth 0: {reason}"
            ))
        })
    }
}

impl Verifier {
    fn new(
        tls: &envoy::UpstreamTls,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Result<Verifier, TlsConfigError> {
        Ok(Verifier {
            roots: tls.validation.as_ref().map(roots).transpose()?,
            subject_alt_names: tls
                .validation
                .iter()
                .flat_map(|v| &v.match_subject_alt_names)
                .map(SanMatcher::compile)
                .collect::<Result<_, _>>()?,
            auto_san_validation: tls.auto_san_validation && tls.validation.is_some(),
            algorithms,
            revocation: tls
                .validation
                .as_ref()
                .map(Revocation::compile)
                .transpose()?
                .flatten(),
        })
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(c) => verify_failed(format!(
                "X509_verify_cert: certificate verification error at depth 0: {}",
                x509_reason(&c)
            )),
            other => other,
        })?;
        if let Some(revocation) = &self.revocation {
            revocation.check((end_entity, intermediates), roots, now, &self.algorithms)?;
        }
        let sans = || subject_alt_names(end_entity).unwrap_or_default();
        // Envoy's `auto_san_validation` replaces the configured SAN matchers with the host
        // the request names, which is the SNI sent (`auto_sni`); without one (no host, as
        // for TCP) the matchers apply.
        if self.auto_san_validation
            && let ServerName::DnsName(name) = server_name
        {
            if verify_server_name(&cert, server_name).is_err() {
                return Err(verify_failed(format!(
                    "verify SAN list, expected SANs: [{}], certificate SANs: [{}]",
                    name.as_ref(),
                    listed(&sans())
                )));
            }
        } else if !self.subject_alt_names.is_empty() {
            let sans = sans();
            if !sans
                .iter()
                .any(|san| self.subject_alt_names.iter().any(|m| m.matches(san)))
            {
                return Err(verify_failed(format!(
                    "SAN matcher, certificate SANs are [{}]",
                    listed(&sans)
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why Envoy's verification failed, in its words (the part after `verify cert failed: `).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct VerifyFailed(String);

fn verify_failed(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        VerifyFailed(why),
    ))))
}

/// OpenSSL's `X509_verify_cert_error_string` for what webpki found.
fn x509_reason(e: &CertificateError) -> String {
    match e {
        CertificateError::UnknownIssuer => "unable to get local issuer certificate".into(),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate is not yet valid".into()
        }
        CertificateError::BadSignature => "certificate signature failure".into(),
        CertificateError::Revoked => "certificate revoked".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "unsupported certificate purpose".into()
        }
        other => format!("{other:?}"),
    }
}

/// SANs as Envoy lists them: comma and space separated.
fn listed(sans: &[SubjectAltName]) -> String {
    sans.iter()
        .map(|san| match san {
            SubjectAltName::Dns(v) | SubjectAltName::Uri(v) | SubjectAltName::Email(v) => v.clone(),
            SubjectAltName::Ip(ip) => ip.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One subject alternative name of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SubjectAltName {
    /// `dNSName`.
    Dns(String),
    /// `uniformResourceIdentifier` (SPIFFE IDs).
    Uri(String),
    /// `rfc822Name`.
    Email(String),
    /// `iPAddress`.
    Ip(IpAddr),
}

/// The SANs of a DER certificate.
fn subject_alt_names(der: &[u8]) -> Option<Vec<SubjectAltName>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let Some(san) = cert.subject_alternative_name().ok()? else {
        return Some(Vec::new());
    };
    Some(
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(n) => Some(SubjectAltName::Dns((*n).to_owned())),
                GeneralName::URI(u) => Some(SubjectAltName::Uri((*u).to_owned())),
                GeneralName::RFC822Name(e) => Some(SubjectAltName::Email((*e).to_owned())),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                    _ => None,
                }
                .map(SubjectAltName::Ip),
                _ => None,
            })
            .collect(),
    )
}

/// One of `match_subject_alt_names`, compiled.
#[derive(Debug)]
struct SanMatcher {
    /// The value of an exact matcher, compared to DNS SANs with wildcards.
    exact: Option<String>,
    check: StringCheck,
}

impl SanMatcher {
    /// Compiles a matcher; a regex that does not compile is an error.
    fn compile(m: &envoy::StringMatcher) -> Result<SanMatcher, TlsConfigError> {
        let check = StringCheck::compile(m).map_err(|e| TlsConfigError::Pem {
            what: "match_subject_alt_names",
            why: e.to_string(),
        })?;
        let exact = match &m.pattern {
            envoy::StringPattern::Exact(v) => Some(v.clone()),
            _ => None,
        };
        Ok(SanMatcher { exact, check })
    }

    /// Whether `san` satisfies the matcher as Envoy's `match_subject_alt_names` does: an
    /// exact matcher on a DNS SAN honours a wildcard certificate name (`*.example.com`
    /// covers `api.example.com`); everything else is the plain string match.
    fn matches(&self, san: &SubjectAltName) -> bool {
        match san {
            SubjectAltName::Dns(name) => match &self.exact {
                Some(want) => dns_name_matches(want, name),
                None => self.check.matches(name),
            },
            SubjectAltName::Uri(v) | SubjectAltName::Email(v) => self.check.matches(v),
            SubjectAltName::Ip(ip) => self.check.matches(&ip.to_string()),
        }
    }
}

/// Envoy's `dnsNameMatch`: equal ignoring case, or `pattern` is `*.rest` and `name` is one
/// label followed by `.rest`.
fn dns_name_matches(name: &str, pattern: &str) -> bool {
    let (name, pattern) = (name.to_ascii_lowercase(), pattern.to_ascii_lowercase());
    if name == pattern {
        return true;
    }
    match (pattern.strip_prefix('*'), name.find('.')) {
        (Some(suffix), Some(dot)) if suffix.starts_with('.') && dot > 0 => name[dot..] == *suffix,
        _ => false,
    }
}

/// What Envoy logs as the transport failure reason of a failed handshake (BoringSSL's
/// error queue as Envoy prints it), for the access log and the 503 body.
pub fn failure_reason(error: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(e) = error {
        let detail = match e {
            CertificateError::Other(why) => why.to_string(),
            other => format!("X509_verify_cert: {}", x509_reason(other)),
        };
        return format!(
            "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: {detail}:TLS_error_end"
        );
    }
    let (code, what) = match error {
        rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure) => {
            (268436496, "SSLV3_ALERT_HANDSHAKE_FAILURE")
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            (268436564, "TLSV1_ALERT_CERTIFICATE_REQUIRED")
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate) => {
            (268436498, "SSLV3_ALERT_BAD_CERTIFICATE")
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA) => {
            (268436528, "TLSV1_ALERT_UNKNOWN_CA")
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion) => {
            (268436526, "TLSV1_ALERT_PROTOCOL_VERSION")
        }
        rustls::Error::NoApplicationProtocol => (268435654, "NO_APPLICATION_PROTOCOL"),
        rustls::Error::PeerIncompatible(_) => (268435696, "UNSUPPORTED_PROTOCOL"),
        _ => (268435612, "HANDSHAKE_FAILURE_ON_CLIENT_HELLO"),
    };
    format!("TLS_error:|{code}:SSL routines:OPENSSL_internal:{what}:TLS_error_end")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    struct Ca {
        pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn ca() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Each CA its own name, as real ones: a chain is then matched to its issuer by name.
        let name = format!("test CA {}", fastrand::u64(..));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf of `ca` for `names`, valid from `from` for a day.
    fn leaf(ca: &Ca, names: &[&str], from: SystemTime) -> CertificateDer<'static> {
        numbered_leaf(ca, names, from, fastrand::u64(1..))
    }

    /// [`leaf`] with serial number `serial`.
    fn numbered_leaf(
        ca: &Ca,
        names: &[&str],
        from: SystemTime,
        serial: u64,
    ) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.serial_number = Some(serial.into());
        params.not_before = from.into();
        params.not_after = (from + Duration::from_secs(86_400)).into();
        let key = rcgen::KeyPair::generate().unwrap();
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    fn context(ca: Option<&Ca>, sans: Vec<envoy::StringMatcher>) -> envoy::UpstreamTls {
        envoy::UpstreamTls {
            sni: None,
            auto_sni: false,
            auto_san_validation: false,
            alpn_protocols: Vec::new(),
            min_version: envoy::TlsVersion::Tls12,
            max_version: envoy::TlsVersion::Tls13,
            client_certificate: None,
            validation: ca.map(|ca| envoy::CertificateValidationContext {
                trusted_ca: envoy::TrustedCa::Pem(envoy::DataSource::Inline(
                    ca.pem.clone().into_bytes(),
                )),
                match_subject_alt_names: sans,
                crl: None,
                only_verify_leaf_cert_crl: false,
            }),
        }
    }

    fn exact(v: &str) -> envoy::StringMatcher {
        envoy::StringMatcher {
            pattern: envoy::StringPattern::Exact(v.into()),
            ignore_case: false,
        }
    }

    fn verify(
        tls: &envoy::UpstreamTls,
        cert: &CertificateDer<'_>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let provider = rustls::crypto::ring::default_provider();
        let verifier = Verifier::new(tls, provider.signature_verification_algorithms).unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn now() -> SystemTime {
        SystemTime::now() - Duration::from_secs(3600)
    }

    /// Envoy 1.40's transport failure reason for a verification that failed so.
    fn envoys(detail: &str) -> String {
        format!(
            "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: {detail}:TLS_error_end"
        )
    }

    fn reason(result: Result<(), rustls::Error>) -> String {
        failure_reason(&result.expect_err("verification fails"))
    }

    #[test]
    fn the_chain_must_end_in_the_trusted_ca() {
        let (trusted, other) = (ca(), ca());
        let tls = context(Some(&trusted), Vec::new());
        assert!(verify(&tls, &leaf(&trusted, &["api.example.com"], now()), "x.test").is_ok());
        assert_eq!(
            reason(verify(
                &tls,
                &leaf(&other, &["api.example.com"], now()),
                "x.test"
            )),
            envoys(
                "X509_verify_cert: certificate verification error at depth 0: unable to get local issuer certificate"
            )
        );
        let expired = leaf(
            &trusted,
            &["api.example.com"],
            SystemTime::now() - Duration::from_secs(3 * 86_400),
        );
        assert_eq!(
            reason(verify(&tls, &expired, "x.test")),
            envoys(
                "X509_verify_cert: certificate verification error at depth 0: certificate has expired"
            )
        );
        // Without a validation context Envoy verifies nothing (insecureSkipVerify).
        assert!(verify(&context(None, Vec::new()), &expired, "x.test").is_ok());
    }

    #[test]
    fn subject_alt_names_are_matched_as_envoy_does() {
        let ca = ca();
        let cert = leaf(&ca, &["*.example.com", "spiffe://td/ns/a/sa/b"], now());
        let with = |sans| context(Some(&ca), sans);
        assert!(verify(&with(vec![exact("api.example.com")]), &cert, "x.test").is_ok());
        assert!(verify(&with(vec![exact("example.com")]), &cert, "x.test").is_err());
        assert!(verify(&with(vec![exact("a.b.example.com")]), &cert, "x.test").is_err());
        let prefix = envoy::StringMatcher {
            pattern: envoy::StringPattern::Prefix("spiffe://td/".into()),
            ignore_case: false,
        };
        assert!(verify(&with(vec![exact("nope.test"), prefix]), &cert, "x.test").is_ok());
        assert_eq!(
            reason(verify(&with(vec![exact("other.test")]), &cert, "x.test")),
            envoys("SAN matcher, certificate SANs are [*.example.com, spiffe://td/ns/a/sa/b]")
        );
    }

    #[test]
    fn auto_san_validation_checks_the_sni_sent() {
        let ca = ca();
        let cert = leaf(&ca, &["api.example.com", "sans.example.com"], now());
        let mut tls = context(Some(&ca), Vec::new());
        assert!(verify(&tls, &cert, "other.test").is_ok());
        tls.auto_san_validation = true;
        assert!(verify(&tls, &cert, "api.example.com").is_ok());
        assert_eq!(
            reason(verify(&tls, &cert, "other.test")),
            envoys(
                "verify SAN list, expected SANs: [other.test], certificate SANs: [api.example.com, sans.example.com]"
            )
        );
        // The host replaces the configured matchers, as in Envoy.
        let mut both = context(Some(&ca), vec![exact("billing.example.com")]);
        both.auto_san_validation = true;
        assert!(verify(&both, &cert, "api.example.com").is_ok());
        assert!(verify(&both, &cert, "other.test").is_err());
    }

    #[test]
    fn sni_is_the_contexts_or_under_auto_sni_the_requests_host() {
        let ca = ca();
        let mut tls = context(Some(&ca), Vec::new());
        let origin = compile(&tls).unwrap();
        assert_eq!(origin.server_name(Some("api.example.com:80")), None);
        tls.auto_sni = true;
        let auto = compile(&tls).unwrap();
        assert_eq!(
            auto.server_name(Some("API.example.com.:80")).as_deref(),
            Some("api.example.com")
        );
        assert_ne!(auto.fingerprint, origin.fingerprint);
        tls.sni = Some("fixed.test".into());
        let fixed = compile(&tls).unwrap();
        assert_eq!(
            fixed.server_name(Some("api.example.com")).as_deref(),
            Some("fixed.test")
        );
        assert_eq!(compile(&tls).unwrap().fingerprint, fixed.fingerprint);
    }

    #[test]
    fn unusable_material_is_an_error_not_a_plaintext_fallback() {
        let mut tls = context(None, Vec::new());
        tls.client_certificate = Some(envoy::TlsCertificate {
            certificate_chain: envoy::DataSource::File("/nonexistent/cert.pem".into()),
            private_key: envoy::DataSource::Inline(b"not a key".to_vec()),
        });
        assert!(matches!(compile(&tls), Err(TlsConfigError::Read { .. })));
        tls.min_version = envoy::TlsVersion::Tls10;
        tls.max_version = envoy::TlsVersion::Tls11;
        tls.client_certificate = None;
        assert!(compile(&tls).is_err());
    }

    /// A PEM revocation list of `ca` revoking `serials`.
    fn crl(ca: &Ca, serials: &[u64]) -> Vec<u8> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: now().into(),
            next_update: (now() + Duration::from_secs(86_400)).into(),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| rcgen::RevokedCertParams {
                    serial_number: serial.into(),
                    revocation_time: now().into(),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&ca.issuer)
            .unwrap()
            .pem()
            .unwrap()
            .into_bytes()
    }

    #[test]
    fn a_revocation_list_refuses_revoked_certificates_and_those_it_cannot_vouch_for() {
        let (trusted, other) = (ca(), ca());
        let with_crl = |lists: Vec<u8>, leaf_only: bool| {
            let mut tls = context(Some(&trusted), Vec::new());
            let v = tls.validation.as_mut().unwrap();
            v.crl = Some(envoy::DataSource::Inline(lists));
            v.only_verify_leaf_cert_crl = leaf_only;
            tls
        };
        let revoked = numbered_leaf(&trusted, &["api.example.com"], now(), 7);
        let good = numbered_leaf(&trusted, &["api.example.com"], now(), 8);
        let tls = with_crl(crl(&trusted, &[7]), false);
        assert!(verify(&tls, &good, "x.test").is_ok());
        assert_eq!(
            reason(verify(&tls, &revoked, "x.test")),
            envoys(
                "X509_verify_cert: certificate verification error at depth 0: certificate revoked"
            )
        );
        // Without the issuer's list the status is unknown: refused, as Envoy does.
        let foreign = with_crl(crl(&other, &[]), false);
        assert_eq!(
            reason(verify(&foreign, &good, "x.test")),
            envoys(
                "X509_verify_cert: certificate verification error at depth 0: unable to get certificate CRL"
            )
        );
        // Several lists in one PEM: each issuer's applies.
        let both = with_crl([crl(&other, &[]), crl(&trusted, &[7])].concat(), true);
        assert!(verify(&both, &good, "x.test").is_ok());
        assert!(verify(&both, &revoked, "x.test").is_err());
        // Not PEM: the context cannot be built.
        let provider = rustls::crypto::ring::default_provider();
        let broken = with_crl(b"not a list".to_vec(), false);
        assert!(Verifier::new(&broken, provider.signature_verification_algorithms).is_err());
    }
}
