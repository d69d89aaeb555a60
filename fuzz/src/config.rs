//! The node's configuration file, and the names inside it: parsed or
//! refused, never a panic; room names, handles and fingerprints that parse
//! print back as themselves.

use saferchat_vocabulary::{CertificateFingerprint, Handle, RoomId};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(config) = toml::from_str::<saferchat_node::config::NodeConfig>(text) {
            let _ = config.validate();
        }
        if let Ok(room) = RoomId::new(text) {
            assert_eq!(room.as_str(), text);
        }
        if let Ok(handle) = text.parse::<Handle>() {
            assert_eq!(handle.to_string().parse::<Handle>().ok(), Some(handle));
        }
        if let Ok(f) = text.parse::<CertificateFingerprint>() {
            assert_eq!(
                f.to_string().parse::<CertificateFingerprint>().ok(),
                Some(f)
            );
        }
    });
}
