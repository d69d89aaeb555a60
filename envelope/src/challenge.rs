//! The join challenge: what a joining member signs to prove it holds the
//! private key of its handle.

use saferchat_vocabulary::{Handle, RoomId};

/// Length of the server's random challenge.
pub const NONCE_BYTES: usize = 32;

/// Domain separation for join signatures (never valid as an envelope
/// signature, and vice versa).
const JOIN_DOMAIN: &[u8] = b"saferchat/join/v1\0";

/// The bytes a joining member signs with RSA-PSS (SHA-256, salt 32):
///
/// ```text
/// "saferchat/join/v1\0" ‖ u16 len ‖ room ‖ handle (32 bytes) ‖ nonce (32)
/// ```
///
/// Binding the room and handle means a signature for one join is useless
/// for any other.
pub fn join_signing_input(room: &RoomId, user: &Handle, nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let room = room.as_str().as_bytes();
    let mut out = Vec::with_capacity(JOIN_DOMAIN.len() + 2 + room.len() + 32 + NONCE_BYTES);
    out.extend_from_slice(JOIN_DOMAIN);
    out.extend_from_slice(
        &u16::try_from(room.len())
            .expect("room names are short")
            .to_be_bytes(),
    );
    out.extend_from_slice(room);
    out.extend_from_slice(user.as_bytes());
    out.extend_from_slice(nonce);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_room_user_and_nonce() {
        let room = RoomId::new("aaa").unwrap();
        let user = Handle::of_modulus(b"u");
        let base = join_signing_input(&room, &user, &[1; NONCE_BYTES]);
        assert!(base.starts_with(b"saferchat/join/v1\0\0\x03aaa"));
        assert_ne!(
            base,
            join_signing_input(&RoomId::new("aab").unwrap(), &user, &[1; NONCE_BYTES])
        );
        assert_ne!(
            base,
            join_signing_input(&room, &Handle::of_modulus(b"v"), &[1; NONCE_BYTES])
        );
        assert_ne!(base, join_signing_input(&room, &user, &[2; NONCE_BYTES]));
    }
}
