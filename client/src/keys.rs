//! A user's identity: an RSA-2048 key pair, its handle and fingerprint.
//!
//! The private key lives in a PKCS#8 PEM file created with mode 0600 and is
//! never sent anywhere; only the public key (SubjectPublicKeyInfo DER) and
//! signatures leave the machine.
//!
//! # Keys at rest
//!
//! The file is encrypted with a passphrase unless its owner said not to:
//! encrypted PKCS#8 (`ENCRYPTED PRIVATE KEY`, RFC 5958) with PBES2 (RFC
//! 8018), PBKDF2-HMAC-SHA-256 over 600,000 iterations and a random 16-byte
//! salt, then AES-256-CBC under a random IV. PBKDF2 rather than scrypt
//! (the `pkcs8` crate's default) because a browser can derive the same
//! key with WebCrypto, which has no scrypt; OpenSSL reads the file too
//! (`openssl pkcs8 -in key.pem`). Unencrypted files (`PRIVATE KEY`) still
//! load; the CLI warns about them.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;
use pkcs8::pkcs5::pbes2;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use saferchat_consensus::{Handle, room::fingerprint_of};
use sha2::Sha256;

use crate::error::ClientError;

/// Key size of every saferchat key.
pub const RSA_BITS: usize = 2048;

/// The PEM label of an encrypted key file.
const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// How a key file is (to be) protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection<'a> {
    /// Encrypted under this passphrase.
    Passphrase(&'a str),
    /// Not encrypted (the owner chose so).
    None,
}

/// What a key file turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFile {
    /// Encrypted with a passphrase.
    Encrypted,
    /// Stored in the clear.
    Plain,
}

/// Whether a PEM text is an encrypted key (so a passphrase is needed).
pub fn is_encrypted_pem(pem: &str) -> bool {
    pem.trim_start()
        .starts_with(&format!("-----BEGIN {ENCRYPTED_LABEL}-----"))
}

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

    /// Parses an encrypted PKCS#8 PEM private key.
    ///
    /// # Errors
    /// [`ClientError::Crypto`] when the passphrase is wrong or it is not an
    /// encrypted RSA PKCS#8 key.
    pub fn from_encrypted_pem(pem: &str, passphrase: &str) -> Result<Identity, ClientError> {
        let private = rsa::PrivateKey::from_pkcs8_encrypted_pem(pem, passphrase.as_bytes())
            .map_err(|_| {
                ClientError::Crypto("wrong passphrase, or not an encrypted PKCS#8 RSA key".into())
            })?;
        Identity::from_private(private)
    }

    /// The key as encrypted PKCS#8 PEM (see "Keys at rest").
    ///
    /// # Errors
    /// [`ClientError::Crypto`] if encoding or encryption fails.
    pub fn to_encrypted_pem(&self, passphrase: &str) -> Result<String, ClientError> {
        let failed =
            |e: &dyn std::fmt::Display| ClientError::Crypto(format!("encrypting private key: {e}"));
        let params =
            pbes2::Parameters::generate_pbkdf2(&mut rand::rng()).map_err(|e| failed(&e))?;
        let der = self.private.to_pkcs8_der().map_err(|e| failed(&e))?;
        let info = pkcs8::PrivateKeyInfoRef::try_from(der.as_bytes()).map_err(|e| failed(&e))?;
        let encrypted = info
            .encrypt_with_params(params, passphrase.as_bytes())
            .map_err(|e| failed(&e))?;
        encrypted
            .to_pem(ENCRYPTED_LABEL, LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| failed(&e))
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
        self.save_as(path, overwrite, Protection::None)
    }

    /// [`Identity::save`], encrypted unless `protection` is
    /// [`Protection::None`].
    ///
    /// # Errors
    /// [`ClientError::KeyFile`] when the file exists or cannot be written.
    pub fn save_as(
        &self,
        path: &Path,
        overwrite: bool,
        protection: Protection<'_>,
    ) -> Result<(), ClientError> {
        let pem = match protection {
            Protection::Passphrase(passphrase) => self.to_encrypted_pem(passphrase)?,
            Protection::None => self.to_pem()?,
        };
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| key_error(path, e))?;
        if !overwrite && path.exists() {
            return Err(key_error(
                path,
                "already exists (pass --force to replace it)",
            ));
        }
        // Written beside the key and renamed over it, so that replacing a
        // key (a new passphrase) never leaves a torn or empty file: the
        // key is the only copy of the identity.
        let name = path
            .file_name()
            .map_or_else(|| "key".into(), |n| n.to_string_lossy().into_owned());
        let temporary = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let written = options.open(&temporary).and_then(|mut file| {
            file.write_all(pem.as_bytes())?;
            file.sync_all()
        });
        let installed = written.and_then(|()| {
            if overwrite {
                fs::rename(&temporary, path)
            } else {
                // Fails if the file appeared meanwhile: never replaced silently.
                fs::hard_link(&temporary, path).and_then(|()| fs::remove_file(&temporary))
            }
        });
        if let Err(e) = installed {
            let _ = fs::remove_file(&temporary);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                key_error(path, "already exists (pass --force to replace it)")
            } else {
                key_error(path, e)
            });
        }
        // The new name is durable once the folder is.
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| key_error(path, e))
    }

    /// Reads an unencrypted private key written by [`Identity::save`].
    ///
    /// # Errors
    /// [`ClientError::KeyFile`] when missing, unreadable, readable by others,
    /// encrypted, or not a key.
    pub fn load(path: &Path) -> Result<Identity, ClientError> {
        Identity::load_with(path, || {
            Err(key_error(
                path,
                "is encrypted: a passphrase is needed to read it",
            ))
        })
        .map(|(id, _)| id)
    }

    /// Reads a private key written by [`Identity::save_as`], asking
    /// `passphrase` for the passphrase only when the file is encrypted.
    ///
    /// # Errors
    /// [`ClientError::KeyFile`] when missing, unreadable, readable by others,
    /// not a key, or the passphrase is wrong; what `passphrase` returns.
    pub fn load_with(
        path: &Path,
        passphrase: impl FnOnce() -> Result<zeroize::Zeroizing<String>, ClientError>,
    ) -> Result<(Identity, KeyFile), ClientError> {
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
        let pem =
            zeroize::Zeroizing::new(fs::read_to_string(path).map_err(|e| key_error(path, e))?);
        if is_encrypted_pem(&pem) {
            let passphrase = passphrase()?;
            let id =
                Identity::from_encrypted_pem(&pem, &passphrase).map_err(|e| key_error(path, e))?;
            Ok((id, KeyFile::Encrypted))
        } else {
            let id = Identity::from_pem(&pem).map_err(|e| key_error(path, e))?;
            Ok((id, KeyFile::Plain))
        }
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
        self.unwrap_key_labelled(wrapped, None)
    }

    /// [`Identity::unwrap_key`] with an RSA-OAEP label (envelope v1.1
    /// binds each wrapped key to its room, revision and recipient).
    ///
    /// # Errors
    /// As [`Identity::unwrap_key`]; a wrong label fails like a wrong key.
    pub fn unwrap_key_labelled(
        &self,
        wrapped: &[u8],
        label: Option<&[u8]>,
    ) -> Result<[u8; 32], ClientError> {
        let padding = match label {
            Some(label) => rsa::Oaep::<Sha256>::new_with_label(label),
            None => rsa::Oaep::<Sha256>::new(),
        };
        let key = self
            .private
            .decrypt(padding, wrapped)
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

    #[test]
    fn encrypted_key_files_use_pbkdf2_sha256_and_aes_256_cbc() {
        use pkcs8::der::pem;
        let id = test_keys::identity(2);
        let text = id.to_encrypted_pem("correct horse").unwrap();
        assert!(is_encrypted_pem(&text));
        let (label, der) = pem::decode_vec(text.as_bytes()).unwrap();
        assert_eq!(label, ENCRYPTED_LABEL);
        let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der.as_slice()).unwrap();
        let pkcs8::pkcs5::EncryptionScheme::Pbes2(params) = &info.encryption_algorithm else {
            panic!("not PBES2: {:?}", info.encryption_algorithm);
        };
        let kdf = params.kdf.pbkdf2().expect("PBKDF2");
        assert_eq!(kdf.prf, pkcs8::pkcs5::pbes2::Pbkdf2Prf::HmacWithSha256);
        assert_eq!(kdf.iteration_count, 600_000);
        assert_eq!(kdf.salt.as_ref().len(), 16);
        assert!(matches!(
            params.encryption,
            pbes2::EncryptionScheme::Aes256Cbc { .. }
        ));
        // Fresh salt and IV every time.
        assert_ne!(text, id.to_encrypted_pem("correct horse").unwrap());
        let back = Identity::from_encrypted_pem(&text, "correct horse").unwrap();
        assert_eq!(back.handle(), id.handle());
        let wrong = Identity::from_encrypted_pem(&text, "correct horse ").unwrap_err();
        assert!(wrong.to_string().contains("wrong passphrase"), "{wrong}");
    }

    #[test]
    fn encrypted_files_need_the_passphrase_and_plain_ones_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let id = test_keys::identity(3);
        id.save_as(&path, false, Protection::Passphrase("s3cret words"))
            .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("BEGIN PRIVATE KEY"));
        let asked = std::cell::Cell::new(0);
        let (back, file) = Identity::load_with(&path, || {
            asked.set(asked.get() + 1);
            Ok(zeroize::Zeroizing::new("s3cret words".into()))
        })
        .unwrap();
        assert_eq!(
            (back.handle(), file, asked.get()),
            (id.handle(), KeyFile::Encrypted, 1)
        );
        let e =
            Identity::load_with(&path, || Ok(zeroize::Zeroizing::new("guess".into()))).unwrap_err();
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        assert!(
            Identity::load(&path)
                .unwrap_err()
                .to_string()
                .contains("is encrypted")
        );

        // Re-encrypting in place (as set-passphrase does) keeps the key and
        // leaves no temporary file behind; plain files load without asking.
        id.save_as(&path, true, Protection::None).unwrap();
        let (back, file) = Identity::load_with(&path, || panic!("no passphrase needed")).unwrap();
        assert_eq!((back.handle(), file), (id.handle(), KeyFile::Plain));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
    }
}
