//! Mutual TLS between nodes: who a peer is comes from its certificate.
//!
//! Every node of a cluster holds a certificate signed by the cluster's CA
//! whose one DNS subject name is [`node_name`]: `n<ID>.<DC>.saferchat`
//! (e.g. `n3.dc1.saferchat`). The peer listener requires a client
//! certificate from that CA and reads the caller's node id and datacenter
//! out of it ([`identity_of`]); a node dialling a peer checks that the
//! server's certificate names exactly the node it meant to reach. Nothing
//! in a frame can claim another identity.
//!
//! [`generate`] writes a CA and node certificates (ECDSA P-256, ten years)
//! for `saferchat-node certs`; it reuses the CA already in the folder, so
//! certificates for new nodes can be added later.

use std::path::{Path, PathBuf};

use saferchat_consensus::NodeId;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::PeerTlsConfig;
use crate::error::NodeError;

/// The suffix of every node's certificate name.
const NAME_SUFFIX: &str = "saferchat";
/// Seconds a peer has to finish its TLS handshake.
const HANDSHAKE_S_MAX: u64 = 5;
/// Years a generated certificate is valid.
const CERT_YEARS: i32 = 10;

/// A node as its certificate names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node id.
    pub node: NodeId,
    /// Its datacenter.
    pub datacenter: String,
}

/// Whether `dc` can appear in a certificate name: one DNS label of
/// lowercase letters, digits and `-`, not starting or ending with `-`.
pub fn is_valid_datacenter(dc: &str) -> bool {
    !dc.is_empty()
        && dc.len() <= 63
        && dc
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !dc.starts_with('-')
        && !dc.ends_with('-')
}

/// The DNS name in node `id`'s certificate.
pub fn node_name(id: NodeId, datacenter: &str) -> String {
    format!("n{}.{datacenter}.{NAME_SUFFIX}", id.0)
}

/// Parses a [`node_name`].
fn parse_node_name(name: &str) -> Option<PeerIdentity> {
    let mut parts = name.split('.');
    let (node, dc, suffix) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || suffix != NAME_SUFFIX || !is_valid_datacenter(dc) {
        return None;
    }
    let digits = node.strip_prefix('n')?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: u64 = digits.parse().ok()?;
    Some(PeerIdentity {
        node: NodeId(id),
        datacenter: dc.to_owned(),
    })
}

/// The node a certificate (DER, already verified against the cluster CA
/// by the TLS layer) belongs to.
///
/// # Errors
/// [`NodeError::PermissionDenied`] when it names no node, or more than one.
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, NodeError> {
    let denied = |why: &str| NodeError::PermissionDenied(format!("peer certificate: {why}"));
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| denied("not an X.509 certificate"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| denied("malformed subject alternative names"))?
        .ok_or_else(|| denied("no subject alternative name"))?;
    let mut found = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => parse_node_name(dns),
            _ => None,
        });
    let identity = found
        .next()
        .ok_or_else(|| denied("names no saferchat node"))?;
    if found.next().is_some() {
        return Err(denied("names more than one node"));
    }
    Ok(identity)
}

/// A node's TLS material for the peer face, loaded once at start.
#[derive(Clone, Debug)]
pub struct PeerTls {
    ca: Certificate,
    identity: Identity,
    me: PeerIdentity,
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|e| NodeError::Config(format!("reading {}: {e}", path.display())))
}

impl PeerTls {
    /// Loads the CA, this node's certificate and key, and checks that the
    /// certificate names this node.
    ///
    /// # Errors
    /// [`NodeError::Config`] when a file is missing or unreadable, or the
    /// certificate belongs to another node.
    pub fn load(
        config: &PeerTlsConfig,
        me: NodeId,
        datacenter: &str,
    ) -> Result<PeerTls, NodeError> {
        let ca = read(&config.ca)?;
        let cert = read(&config.cert)?;
        let key = read(&config.key)?;
        let der = first_certificate_der(&cert).ok_or_else(|| {
            NodeError::Config(format!("{}: no certificate", config.cert.display()))
        })?;
        let named = identity_of(&der)
            .map_err(|e| NodeError::Config(format!("{}: {e}", config.cert.display())))?;
        if named.node != me || named.datacenter != datacenter {
            return Err(NodeError::Config(format!(
                "{} is the certificate of {} in {}, but this node is {me} in {datacenter}",
                config.cert.display(),
                named.node,
                named.datacenter
            )));
        }
        Ok(PeerTls {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            me: named,
        })
    }

    /// Server side: present this node's certificate, require one from the
    /// cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(false)
            // A caller that never finishes its handshake must not hold a
            // connection (and a file descriptor) for ever.
            .timeout(std::time::Duration::from_secs(HANDSHAKE_S_MAX))
    }

    /// Client side towards `peer`: present this node's certificate, accept
    /// only `peer`'s.
    pub fn client_for(&self, peer: NodeId, datacenter: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(node_name(peer, datacenter))
    }

    /// The node this material belongs to.
    pub fn me(&self) -> &PeerIdentity {
        &self.me
    }
}

/// The DER of the first certificate in a PEM file (pulled out with
/// x509-parser's PEM reader, which this module links anyway).
pub(crate) fn first_certificate_der(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
}

/// The files [`generate`] writes for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFiles {
    /// The node.
    pub node: NodeId,
    /// Its certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

pub(crate) fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), NodeError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options
        .open(path)
        .and_then(|mut f| {
            f.write_all(contents.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| NodeError::Config(format!("writing {}: {e}", path.display())))
}

pub(crate) fn cert_error(e: rcgen::Error) -> NodeError {
    NodeError::Config(format!("certificate: {e}"))
}

pub(crate) fn validity(params: &mut rcgen::CertificateParams) {
    use chrono::Datelike;
    let year = chrono::Utc::now().year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + CERT_YEARS, 1, 1);
}

/// Writes `ca.pem` and `ca.key` into `dir` unless they exist, then a
/// certificate and key for every node: `node-<ID>.pem`, `node-<ID>.key`.
///
/// # Errors
/// [`NodeError::Config`] on a bad datacenter name, an unreadable CA, or a
/// file that cannot be written.
pub fn generate(dir: &Path, nodes: &[(NodeId, String)]) -> Result<Vec<NodeFiles>, NodeError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    for (id, dc) in nodes {
        if id.0 == 0 || !is_valid_datacenter(dc) {
            return Err(NodeError::Config(format!(
                "node {id} in {dc:?}: ids start at 1; datacenters are lowercase letters, digits and '-'"
            )));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::Config(format!("creating {}: {e}", dir.display())))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if !ca_cert.exists() {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "saferchat cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(cert_error)?;
        write_file(&ca_key, &key.serialize_pem(), true)?;
        write_file(&ca_cert, &cert.pem(), false)?;
    }
    let ca_pem = String::from_utf8(read(&ca_cert)?)
        .map_err(|_| NodeError::Config(format!("{} is not PEM", ca_cert.display())))?;
    let ca_key_pem = String::from_utf8(read(&ca_key)?)
        .map_err(|_| NodeError::Config(format!("{} is not PEM", ca_key.display())))?;
    let signing = KeyPair::from_pem(&ca_key_pem).map_err(cert_error)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, signing).map_err(cert_error)?;
    let mut written = Vec::new();
    for (id, dc) in nodes {
        let name = node_name(*id, dc);
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::new(vec![name.clone()]).map_err(cert_error)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
        let files = NodeFiles {
            node: *id,
            cert: dir.join(format!("node-{}.pem", id.0)),
            key: dir.join(format!("node-{}.key", id.0)),
        };
        write_file(&files.key, &key.serialize_pem(), true)?;
        write_file(&files.cert, &cert.pem(), false)?;
        written.push(files);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_junk_is_refused() {
        let me = PeerIdentity {
            node: NodeId(12),
            datacenter: "eu-west-1".into(),
        };
        assert_eq!(
            node_name(me.node, &me.datacenter),
            "n12.eu-west-1.saferchat"
        );
        assert_eq!(parse_node_name("n12.eu-west-1.saferchat"), Some(me));
        for junk in [
            "n0.dc1.saferchat",
            "n012.dc1.saferchat",
            "n1.dc1.saferchat.evil",
            "n1.DC1.saferchat",
            "x1.dc1.saferchat",
            "n.dc1.saferchat",
            "n18446744073709551616.dc1.saferchat",
            "n1..saferchat",
            "n1.dc1.other",
        ] {
            assert_eq!(parse_node_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn generated_certificates_name_their_node_and_the_ca_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), &[(NodeId(1), "dc1".into())]).unwrap();
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let more = generate(dir.path(), &[(NodeId(2), "dc2".into())]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        for (f, dc) in [(&files[0], "dc1"), (&more[0], "dc2")] {
            let der = first_certificate_der(&std::fs::read(&f.cert).unwrap()).unwrap();
            let id = identity_of(&der).unwrap();
            assert_eq!((id.node, id.datacenter.as_str()), (f.node, dc));
            let config = PeerTlsConfig {
                ca: dir.path().join("ca.pem"),
                cert: f.cert.clone(),
                key: f.key.clone(),
            };
            PeerTls::load(&config, f.node, dc).unwrap();
            let wrong = PeerTls::load(&config, NodeId(9), dc).unwrap_err();
            assert!(wrong.to_string().contains("certificate of n"), "{wrong}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files[0].key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let ca_der = first_certificate_der(&ca_before).unwrap();
        assert!(identity_of(&ca_der).is_err(), "the CA is no node");
        assert!(generate(dir.path(), &[(NodeId(3), "Bad DC".into())]).is_err());
    }
}
