//! Rooms: their names and how many members they may have.

use std::fmt;

use crate::ParseError;

/// Longest room name, in bytes.
pub const ROOM_NAME_BYTES_MAX: usize = 64;
/// Most members one room may have. Every post wraps its content key once
/// per member, so this bounds envelope size and sender work too.
pub const ROOM_MEMBERS_MAX: usize = 1000;

/// The name of a room, validated.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoomId(String);

impl RoomId {
    /// Validates a room name.
    ///
    /// # Errors
    /// [`ParseError::RoomName`] when the name is empty, too long, or uses
    /// other characters.
    pub fn new(name: &str) -> Result<RoomId, ParseError> {
        let ok = !name.is_empty()
            && name.len() <= ROOM_NAME_BYTES_MAX
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(RoomId(name.to_owned()))
        } else {
            Err(ParseError::RoomName)
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quoted, so that messages reading `room {room:?}` show `room "aaa"`.
impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_validated() {
        assert!(RoomId::new("aaa").is_ok());
        assert!(RoomId::new("team-1.ops_x").is_ok());
        assert!(RoomId::new(&"a".repeat(64)).is_ok());
        for bad in ["", ".x", "-x", "a b", "é", "a/b", &"a".repeat(65)] {
            assert_eq!(RoomId::new(bad), Err(ParseError::RoomName), "{bad:?}");
        }
    }

    #[test]
    fn room_ids_debug_quoted_and_display_bare() {
        let room = RoomId::new("aaa").unwrap();
        assert_eq!(format!("{room}"), "aaa");
        assert_eq!(format!("{room:?}"), "\"aaa\"");
    }
}
