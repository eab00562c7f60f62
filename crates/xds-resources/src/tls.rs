//! `envoy.transport_sockets.tls` with an `UpstreamTlsContext` into the model: certificates
//! inline or in files, and the SDS secrets istiod names for files a DestinationRule gives
//! (`file-cert:CERT~KEY`, `file-root:CA`, `file-root:system`), which istio-agent serves
//! from those files; Istio's own mutual TLS (`default`, `ROOTCA`) stays its own transport.
//! Every field that is set and not honoured is refused by name, never dropped.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use portcullis_envoy::{
    CertificateValidationContext, DataSource, IstioMutual, StringMatcher, TlsCertificate,
    TlsVersion, TrustedCa, UpstreamTls, UpstreamTransport,
};

use crate::common::{At, Invalid, each, string_matcher};

/// The SDS secrets of Istio's own mutual TLS: the workload certificate and the mesh root.
const ISTIO_CERT: &str = "default";
const ISTIO_ROOT: &str = "ROOTCA";
/// istio-agent's SDS names for files: `file-cert:CERT~KEY`, `file-root:CA`.
const FILE_CERT: &str = "file-cert:";
const FILE_ROOT: &str = "file-root:";

/// The cluster's `auto_sni` and `auto_san_validation`
/// (`upstream_http_protocol_options`), which apply to its TLS.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Auto {
    pub sni: bool,
    pub san_validation: bool,
}

/// Converts an `UpstreamTlsContext`. Deprecated fields are still sent (istiod writes
/// `match_subject_alt_names`): they are honoured or refused like any other.
#[allow(deprecated)]
pub(crate) fn upstream_tls(
    ctx: tls::UpstreamTlsContext,
    auto: Auto,
) -> Result<UpstreamTransport, Invalid> {
    let refuse = |field: &str, set: bool| -> Result<(), Invalid> {
        if set {
            return Err(Invalid::new(field, "is not supported"));
        }
        Ok(())
    };
    refuse("allow_renegotiation", ctx.allow_renegotiation)?;
    refuse(
        "enforce_rsa_key_usage",
        ctx.enforce_rsa_key_usage.is_some_and(|v| v.value),
    )?;
    let common = ctx.common_tls_context.unwrap_or_default();
    use tls::common_tls_context::ValidationContextType as V;
    let root_sds = match &common.validation_context_type {
        Some(V::CombinedValidationContext(c)) => c
            .validation_context_sds_secret_config
            .as_ref()
            .map(|s| s.name.as_str()),
        Some(V::ValidationContextSdsSecretConfig(s)) => Some(s.name.as_str()),
        _ => None,
    };
    let cert_sds: Vec<&str> = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    if common.tls_certificates.is_empty()
        && cert_sds == [ISTIO_CERT]
        && root_sds == Some(ISTIO_ROOT)
    {
        return istio_mutual(ctx.sni, common);
    }
    let at = "common_tls_context";
    refuse_common(&common).at(at)?;
    let (min_version, max_version) = versions(common.tls_params.as_ref()).at(at)?;
    let client_certificate = client_certificate(&common).at(at)?;
    let validation = match common.validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => {
            validation(&v, None).at(format!("{at}.validation_context"))?
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => {
            let default = tls::CertificateValidationContext::default();
            validation(&default, Some(&s.name)).at(at)?
        }
        Some(V::CombinedValidationContext(c)) => {
            let field = format!("{at}.combined_validation_context");
            if c.validation_context_certificate_provider.is_some()
                || c.validation_context_certificate_provider_instance.is_some()
            {
                return Err(Invalid::new(
                    field,
                    "certificate providers are not supported",
                ));
            }
            let default = c.default_validation_context.unwrap_or_default();
            let sds = c.validation_context_sds_secret_config.map(|s| s.name);
            validation(&default, sds.as_deref()).at(field)?
        }
        Some(_) => {
            return Err(Invalid::new(
                format!("{at}.validation_context_type"),
                "certificate providers are not supported",
            ));
        }
    };
    Ok(UpstreamTransport::Tls(std::sync::Arc::new(UpstreamTls {
        sni: (!ctx.sni.is_empty()).then_some(ctx.sni),
        auto_sni: auto.sni || ctx.auto_host_sni,
        auto_san_validation: auto.san_validation || ctx.auto_sni_san_validation,
        alpn_protocols: common.alpn_protocols,
        min_version,
        max_version,
        client_certificate,
        validation,
    })))
}

/// Istio's mutual TLS: the workload's certificates come from its identity; the SNI, ALPN
/// and the peer SANs of the default validation context are istiod's.
#[allow(deprecated)]
fn istio_mutual(sni: String, common: tls::CommonTlsContext) -> Result<UpstreamTransport, Invalid> {
    use tls::common_tls_context::ValidationContextType as V;
    let sans = match &common.validation_context_type {
        Some(V::CombinedValidationContext(c)) => c
            .default_validation_context
            .as_ref()
            .map(|v| {
                let mut sans = each(
                    "match_subject_alt_names",
                    &v.match_subject_alt_names,
                    string_matcher,
                )?;
                sans.extend(each(
                    "match_typed_subject_alt_names",
                    &v.match_typed_subject_alt_names,
                    |m| {
                        m.matcher
                            .as_ref()
                            .ok_or_else(|| Invalid::new("matcher", "required"))
                            .and_then(string_matcher)
                    },
                )?);
                Ok::<_, Invalid>(sans)
            })
            .transpose()
            .at("common_tls_context.combined_validation_context.default_validation_context")?
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(UpstreamTransport::IstioMutualTls(std::sync::Arc::new(
        IstioMutual {
            sni: (!sni.is_empty()).then_some(sni),
            alpn_protocols: common.alpn_protocols,
            match_subject_alt_names: sans,
        },
    )))
}

/// The parts of a `CommonTlsContext` portcullis does not honour, refused when set.
#[allow(deprecated)]
fn refuse_common(c: &tls::CommonTlsContext) -> Result<(), Invalid> {
    let unsupported = [
        (
            "tls_certificate_provider_instance",
            c.tls_certificate_provider_instance.is_some(),
        ),
        (
            "custom_tls_certificate_selector",
            c.custom_tls_certificate_selector.is_some(),
        ),
        (
            "tls_certificate_certificate_provider",
            c.tls_certificate_certificate_provider.is_some(),
        ),
        (
            "tls_certificate_certificate_provider_instance",
            c.tls_certificate_certificate_provider_instance.is_some(),
        ),
        ("custom_handshaker", c.custom_handshaker.is_some()),
        ("key_log", c.key_log.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(Invalid::new(*field, "is not supported"));
    }
    if let Some(p) = &c.tls_params {
        let lists = [
            ("cipher_suites", p.cipher_suites.is_empty()),
            ("ecdh_curves", p.ecdh_curves.is_empty()),
            ("signature_algorithms", p.signature_algorithms.is_empty()),
            ("compliance_policies", p.compliance_policies.is_empty()),
        ];
        if let Some((field, _)) = lists.iter().find(|(_, empty)| !*empty) {
            return Err(Invalid::new(
                format!("tls_params.{field}"),
                "is not supported (rustls's defaults apply)",
            ));
        }
    }
    Ok(())
}

/// Envoy's client defaults: TLS 1.2 to 1.2 unless set.
fn versions(p: Option<&tls::TlsParameters>) -> Result<(TlsVersion, TlsVersion), Invalid> {
    use tls::tls_parameters::TlsProtocol as P;
    let version = |field: &str, v: i32, default: TlsVersion| match P::try_from(v) {
        Ok(P::TlsAuto) => Ok(default),
        Ok(P::TlSv10) => Ok(TlsVersion::Tls10),
        Ok(P::TlSv11) => Ok(TlsVersion::Tls11),
        Ok(P::TlSv12) => Ok(TlsVersion::Tls12),
        Ok(P::TlSv13) => Ok(TlsVersion::Tls13),
        Err(_) => Err(Invalid::new(
            format!("tls_params.{field}"),
            format!("unknown version {v}"),
        )),
    };
    let Some(p) = p else {
        return Ok((TlsVersion::Tls12, TlsVersion::Tls12));
    };
    Ok((
        version(
            "tls_minimum_protocol_version",
            p.tls_minimum_protocol_version,
            TlsVersion::Tls12,
        )?,
        version(
            "tls_maximum_protocol_version",
            p.tls_maximum_protocol_version,
            TlsVersion::Tls12,
        )?,
    ))
}

/// The client certificate: one `tls_certificates` entry, or istio-agent's `file-cert:`.
fn client_certificate(c: &tls::CommonTlsContext) -> Result<Option<TlsCertificate>, Invalid> {
    let mut found = each("tls_certificates", &c.tls_certificates, |t| {
        if t.watched_directory.is_some()
            || t.private_key_provider.is_some()
            || t.password.is_some()
            || t.ocsp_staple.is_some()
            || !t.signed_certificate_timestamp.is_empty()
        {
            return Err(Invalid::new(
                "",
                "only certificate_chain and private_key are supported",
            ));
        }
        Ok(TlsCertificate {
            certificate_chain: data_source(t.certificate_chain.as_ref()).at("certificate_chain")?,
            private_key: data_source(t.private_key.as_ref()).at("private_key")?,
        })
    })?;
    for (i, sds) in c.tls_certificate_sds_secret_configs.iter().enumerate() {
        let field = format!("tls_certificate_sds_secret_configs[{i}]");
        let Some((cert, key)) = sds
            .name
            .strip_prefix(FILE_CERT)
            .and_then(|files| files.split_once('~'))
        else {
            return Err(Invalid::new(
                field,
                format!(
                    "SDS secret {} is not supported: only istio-agent's file-cert:CERT~KEY (portcullis reads the files)",
                    sds.name
                ),
            ));
        };
        found.push(TlsCertificate {
            certificate_chain: DataSource::File(cert.to_owned()),
            private_key: DataSource::File(key.to_owned()),
        });
    }
    if found.len() > 1 {
        return Err(Invalid::new(
            "tls_certificates",
            "more than one client certificate is not supported",
        ));
    }
    Ok(found.pop())
}

/// A validation context, with the root from istio-agent's `file-root:` SDS secret when
/// named. ACCEPT_UNTRUSTED verifies nothing, as Envoy then accepts any certificate.
#[allow(deprecated)]
fn validation(
    v: &tls::CertificateValidationContext,
    sds: Option<&str>,
) -> Result<Option<CertificateValidationContext>, Invalid> {
    use tls::certificate_validation_context::TrustChainVerification as T;
    let unsupported = [
        (
            "ca_certificate_provider_instance",
            v.ca_certificate_provider_instance.is_some(),
        ),
        ("watched_directory", v.watched_directory.is_some()),
        (
            "verify_certificate_spki",
            !v.verify_certificate_spki.is_empty(),
        ),
        (
            "verify_certificate_hash",
            !v.verify_certificate_hash.is_empty(),
        ),
        (
            "require_signed_certificate_timestamp",
            v.require_signed_certificate_timestamp
                .is_some_and(|b| b.value),
        ),
        ("allow_expired_certificate", v.allow_expired_certificate),
        (
            "custom_validator_config",
            v.custom_validator_config.is_some(),
        ),
        ("max_verify_depth", v.max_verify_depth.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(Invalid::new(*field, "is not supported"));
    }
    match T::try_from(v.trust_chain_verification) {
        Ok(T::VerifyTrustChain) => {}
        Ok(T::AcceptUntrusted) => return Ok(None),
        Err(_) => return Err(Invalid::new("trust_chain_verification", "unknown value")),
    }
    let trusted_ca = match (sds, &v.trusted_ca, &v.system_root_certs) {
        (Some(name), None, None) => match name.strip_prefix(FILE_ROOT) {
            Some("system") => TrustedCa::System,
            Some(path) => TrustedCa::Pem(DataSource::File(path.to_owned())),
            None => {
                return Err(Invalid::new(
                    "validation_context_sds_secret_config",
                    format!(
                        "SDS secret {name} is not supported: only istio-agent's file-root:CA (portcullis reads the file)"
                    ),
                ));
            }
        },
        (None, Some(ca), None) => TrustedCa::Pem(data_source(Some(ca)).at("trusted_ca")?),
        (None, None, Some(_)) => TrustedCa::System,
        // Envoy verifies nothing without a trusted CA, SANs or not.
        (None, None, None) => return Ok(None),
        _ => {
            return Err(Invalid::new(
                "trusted_ca",
                "more than one source of trusted CAs is not supported",
            ));
        }
    };
    let mut match_subject_alt_names: Vec<StringMatcher> = each(
        "match_subject_alt_names",
        &v.match_subject_alt_names,
        string_matcher,
    )?;
    // The SAN type is not told apart: a typed matcher is checked against every SAN.
    let typed = each(
        "match_typed_subject_alt_names",
        &v.match_typed_subject_alt_names,
        |m| {
            if !m.oid.is_empty() {
                return Err(Invalid::new("oid", "OTHER_NAME SANs are not supported"));
            }
            let matcher = m
                .matcher
                .as_ref()
                .ok_or_else(|| Invalid::new("matcher", "required"))?;
            string_matcher(matcher).at("matcher")
        },
    )?;
    match_subject_alt_names.extend(typed);
    Ok(Some(CertificateValidationContext {
        trusted_ca,
        match_subject_alt_names,
        crl: v
            .crl
            .as_ref()
            .map(|c| data_source(Some(c)))
            .transpose()
            .at("crl")?,
        only_verify_leaf_cert_crl: v.only_verify_leaf_cert_crl,
    }))
}

fn data_source(d: Option<&core::DataSource>) -> Result<DataSource, Invalid> {
    use core::data_source::Specifier as S;
    let d = d.ok_or_else(|| Invalid::new("", "required"))?;
    if d.watched_directory.is_some() {
        return Err(Invalid::new("watched_directory", "is not supported"));
    }
    match &d.specifier {
        Some(S::Filename(path)) => Ok(DataSource::File(path.clone())),
        Some(S::InlineBytes(bytes)) => Ok(DataSource::Inline(bytes.clone())),
        Some(S::InlineString(text)) => Ok(DataSource::Inline(text.clone().into_bytes())),
        Some(S::EnvironmentVariable(_)) => {
            Err(Invalid::new("environment_variable", "is not supported"))
        }
        None => Err(Invalid::new("specifier", "required")),
    }
}
