//! TLS with rustls (ring provider only, so every target cross-compiles):
//! certificate chains, plain and encrypted keys, optional client certificates
//! (with revocation lists), cipher suites and the oldest protocol version.

use std::fmt;
use std::fs;
use std::io;
use std::sync::Arc;

use pkcs8::der::SecretDocument;
use pkcs8::EncryptedPrivateKeyInfo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::version::TLS13;
use rustls::{
    CipherSuite, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme, SupportedCipherSuite,
    SupportedProtocolVersion,
};

use crate::config::TlsSettings;

/// Why TLS material was refused, worded for the person who configured it.
pub enum TlsError {
    Io { path: String, error: io::Error },
    Invalid(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Io { path, error } => write!(f, "cannot read {path}: {error}"),
            TlsError::Invalid(message) => f.write_str(message),
        }
    }
}

fn read(path: &str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|error| TlsError::Io { path: path.to_owned(), error })
}

/// Builds the rustls server configuration; ALPN is `h2, http/1.1` or
/// `http/1.1` alone, since TLS must not imply HTTP/2.
pub fn server_config(settings: &TlsSettings) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certificates(&settings.certificate_path)?;
    let key = load_key(&settings.key_path, settings.certificate_password.as_deref())?;
    let versions = protocol_versions(&settings.protocol_min)?;
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(names) = &settings.ciphers {
        provider.cipher_suites = cipher_suites(names)?;
    }
    if !provider.cipher_suites.iter().any(|suite| versions.iter().any(|version| suite.version() == *version)) {
        return Err(TlsError::Invalid(format!(
            "none of the cipher suites given is for a TLS version from {} on",
            settings.protocol_min
        )));
    }
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Invalid(format!("TLS setup failed: {e}")))?;
    let builder = if settings.request_client_certificate || settings.require_client_certificate {
        builder.with_client_cert_verifier(client_verifier(settings, &provider)?)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Invalid(format!(
            "the key in {} does not fit the certificate in {}: {e}",
            settings.key_path, settings.certificate_path
        ))
    })?;
    config.alpn_protocols =
        if settings.http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    Ok(config)
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];

/// The versions from `protocol_min` (Granian's values) up to TLS 1.3.
fn protocol_versions(protocol_min: &str) -> Result<&'static [&'static SupportedProtocolVersion], TlsError> {
    match protocol_min {
        "tls1.2" => Ok(rustls::ALL_VERSIONS),
        "tls1.3" => Ok(TLS13_ONLY),
        other => Err(TlsError::Invalid(format!("the oldest TLS version must be tls1.2 or tls1.3, not {other:?}"))),
    }
}

/// The provider's suites named in `names`, in that order, each by its
/// rustls name, IANA's or OpenSSL's (case aside).
pub fn cipher_suites(names: &[String]) -> Result<Vec<SupportedCipherSuite>, TlsError> {
    let all = rustls::crypto::ring::default_provider().cipher_suites;
    let mut chosen: Vec<SupportedCipherSuite> = Vec::new();
    for name in names {
        let name = name.trim();
        let suite = all
            .iter()
            .find(|suite| suite_names(suite.suite()).any(|known| known.eq_ignore_ascii_case(name)))
            .ok_or_else(|| {
            let known = all.iter().map(|suite| {
                let mut names = suite_names(suite.suite());
                let rustls = names.next().unwrap_or_default();
                names.next().map_or_else(|| rustls.to_owned(), |openssl| format!("{rustls} ({openssl})"))
            });
            TlsError::Invalid(format!(
                "unknown cipher suite {name:?} (suite names only, not OpenSSL cipher strings); known: {}",
                known.collect::<Vec<_>>().join(", ")
            ))
        })?;
        if !chosen.iter().any(|c| c.suite() == suite.suite()) {
            chosen.push(*suite);
        }
    }
    if chosen.is_empty() {
        return Err(TlsError::Invalid("no cipher suite given".to_owned()));
    }
    Ok(chosen)
}

/// A suite's rustls name, then OpenSSL's where it differs (for TLS 1.3,
/// also IANA's).
fn suite_names(suite: CipherSuite) -> impl Iterator<Item = &'static str> {
    let openssl = match suite {
        CipherSuite::TLS13_AES_256_GCM_SHA384 => Some("TLS_AES_256_GCM_SHA384"),
        CipherSuite::TLS13_AES_128_GCM_SHA256 => Some("TLS_AES_128_GCM_SHA256"),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some("TLS_CHACHA20_POLY1305_SHA256"),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => Some("ECDHE-ECDSA-AES256-GCM-SHA384"),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => Some("ECDHE-ECDSA-AES128-GCM-SHA256"),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => Some("ECDHE-ECDSA-CHACHA20-POLY1305"),
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some("ECDHE-RSA-AES256-GCM-SHA384"),
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some("ECDHE-RSA-AES128-GCM-SHA256"),
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some("ECDHE-RSA-CHACHA20-POLY1305"),
        _ => None,
    };
    suite.as_str().into_iter().chain(openssl)
}

fn load_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{path} is not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!("{path} holds no PEM certificate")));
    }
    Ok(certs)
}

fn load_key(path: &str, password: Option<&str>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        let password =
            password.ok_or_else(|| TlsError::Invalid(format!("{path} is encrypted: pass certificate_password")))?;
        return decrypt_pkcs8(path, &text, password);
    }
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| TlsError::Invalid(format!("{path} holds no usable PKCS#8, RSA or EC private key: {e}")))
}

fn decrypt_pkcs8(path: &str, text: &str, password: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let invalid = |what: &str| TlsError::Invalid(format!("{path}: {what}"));
    let (_, document) =
        SecretDocument::from_pem(text).map_err(|_| invalid("not a valid encrypted PKCS#8 PEM block"))?;
    let info = EncryptedPrivateKeyInfo::try_from(document.as_bytes())
        .map_err(|_| invalid("not a valid encrypted PKCS#8 key"))?;
    let key = info.decrypt(password).map_err(|_| invalid("wrong certificate_password (or an unsupported cipher)"))?;
    Ok(PrivatePkcs8KeyDer::from(key.as_bytes().to_vec()).into())
}

fn client_verifier(
    settings: &TlsSettings,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let Some(ca_path) = &settings.client_ca_path else {
        return Ok(Arc::new(AnyClientCertificate {
            algorithms: provider.signature_verification_algorithms,
            mandatory: settings.require_client_certificate,
        }));
    };
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(ca_path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid(format!("{ca_path}: unusable CA certificate: {e}")))?;
    }
    let mut crls = Vec::new();
    for path in &settings.crl_paths {
        crls.extend(load_crls(path)?);
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).with_crls(crls);
    let builder = if settings.require_client_certificate { builder } else { builder.allow_unauthenticated() };
    builder.build().map_err(|e| TlsError::Invalid(format!("client certificate verification: {e}")))
}

/// The certificate revocation lists in `path`: PEM (one or more `X509 CRL`
/// blocks) or one in DER.
fn load_crls(path: &str) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let data = read(path)?;
    let crls = if data.trim_ascii_start().starts_with(b"-----BEGIN") {
        let crls = CertificateRevocationListDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid(format!("{path} is not a PEM certificate revocation list: {e}")))?;
        if crls.is_empty() {
            return Err(TlsError::Invalid(format!("{path} holds no PEM certificate revocation list (X509 CRL)")));
        }
        crls
    } else {
        vec![CertificateRevocationListDer::from(data)]
    };
    for crl in &crls {
        webpki::OwnedCertRevocationList::from_der(crl)
            .map_err(|e| TlsError::Invalid(format!("{path} holds no usable certificate revocation list: {e}")))?;
    }
    Ok(crls)
}

/// dart:io's `requestClientCertificate` without a trust store: the client's
/// certificate is asked for and handed to the application unverified (only
/// the handshake signature proves the client holds its key).
#[derive(Debug)]
struct AnyClientCertificate {
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
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
