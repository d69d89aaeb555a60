//! Connecting to a node, over TLS when the address says `https://`, and
//! following its redirects.
//!
//! # Addresses and TLS
//!
//! `host:port` and `http://host:port` are plaintext; `https://host:port`
//! is TLS, never anything else: a handshake that fails is an error, not a
//! fall back to plaintext. Which certificates are accepted is the
//! process's [`Trust`], set once with [`set_trust`] (the CLI does it from
//! `--tls-ca` and `--tls-pin`): by default the public web CAs. When a CA
//! or pins were set, a plaintext address is refused, so a typo in the
//! scheme cannot send a session in the clear. A redirect from an
//! `https://` node is followed over TLS too.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use saferchat_vocabulary::CertificateFingerprint;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::ClientError;

pub use saferchat_proto::redirect::{FOLLOWS_REDIRECTS_METADATA, REDIRECT_METADATA, redirect_of};
/// How many redirects a call follows before giving up.
pub const REDIRECTS_MAX: usize = 3;

const HTTPS: &str = "https://";
const HTTP: &str = "http://";

/// Which server certificates an `https://` connection accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Certificates of the public web CAs (the Mozilla set, built in).
    PublicCas,
    /// Certificates this CA (PEM) signed, for the name in the address.
    Ca(Vec<u8>),
    /// Exactly these certificates, whatever their names or issuers: a
    /// node's self-signed certificate, by the fingerprint it logs.
    Pinned(Vec<CertificateFingerprint>),
}

static TRUST: OnceLock<Trust> = OnceLock::new();

/// Sets the process's [`Trust`], once, before the first connection.
///
/// # Errors
/// [`ClientError::Protocol`] when it was set already.
pub fn set_trust(trust: Trust) -> Result<(), ClientError> {
    TRUST
        .set(trust)
        .map_err(|_| ClientError::Protocol("the TLS trust is set once per process".into()))
}

/// `host:port` or a URL, as a URL.
pub fn url(address: &str) -> String {
    if address.starts_with(HTTP) || address.starts_with(HTTPS) {
        address.to_owned()
    } else {
        format!("{HTTP}{address}")
    }
}

/// Where a redirect from `from` to `to` leads: a bare `host:port` from an
/// `https://` node is reached over TLS as well.
pub fn redirected(from: &str, to: &str) -> String {
    if from.starts_with(HTTPS) && !to.starts_with(HTTP) && !to.starts_with(HTTPS) {
        format!("{HTTPS}{to}")
    } else {
        to.to_owned()
    }
}

/// Opens a channel to a node.
///
/// # Errors
/// [`ClientError::Connect`] when the address is invalid, nobody answers,
/// the TLS handshake fails (with the reason, e.g. an unpinned
/// certificate), or a plaintext address is given while a CA or pins are
/// set.
pub async fn connect(address: &str) -> Result<Channel, ClientError> {
    let fail = |reason: String| ClientError::Connect {
        address: address.to_owned(),
        reason,
    };
    let url = url(address);
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let trust = TRUST.get();
    if url.starts_with(HTTPS) {
        endpoint = match trust.unwrap_or(&Trust::PublicCas) {
            Trust::PublicCas => endpoint.tls_config(ClientTlsConfig::new().with_webpki_roots()),
            Trust::Ca(pem) => endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))),
            Trust::Pinned(pins) => endpoint.tls_config_with_verifier(
                ClientTlsConfig::new(),
                Arc::new(PinnedCertificates::new(pins.clone())),
            ),
        }
        .map_err(|e| fail(format!("TLS: {}", chain(&e))))?;
    } else if trust.is_some() {
        return Err(fail(
            "a TLS CA or pin is set, but this address is not https://: refusing plaintext".into(),
        ));
    }
    endpoint.connect().await.map_err(|e| {
        fail(if url.starts_with(HTTPS) {
            chain(&e)
        } else {
            format!("{} (is a node running there?)", chain(&e))
        })
    })
}

/// An error and its causes, `: `-separated (tonic's own text is only
/// "transport error"; the reason, e.g. a certificate problem, is a cause).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Accepts a server certificate when its fingerprint is pinned; the
/// handshake's signatures are still checked, with the certificate's key,
/// so only the holder of the pinned certificate's key gets through.
///
/// Written here because rustls ships no pinning verifier; it is the trait
/// rustls documents for this, and tonic takes it as is.
#[derive(Debug)]
struct PinnedCertificates {
    pins: Vec<CertificateFingerprint>,
    provider: Arc<CryptoProvider>,
}

impl PinnedCertificates {
    fn new(pins: Vec<CertificateFingerprint>) -> PinnedCertificates {
        PinnedCertificates {
            pins,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

/// Why a certificate was refused. rustls shows it with `Debug`, so that
/// prints the sentence too.
struct NotPinned(CertificateFingerprint);

impl std::fmt::Debug for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server's certificate {} is not the pinned one",
            self.0
        )
    }
}

impl std::error::Error for NotPinned {}

impl ServerCertVerifier for PinnedCertificates {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = CertificateFingerprint::of(end_entity.as_ref());
        if self.pins.contains(&seen) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotPinned(seen))),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_from_tls_stay_on_tls() {
        assert_eq!(
            redirected("https://a:1", "b:2"),
            "https://b:2",
            "a bare redirect from TLS"
        );
        assert_eq!(redirected("a:1", "b:2"), "b:2");
        assert_eq!(redirected("http://a:1", "b:2"), "b:2");
        assert_eq!(redirected("https://a:1", "http://b:2"), "http://b:2");
        assert_eq!(redirected("a:1", "https://b:2"), "https://b:2");
    }

    #[test]
    fn only_a_pinned_certificate_passes() {
        let pinned = CertificateFingerprint::of(b"pinned");
        let verifier = PinnedCertificates::new(vec![pinned]);
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now();
        let ok = verifier.verify_server_cert(
            &CertificateDer::from(&b"pinned"[..]),
            &[],
            &name,
            &[],
            now,
        );
        assert!(ok.is_ok());
        let other = verifier
            .verify_server_cert(&CertificateDer::from(&b"other"[..]), &[], &name, &[], now)
            .unwrap_err();
        assert!(
            other
                .to_string()
                .contains(&CertificateFingerprint::of(b"other").to_string()),
            "{other}"
        );
        assert!(!verifier.supported_verify_schemes().is_empty());
    }
}
