//! TLS on the client and admin listeners.
//!
//! The certificate comes from the configuration (`[tls] cert`/`key`, any
//! chain a client can verify), or, for development, from a self-signed
//! certificate the node makes once in `data_dir/tls/` and reuses on every
//! start, so that a fingerprint a client pinned stays valid. Either way
//! the node logs the leaf certificate's fingerprint
//! ([`CertificateFingerprint`]) at start: what `saferchat --tls-pin` takes.
//!
//! Clients are not asked for certificates here (they prove who they are
//! with their RSA key when they join; admin calls carry the admin token).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saferchat_vocabulary::CertificateFingerprint;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::config::ListenerTlsConfig;
use crate::error::NodeError;
use crate::peer_tls::{cert_error, first_certificate_der, read, validity, write_file};

/// Seconds a client has to finish its TLS handshake: one that never does
/// must not hold a connection for ever.
const HANDSHAKE_S_MAX: u64 = 10;
/// The folder of the self-signed certificate, inside the data folder.
const SELF_SIGNED_DIR: &str = "tls";

/// The listeners' TLS material, loaded once at start.
#[derive(Clone, Debug)]
pub struct ListenerTls {
    identity: Identity,
    /// The leaf certificate's fingerprint.
    pub fingerprint: CertificateFingerprint,
    /// The certificate file served.
    pub cert: PathBuf,
}

impl ListenerTls {
    /// Loads the configured certificate and key, or the self-signed pair
    /// in `data_dir` (making it first when there is none). `listen` are
    /// the addresses the self-signed certificate should name.
    ///
    /// # Errors
    /// [`NodeError::Config`] when a file cannot be read or written, or
    /// holds no certificate.
    pub fn load(
        config: &ListenerTlsConfig,
        data_dir: &Path,
        listen: &[SocketAddr],
    ) -> Result<ListenerTls, NodeError> {
        config.validate()?;
        let (cert, key) = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => self_signed(&data_dir.join(SELF_SIGNED_DIR), listen, &config.names)?,
        };
        let cert_pem = read(&cert)?;
        let key_pem = read(&key)?;
        let der = first_certificate_der(&cert_pem)
            .ok_or_else(|| NodeError::Config(format!("{}: no certificate", cert.display())))?;
        Ok(ListenerTls {
            identity: Identity::from_pem(cert_pem, key_pem),
            fingerprint: CertificateFingerprint::of(&der),
            cert,
        })
    }

    /// Server side: present the certificate; ask nothing of the client.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(Duration::from_secs(HANDSHAKE_S_MAX))
    }
}

/// The names a self-signed certificate carries: loopback, the listen
/// addresses that are not wildcards, and the configured extras.
fn names_for(listen: &[SocketAddr], extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let listened = listen
        .iter()
        .filter(|a| !a.ip().is_unspecified())
        .map(|a| a.ip().to_string());
    for name in listened.chain(extra.iter().cloned()) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// `dir/server.pem` and `dir/server.key`, made once: an ECDSA P-256 key
/// and a certificate it signs itself, naming [`names_for`].
fn self_signed(
    dir: &Path,
    listen: &[SocketAddr],
    extra: &[String],
) -> Result<(PathBuf, PathBuf), NodeError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::Config(format!("creating {}: {e}", dir.display())))?;
    let pair = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::new(names_for(listen, extra)).map_err(cert_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "saferchat node (self-signed)");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params);
    let signed = params.self_signed(&pair).map_err(cert_error)?;
    // The key first: a certificate without its key would be reused on the
    // next start and fail there.
    write_file(&key, &pair.serialize_pem(), true)?;
    write_file(&cert, &signed.pem(), false)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed_config() -> ListenerTlsConfig {
        ListenerTlsConfig {
            self_signed: true,
            names: vec!["chat.example".into()],
            ..ListenerTlsConfig::default()
        }
    }

    #[test]
    fn the_self_signed_certificate_is_made_once_and_names_its_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let listen: Vec<SocketAddr> = vec!["10.1.2.3:8443".parse().unwrap()];
        let first = ListenerTls::load(&self_signed_config(), dir.path(), &listen).unwrap();
        let again = ListenerTls::load(&self_signed_config(), dir.path(), &listen).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint, "reused, not remade");
        let pem = std::fs::read(&first.cert).unwrap();
        let der = first_certificate_der(&pem).unwrap();
        assert_eq!(CertificateFingerprint::of(&der), first.fingerprint);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let named: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        for want in [
            "DNSName(localhost)",
            "IPAddress(7f:00:00:01)",
            "IPAddress(0a:01:02:03)",
            "DNSName(chat.example)",
        ] {
            assert!(named.iter().any(|n| n == want), "{want} in {named:?}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.path().join(SELF_SIGNED_DIR).join("server.key");
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn configured_files_are_served_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let made = ListenerTls::load(&self_signed_config(), dir.path(), &[]).unwrap();
        let files = ListenerTlsConfig {
            cert: Some(made.cert.clone()),
            key: Some(dir.path().join(SELF_SIGNED_DIR).join("server.key")),
            ..ListenerTlsConfig::default()
        };
        let loaded = ListenerTls::load(&files, dir.path(), &[]).unwrap();
        assert_eq!(loaded.fingerprint, made.fingerprint);
        let missing = ListenerTlsConfig {
            cert: Some(dir.path().join("nope.pem")),
            ..files
        };
        let e = ListenerTls::load(&missing, dir.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let key_only = ListenerTlsConfig {
            cert: None,
            ..missing
        };
        let e = ListenerTls::load(&key_only, dir.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
    }
}
