//! Who may do what: the admin bearer token, session tokens for members,
//! and the check of a join proof.
//!
//! Secrets never reach a log: the admin token's *path* is printed once
//! when it is generated, never its value.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use saferchat_consensus::{Handle, PublicKey, RoomId};
use saferchat_envelope::challenge::{NONCE_BYTES, join_signing_input};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::error::NodeError;

/// Smallest and largest RSA modulus accepted, in bytes.
const RSA_BYTES_MIN: usize = 256;
const RSA_BYTES_MAX: usize = 512;

/// Reads a secret file, or creates it with fresh random content and mode
/// 0600. Returns the secret and whether it was created.
fn load_or_create_secret(path: &Path) -> Result<(String, bool), NodeError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim().to_owned();
            if secret.len() < 32 {
                return Err(NodeError::Config(format!(
                    "{} is too short to be a secret (delete it to regenerate)",
                    path.display()
                )));
            }
            Ok((secret, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options
                .open(path)
                .map_err(|e| NodeError::Config(format!("creating {}: {e}", path.display())))?;
            writeln!(file, "{secret}")
                .and_then(|()| file.sync_all())
                .map_err(|e| NodeError::Config(format!("writing {}: {e}", path.display())))?;
            Ok((secret, true))
        }
        Err(e) => Err(NodeError::Config(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

/// The admin bearer token.
#[derive(Clone)]
pub struct AdminToken {
    token: String,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// The configured token, or the one in `data_dir/admin.token`,
    /// generated on first start. Returns the path when it was generated.
    ///
    /// # Errors
    /// [`NodeError::Config`] when the file cannot be read or written.
    pub fn load(
        configured: Option<&str>,
        data_dir: &Path,
    ) -> Result<(AdminToken, Option<PathBuf>), NodeError> {
        if let Some(token) = configured {
            return Ok((
                AdminToken {
                    token: token.to_owned(),
                },
                None,
            ));
        }
        let path = data_dir.join("admin.token");
        let (token, created) = load_or_create_secret(&path)?;
        Ok((AdminToken { token }, created.then_some(path)))
    }

    /// Checks `authorization: Bearer <token>` in constant time.
    ///
    /// # Errors
    /// [`NodeError::Unauthenticated`] when missing or wrong.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), NodeError> {
        let header = metadata.get("authorization").ok_or_else(|| {
            NodeError::Unauthenticated(
                "missing admin token: send `authorization: Bearer <token>`".into(),
            )
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                NodeError::Unauthenticated("authorization must be `Bearer <token>`".into())
            })?;
        let equal: bool = presented.as_bytes().ct_eq(self.token.as_bytes()).into();
        if equal {
            Ok(())
        } else {
            Err(NodeError::Unauthenticated("wrong admin token".into()))
        }
    }
}

/// Issues and checks session tokens: proof that a member joined a room,
/// usable for History and Members until it expires. Stateless (an HMAC),
/// so any node holding the same key accepts it.
#[derive(Clone)]
pub struct SessionKeys {
    key: Vec<u8>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

const TOKEN_VERSION: u8 = 1;

impl SessionKeys {
    /// The configured secret, or the one in `data_dir/session.key`.
    ///
    /// # Errors
    /// [`NodeError::Config`] when the file cannot be read or written.
    pub fn load(configured: Option<&str>, data_dir: &Path) -> Result<SessionKeys, NodeError> {
        let secret = match configured {
            Some(s) => s.to_owned(),
            None => load_or_create_secret(&data_dir.join("session.key"))?.0,
        };
        Ok(SessionKeys {
            key: secret.into_bytes(),
        })
    }

    fn mac(&self, body: &[u8]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// A token for `user` in `room`, valid until `expires_ms` (Unix ms).
    pub fn issue(&self, room: &RoomId, user: &Handle, expires_ms: i64) -> String {
        let name = room.as_str().as_bytes();
        let mut body = Vec::with_capacity(1 + 8 + 32 + 1 + name.len() + 32);
        body.push(TOKEN_VERSION);
        body.extend_from_slice(&expires_ms.to_be_bytes());
        body.extend_from_slice(user.as_bytes());
        body.push(u8::try_from(name.len()).expect("short room names"));
        body.extend_from_slice(name);
        let mac = self.mac(&body);
        body.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(body)
    }

    /// Checks a token for `room` at `now_ms`; returns its member.
    ///
    /// # Errors
    /// [`NodeError::Unauthenticated`] when malformed, forged, for another
    /// room, or expired.
    pub fn verify(&self, token: &str, room: &RoomId, now_ms: i64) -> Result<Handle, NodeError> {
        let bad =
            || NodeError::Unauthenticated("invalid session token: join the room to get one".into());
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        if raw.len() < 1 + 8 + 32 + 1 + 32 || raw[0] != TOKEN_VERSION {
            return Err(bad());
        }
        let (body, mac) = raw.split_at(raw.len() - 32);
        let expected = self.mac(body);
        if !bool::from(expected.ct_eq(mac)) {
            return Err(bad());
        }
        let expires = i64::from_be_bytes(body[1..9].try_into().expect("length checked"));
        let user = Handle::from_bytes(body[9..41].try_into().expect("length checked"));
        let len = usize::from(body[41]);
        if body.len() != 42 + len || &body[42..] != room.as_str().as_bytes() {
            return Err(NodeError::Unauthenticated(format!(
                "session token is not for room {room:?}"
            )));
        }
        if now_ms >= expires {
            return Err(NodeError::Unauthenticated(
                "session token expired: join the room again".into(),
            ));
        }
        Ok(user)
    }
}

/// Checks a join proof: the key parses as RSA (2048 to 4096 bits), hashes
/// to the claimed handle, and signed the challenge for this room and
/// handle. Returns the key to register.
///
/// # Errors
/// `InvalidArgument` for a key that does not parse; `Unauthenticated` for
/// a key of another handle or a wrong signature.
pub fn verify_join(
    room: &RoomId,
    user: &Handle,
    nonce: &[u8; NONCE_BYTES],
    public_key_der: &bytes::Bytes,
    signature: &[u8],
) -> Result<PublicKey, NodeError> {
    if public_key_der.is_empty()
        || public_key_der.len() > saferchat_consensus::room::PUBLIC_KEY_BYTES_MAX
    {
        return Err(NodeError::InvalidArgument(
            "public key must be SubjectPublicKeyInfo DER of an RSA key".into(),
        ));
    }
    let key = rsa::PublicKey::from_public_key_der(public_key_der).map_err(|e| {
        NodeError::InvalidArgument(format!(
            "public key is not RSA SubjectPublicKeyInfo DER: {e}"
        ))
    })?;
    if !(RSA_BYTES_MIN..=RSA_BYTES_MAX).contains(&key.size()) {
        return Err(NodeError::InvalidArgument(
            "RSA keys must be 2048 to 4096 bits".into(),
        ));
    }
    if Handle::of_modulus(&key.n_bytes()) != *user {
        return Err(NodeError::Unauthenticated(
            "the public key does not hash to the user's handle".into(),
        ));
    }
    let input = join_signing_input(room, user, nonce);
    key.pss_verify::<Sha256>(&input, signature)
        .map_err(|_| NodeError::Unauthenticated("join signature does not verify".into()))?;
    Ok(PublicKey::new(public_key_der.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn admin_token_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = AdminToken::load(None, dir.path()).unwrap();
        assert!(created.is_some());
        let (second, created) = AdminToken::load(None, dir.path()).unwrap();
        assert!(created.is_none());
        assert_eq!(first.token, second.token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("admin.token"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(format!("{first:?}").contains("redacted"));
    }

    #[test]
    fn admin_token_checks() {
        let (t, _) = AdminToken::load(Some("0123456789abcdef"), Path::new("/nonexistent")).unwrap();
        assert!(t.check(&metadata("Bearer 0123456789abcdef")).is_ok());
        assert!(matches!(
            t.check(&metadata("Bearer 0123456789abcdeX")),
            Err(NodeError::Unauthenticated(_))
        ));
        assert!(matches!(
            t.check(&metadata("0123456789abcdef")),
            Err(NodeError::Unauthenticated(_))
        ));
        assert!(matches!(
            t.check(&MetadataMap::new()),
            Err(NodeError::Unauthenticated(_))
        ));
    }

    #[test]
    fn session_tokens() {
        let keys = SessionKeys {
            key: b"k".repeat(32),
        };
        let room = RoomId::new("aaa").unwrap();
        let user = Handle::of_modulus(b"alice");
        let token = keys.issue(&room, &user, 1_000);
        assert_eq!(keys.verify(&token, &room, 999).unwrap(), user);
        assert!(
            keys.verify(&token, &room, 1_000)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        assert!(
            keys.verify(&token, &RoomId::new("aab").unwrap(), 0)
                .unwrap_err()
                .to_string()
                .contains("not for room")
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[20] ^= 1;
        assert!(
            keys.verify(&URL_SAFE_NO_PAD.encode(raw), &room, 0).is_err(),
            "forged user"
        );
        let other = SessionKeys {
            key: b"x".repeat(32),
        };
        assert!(other.verify(&token, &room, 0).is_err(), "other key");
        assert!(keys.verify("garbage!", &room, 0).is_err());
    }

    #[test]
    fn join_proof_rejects_junk_keys() {
        let room = RoomId::new("aaa").unwrap();
        let user = Handle::of_modulus(b"alice");
        let junk = bytes::Bytes::from_static(b"not der");
        assert!(matches!(
            verify_join(&room, &user, &[0; 32], &junk, b"sig"),
            Err(NodeError::InvalidArgument(_))
        ));
        assert!(matches!(
            verify_join(&room, &user, &[0; 32], &bytes::Bytes::new(), b"sig"),
            Err(NodeError::InvalidArgument(_))
        ));
    }
}
