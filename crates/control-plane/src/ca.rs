//! A test stand-in for istiod's CA (`istio.v1.auth.IstioCertificateService`).
//!
//! istiod authenticates the bearer token with a Kubernetes TokenReview and signs only the
//! SPIFFE ID of the token's service account. Here a token is an opaque string the test maps
//! to a namespace and service account; the rest is as istiod does: the CSR must name exactly
//! that identity, and the lifetime asked for is granted up to a maximum.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_xds::ca::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;

/// Why the test CA could not make a certificate.
#[derive(Debug, thiserror::Error)]
#[error("the test CA cannot make a certificate: {0}")]
pub struct CaError(#[from] rcgen::Error);

/// A CA signing with a self-signed test root.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root_pem: String,
    trust_domain: String,
    max_validity: Duration,
    identities: HashMap<String, (String, String)>,
    issued: Mutex<Vec<String>>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A CA for `trust_domain` with a fresh root, granting up to `max_validity`.
    pub fn new(trust_domain: impl Into<String>, max_validity: Duration) -> Result<Self, CaError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "portcullis test CA");
        let root_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: rcgen::Issuer::new(params, key),
            root_pem,
            trust_domain: trust_domain.into(),
            max_validity,
            identities: HashMap::new(),
            issued: Mutex::new(Vec::new()),
        })
    }

    /// Accepts `token` as the service account `namespace/service_account`.
    pub fn with_token(
        mut self,
        token: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        self.identities
            .insert(token.into(), (namespace.into(), service_account.into()));
        self
    }

    /// The PEM root that verifies what it issues.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The SPIFFE IDs issued so far, in order.
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().map(|i| i.clone()).unwrap_or_default()
    }

    /// A certificate (PEM) and its key (PEM) for a mesh peer with `spiffe_id`, valid from
    /// now for `validity`: the identity a test's server presents.
    pub fn issue(&self, spiffe_id: &str, validity: Duration) -> Result<(String, String), CaError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into()?)];
        stamp(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn sign(
        &self,
        token: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let token = token.ok_or_else(|| tonic::Status::unauthenticated("no bearer token"))?;
        let (namespace, service_account) = self
            .identities
            .get(token)
            .ok_or_else(|| tonic::Status::unauthenticated("unknown token"))?;
        let identity = format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        );
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad CSR: {e}")))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                rcgen::SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [identity.as_str()] {
            return Err(tonic::Status::unauthenticated(format!(
                "the CSR asks for {asked:?}, the token is {identity}"
            )));
        }
        let asked_validity = u64::try_from(request.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map_or(self.max_validity, Duration::from_secs);
        stamp(&mut csr.params, asked_validity.min(self.max_validity));
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| tonic::Status::internal(format!("cannot sign: {e}")))?;
        if let Ok(mut issued) = self.issued.lock() {
            issued.push(identity);
        }
        Ok(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), self.root_pem.clone()],
        })
    }
}

/// Valid from now for `validity`, naming the root's key as istiod's leaves do.
fn stamp(params: &mut rcgen::CertificateParams, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + validity;
    params.use_authority_key_identifier_extension = true;
}

/// The gRPC service answering `CreateCertificate` with the [`TestCa`] in its slot, if any.
#[derive(Debug, Clone)]
pub(crate) struct CaService(pub(crate) Arc<Mutex<Option<Arc<TestCa>>>>);

impl NamedService for CaService {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

struct Unary(Arc<TestCa>);

impl tonic::server::UnaryService<IstioCertificateRequest> for Unary {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let ca = Arc::clone(&self.0);
        Box::pin(async move {
            let token = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned);
            ca.sign(token.as_deref(), request.get_ref())
                .map(tonic::Response::new)
        })
    }
}

impl<B> Service<http::Request<B>> for CaService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let ca = self.0.lock().ok().and_then(|ca| ca.clone());
        let ca = match ca {
            Some(ca) if request.uri().path() == CREATE_CERTIFICATE => ca,
            _ => {
                return Box::pin(async { Ok(tonic::Status::unimplemented("no CA").into_http()) });
            }
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(Unary(ca), request).await)
        })
    }
}
