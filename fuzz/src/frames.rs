//! The protobuf messages each service accepts (chat, admin, peer) and the
//! node's conversions of peer frames into its consensus messages, and the
//! joining of a message sent in parts: never a panic, whatever the bytes.

use bytes::Bytes;
use prost::Message as _;
use saferchat_proto::{admin as apb, chat as cpb, peer as ppb};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let b = || Bytes::copy_from_slice(data);
        let _ = cpb::ClientFrame::decode(b());
        let _ = cpb::HistoryRequest::decode(b());
        let _ = cpb::MembersRequest::decode(b());
        let _ = apb::AddUserRequest::decode(b());
        let _ = apb::ListChatsRequest::decode(b());
        if let Ok(frame) = ppb::PeerFrame::decode(b()) {
            for m in &frame.messages {
                let _ = saferchat_node::convert::message_from_pb(m);
            }
            for m in &frame.log {
                let _ = saferchat_node::convert::log::message_from_pb(m);
            }
            for m in &frame.handover {
                let _ = saferchat_node::convert::handover::message_from_pb(m);
            }
        }
        // A stream's frames, length-delimited, their parts joined.
        let mut stream = b();
        let mut joining = saferchat_node::grpc::message_parts::Joining::default();
        while let Ok(frame) = ppb::PeerFrame::decode_length_delimited(&mut stream) {
            if let Some(part) = frame.part
                && joining.push(part).is_err()
            {
                break;
            }
        }
        if let Ok(r) = ppb::PartitionSealRecord::decode(b()) {
            let _ = saferchat_node::convert::handover::seal_from_pb(&r);
        }
        if let Ok(r) = ppb::HandoverRecord::decode(b()) {
            let _ = saferchat_node::convert::handover::record_from_pb(&r);
        }
        if let Ok(r) = ppb::RoomStateRecord::decode(b()) {
            let _ = saferchat_node::convert::state_from_pb(&r);
        }
        if let Ok(r) = ppb::AcceptorRecord::decode(b()) {
            let _ = saferchat_node::convert::acceptor_from_pb(&r);
        }
        if let Ok(r) = ppb::LogRecord::decode(b()) {
            for e in &r.entries {
                let _ = saferchat_node::convert::log::entry_from_pb(e);
            }
        }
    });
}
