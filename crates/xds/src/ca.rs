//! Workload certificates from Istio's CA (`istio.v1.auth.IstioCertificateService`), as
//! istio-agent and ztunnel request them: a fresh ECDSA P-256 key, a CSR with the SPIFFE URI
//! SAN, the service-account token as a bearer, renewed at half the lifetime.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tonic::codegen::http::uri::PathAndQuery;
use tracing::{info, warn};

use crate::Backoff;
use crate::client::{ClientError, DEFAULT_TOKEN_FILE, Target, connect, with_token};

/// The gRPC method istiod's CA serves.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Where istio-agent reads the mesh root that verifies istiod.
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// istio-agent's `SECRET_GRACE_PERIOD_RATIO`: renew when this part of the lifetime is left.
pub const GRACE_PERIOD_RATIO: f64 = 0.5;
/// istio-agent's `SECRET_GRACE_PERIOD_RATIO_JITTER`: the ratio varies by up to this much,
/// so that sidecars started together do not renew together.
pub const GRACE_PERIOD_RATIO_JITTER: f64 = 0.01;
/// istio-agent's `SECRET_TTL` default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// `IstioCertificateRequest` of istio/api `security/v1alpha1/ca.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Impersonation and `ClusterID` metadata.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// `IstioCertificateResponse`: the PEM chain, leaf first, the root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The metadata key istiod reads the requesting cluster from.
pub const CLUSTER_ID_KEY: &str = "ClusterID";

/// Who the workload is and where its CA is: istio-agent's `CA_ADDR`, `TRUST_DOMAIN`,
/// `POD_NAMESPACE`, `SERVICE_ACCOUNT` and `ISTIO_META_CLUSTER_ID`.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// `https://host:port` (istiod's 15012), or `http://` for a test CA.
    pub address: String,
    /// PEM roots that verify the CA.
    pub root_cert: PathBuf,
    /// The service-account token, re-read on each request.
    pub token_file: PathBuf,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's service account.
    pub service_account: String,
    /// Sent as `ClusterID` metadata.
    pub cluster_id: String,
    /// The lifetime asked for.
    pub validity: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

impl CaConfig {
    /// The config with istio-agent's defaults for the files and the lifetime.
    pub fn new(
        address: impl Into<String>,
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            address: address.into(),
            root_cert: PathBuf::from(DEFAULT_ROOT_CERT),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            cluster_id: "Kubernetes".into(),
            validity: DEFAULT_VALIDITY,
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// The workload's SPIFFE ID: `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why no certificate was issued.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA could not be reached.
    #[error(transparent)]
    Connect(#[from] ClientError),
    /// The key or the CSR could not be made.
    #[error("cannot make the certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    /// The CA refused the request.
    #[error("the CA refused: {0}")]
    Status(#[from] tonic::Status),
    /// The CA's answer is not a usable chain.
    #[error("the CA's certificate chain is unusable: {0}")]
    Chain(String),
}

/// A key and the certificate the CA issued for it.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The PEM chain without the root, leaf first.
    pub cert_chain: Vec<u8>,
    /// The PEM private key.
    pub key: Vec<u8>,
    /// The PEM root (the chain's last certificate).
    pub root: Vec<u8>,
    /// The leaf's start of validity.
    pub not_before: SystemTime,
    /// The leaf's expiry.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// How long after `now` to renew: when `ratio + jitter` of the lifetime is left.
    pub fn renew_in(&self, now: SystemTime, jitter: f64) -> Duration {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let grace = lifetime.mul_f64((GRACE_PERIOD_RATIO + jitter).clamp(0.0, 1.0));
        (self.not_after - grace)
            .duration_since(now)
            .unwrap_or_default()
    }
}

/// A fresh ECDSA P-256 key (PEM) and a PEM CSR for it naming `spiffe_id` as its URI SAN.
pub fn certificate_request(spiffe_id: &str) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        spiffe_id,
    )?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Requests a certificate for the configured identity.
pub async fn request(config: &CaConfig) -> Result<Issued, CaError> {
    let target = Target::parse(&config.address)?;
    let (channel, token) = connect(
        &target,
        Some(&config.root_cert),
        &config.token_file,
        config.connect_timeout,
    )
    .await?;
    let (key, csr) = certificate_request(&config.spiffe_id())?;
    let metadata = Struct {
        fields: HashMap::from([(
            CLUSTER_ID_KEY.to_owned(),
            Value {
                kind: Some(Kind::StringValue(config.cluster_id.clone())),
            },
        )]),
    };
    let body = IstioCertificateRequest {
        csr,
        validity_duration: i64::try_from(config.validity.as_secs()).unwrap_or(i64::MAX),
        metadata: Some(metadata),
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response: tonic::Response<IstioCertificateResponse> = grpc
        .unary(
            with_token(body, token.as_deref()),
            PathAndQuery::from_static(CREATE_CERTIFICATE),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    issued(response.into_inner().cert_chain, key.into_bytes())
}

/// The chain as istio-agent splits it: all but the last certificate is the workload's
/// chain, the last is the root.
fn issued(chain: Vec<String>, key: Vec<u8>) -> Result<Issued, CaError> {
    let (root, certs) = match chain.split_last() {
        Some((root, certs)) if !certs.is_empty() => (root, certs),
        _ => return Err(CaError::Chain("fewer than two certificates".into())),
    };
    let leaf = certs[0].as_bytes();
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf)
        .map_err(|e| CaError::Chain(format!("leaf is not PEM: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CaError::Chain(format!("leaf does not parse: {e}")))?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let validity = cert.validity();
    let mut cert_chain = String::new();
    for c in certs {
        cert_chain.push_str(c.trim_end());
        cert_chain.push('\n');
    }
    Ok(Issued {
        cert_chain: cert_chain.into_bytes(),
        key,
        root: root.clone().into_bytes(),
        not_before: at(validity.not_before),
        not_after: at(validity.not_after),
    })
}

/// Keeps a certificate: requests one with `issue`, hands it to `deliver`, renews it at
/// half its lifetime (with istio-agent's jitter); on a failure retries with backoff while
/// the last delivered one stays in use. Runs until the task is dropped.
pub async fn keep_certificate<F, Fut>(
    mut issue: F,
    mut deliver: impl FnMut(Issued),
    mut backoff: Backoff,
    mut rng: fastrand::Rng,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Issued, CaError>>,
{
    loop {
        match issue().await {
            Ok(issued) => {
                backoff.reset();
                let jitter = (rng.f64() * 2.0 - 1.0) * GRACE_PERIOD_RATIO_JITTER;
                let wait = issued.renew_in(SystemTime::now(), jitter);
                info!(not_after = ?issued.not_after, renew_in_ms = wait.as_millis() as u64, "workload certificate issued");
                deliver(issued);
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot get a workload certificate; the current one stays in use");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Keeps the configured identity's certificate from the CA (see [`keep_certificate`]).
pub async fn run(config: CaConfig, deliver: impl FnMut(Issued)) {
    keep_certificate(
        || request(&config),
        deliver,
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        fastrand::Rng::new(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use x509_parser::prelude::FromDer;

    #[test]
    fn the_csr_names_the_spiffe_id_with_a_p256_key() {
        let (key, csr) = certificate_request("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(csr.as_bytes()).unwrap();
        assert_eq!(pem.label, "CERTIFICATE REQUEST");
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
                .unwrap();
        let info = &req.certification_request_info;
        assert_eq!(
            info.subject_pki
                .algorithm
                .parameters
                .as_ref()
                .map(|p| p.as_oid().unwrap()),
            Some(x509_parser::oid_registry::OID_EC_P256)
        );
        let mut uris = Vec::new();
        for ext in req.requested_extensions().into_iter().flatten() {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let x509_parser::extensions::GeneralName::URI(uri) = name {
                        uris.push(uri.to_string());
                    }
                }
            }
        }
        assert_eq!(uris, ["spiffe://cluster.local/ns/shop/sa/cart"]);
    }

    fn cert(not_before: SystemTime, lifetime: Duration) -> Issued {
        Issued {
            cert_chain: Vec::new(),
            key: Vec::new(),
            root: Vec::new(),
            not_before,
            not_after: not_before + lifetime,
        }
    }

    #[test]
    fn renewal_is_at_half_the_lifetime_shifted_by_the_jitter() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = cert(start, Duration::from_secs(3600));
        assert_eq!(c.renew_in(start, 0.0), Duration::from_secs(1800));
        assert_eq!(c.renew_in(start, 0.01), Duration::from_secs(1764));
        assert_eq!(c.renew_in(start, -0.01), Duration::from_secs(1836));
        assert_eq!(
            c.renew_in(start + Duration::from_secs(600), 0.0),
            Duration::from_secs(1200)
        );
        assert_eq!(
            c.renew_in(start + Duration::from_secs(3000), 0.0),
            Duration::ZERO
        );
    }

    #[test]
    fn a_chain_without_a_root_is_refused() {
        assert!(matches!(
            issued(vec!["x".into()], Vec::new()),
            Err(CaError::Chain(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_are_renewed_at_half_life_and_failures_retried_keeping_the_old_one() {
        let started = tokio::time::Instant::now();
        // Requests at: 0 ok, ~50 s fails, then retries until one succeeds.
        let calls = Arc::new(Mutex::new(Vec::new()));
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let issue = {
            let calls = Arc::clone(&calls);
            move || {
                let calls = Arc::clone(&calls);
                async move {
                    let mut calls = calls.lock().unwrap();
                    calls.push(started.elapsed());
                    if calls.len() == 2 || calls.len() == 3 {
                        return Err(CaError::Chain("down".into()));
                    }
                    Ok(cert(SystemTime::now(), Duration::from_secs(100)))
                }
            }
        };
        let deliver = {
            let delivered = Arc::clone(&delivered);
            move |_: Issued| delivered.lock().unwrap().push(started.elapsed())
        };
        let task = tokio::spawn(keep_certificate(
            issue,
            deliver,
            Backoff::with_rng(
                Duration::from_secs(1),
                Duration::from_secs(4),
                fastrand::Rng::with_seed(3),
            ),
            fastrand::Rng::with_seed(5),
        ));
        tokio::time::sleep(Duration::from_secs(160)).await;
        task.abort();
        let calls = calls.lock().unwrap().clone();
        let delivered = delivered.lock().unwrap().clone();
        assert!(calls.len() >= 5, "{calls:?}");
        assert_eq!(calls[0], Duration::ZERO);
        // Half of 100 s, give or take 1 % of the lifetime.
        assert!(calls[1] >= Duration::from_secs(49) && calls[1] <= Duration::from_secs(51));
        // Two failures, retried within the backoff's ceilings (1 s, then 3 s).
        assert!(calls[2] - calls[1] < Duration::from_secs(1));
        assert!(calls[3] - calls[2] < Duration::from_secs(3));
        assert_eq!(delivered[0], calls[0]);
        assert_eq!(delivered[1], calls[3]);
        // The next renewal is again at half the new certificate's life.
        let gap = calls[4] - calls[3];
        assert!(gap >= Duration::from_secs(49) && gap <= Duration::from_secs(51));
    }
}
