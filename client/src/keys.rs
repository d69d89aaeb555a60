//! A user's identity: an RSA-2048 key pair, its handle and fingerprint.
//!
//! The private key lives in a PKCS#8 PEM file created with mode 0600 and is
//! never sent anywhere; only the public key (SubjectPublicKeyInfo DER) and
//! signatures leave the machine.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use saferchat_consensus::{Handle, room::fingerprint_of};
use sha2::Sha256;

use crate::error::ClientError;

/// Key size of every saferchat key.
pub const RSA_BITS: usize = 2048;

/// A user's key pair.
#[derive(Clone)]
pub struct Identity {
    private: rsa::PrivateKey,
    public_der: Bytes,
    handle: Handle,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.handle)
    }
}

fn key_error(path: &Path, reason: impl std::fmt::Display) -> ClientError {
    ClientError::KeyFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

impl Identity {
    /// Generates a fresh RSA-2048 key pair.
    ///
    /// # Errors
    /// [`ClientError::Crypto`] if key generation fails.
    pub fn generate() -> Result<Identity, ClientError> {
        let private = rsa::PrivateKey::new(&mut rand::rng(), RSA_BITS)
            .map_err(|e| ClientError::Crypto(format!("key generation: {e}")))?;
        Identity::from_private(private)
    }

    /// Wraps an existing private key.
    ///
    /// # Errors
    /// [`ClientError::Crypto`] if the public key cannot be encoded.
    pub fn from_private(private: rsa::PrivateKey) -> Result<Identity, ClientError> {
        let public = private.to_public_key();
        let der = public
            .to_public_key_der()
            .map_err(|e| ClientError::Crypto(format!("encoding public key: {e}")))?;
        Ok(Identity {
            handle: Handle::of_modulus(&public.n_bytes()),
            public_der: Bytes::copy_from_slice(der.as_bytes()),
            private,
        })
    }

    /// Parses a PKCS#8 PEM private key.
    ///
    /// # Errors
    /// [`ClientError::Crypto`] when it is not an RSA PKCS#8 key.
    pub fn from_pem(pem: &str) -> Result<Identity, ClientError> {
        let private = rsa::PrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| ClientError::Crypto(format!("not a PKCS#8 RSA private key: {e}")))?;
        Identity::from_private(private)
    }

    /// The key as PKCS#8 PEM.
    ///
    /// # Errors
    /// [`ClientError::Crypto`] if encoding fails.
    pub fn to_pem(&self) -> Result<String, ClientError> {
        self.private
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| ClientError::Crypto(format!("encoding private key: {e}")))
    }

    /// Writes the private key to `path` (mode 0600), refusing to replace an
    /// existing file unless `overwrite`.
    ///
    /// # Errors
    /// [`ClientError::KeyFile`] when the file exists or cannot be written.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), ClientError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| key_error(path, e))?;
        }
        let mut options = fs::OpenOptions::new();
        options.write(true);
        if overwrite {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                key_error(path, "already exists (pass --force to replace it)")
            } else {
                key_error(path, e)
            }
        })?;
        file.write_all(self.to_pem()?.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| key_error(path, e))
    }

    /// Reads a private key written by [`Identity::save`].
    ///
    /// # Errors
    /// [`ClientError::KeyFile`] when missing, unreadable, readable by others,
    /// or not a key.
    pub fn load(path: &Path) -> Result<Identity, ClientError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = fs::metadata(path).map_err(|e| {
                key_error(path, format!("{e} (create one with `saferchat keygen`)"))
            })?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(key_error(
                    path,
                    "is readable by other users; run `chmod 600` on it",
                ));
            }
        }
        let pem = fs::read_to_string(path).map_err(|e| key_error(path, e))?;
        Identity::from_pem(&pem).map_err(|e| key_error(path, e))
    }

    /// The handle: base64url(SHA-256(modulus)).
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// SubjectPublicKeyInfo DER of the public key.
    pub fn public_der(&self) -> &Bytes {
        &self.public_der
    }

    /// The public key.
    pub fn public_key(&self) -> rsa::PublicKey {
        self.private.to_public_key()
    }

    /// Display fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.public_der)
    }

    /// RSA-PSS-SHA256 signature (salt 32).
    ///
    /// # Errors
    /// [`ClientError::Crypto`] if signing fails.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.private
            .pss_sign::<Sha256>(message)
            .map_err(|e| ClientError::Crypto(format!("signing: {e}")))
    }

    /// Unwraps a content key wrapped for this identity (RSA-OAEP-SHA256).
    ///
    /// # Errors
    /// [`ClientError::Verify`] when it does not decrypt to 32 bytes.
    pub fn unwrap_key(&self, wrapped: &[u8]) -> Result<[u8; 32], ClientError> {
        let key = self
            .private
            .oaep_decrypt::<Sha256>(wrapped)
            .map_err(|_| ClientError::Verify("content key does not unwrap with your key".into()))?;
        key.as_slice()
            .try_into()
            .map_err(|_| ClientError::Verify("content key has the wrong length".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys;

    #[test]
    fn pem_round_trip_keeps_the_handle() {
        let id = test_keys::identity(0);
        let back = Identity::from_pem(&id.to_pem().unwrap()).unwrap();
        assert_eq!(back.handle(), id.handle());
        assert_eq!(id.handle().to_string().len(), 43);
        assert_eq!(id.fingerprint().len(), 39);
    }

    #[test]
    fn saved_keys_are_private_and_never_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key.pem");
        let id = test_keys::identity(1);
        id.save(&path, false).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(
            id.save(&path, false)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        assert_eq!(Identity::load(&path).unwrap().handle(), id.handle());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(
                Identity::load(&path)
                    .unwrap_err()
                    .to_string()
                    .contains("chmod 600")
            );
        }
        assert!(
            Identity::load(&dir.path().join("missing.pem"))
                .unwrap_err()
                .to_string()
                .contains("keygen")
        );
    }
}
