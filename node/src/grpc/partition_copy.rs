//! `Peer/CopyPartitionRooms` and `Peer/CopyRoom` on the wire: the pages of
//! [`crate::timeline::copy`] as the answering replica serves them and as
//! the copying replica asks for them over the mutual-TLS peer links.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use saferchat_consensus::partition_log::Slot;
use saferchat_consensus::{NodeId, RoomId};
use saferchat_placement::{PartitionId, Placement};
use saferchat_proto::peer::{self as pb, peer_client::PeerClient};
use tonic::Status;

use crate::cluster_map::ClusterMaps;
use crate::error::NodeError;
use crate::message_id::MessageId;
use crate::storage::{ChatStore, StoredMessage};
use crate::timeline::Timeline;
use crate::timeline::copy::{self, CopySource, PAGE_BYTES_MAX, RoomPage, RoomsPage};

/// How long one page may take.
const PAGE_TIMEOUT_MS: u64 = 30_000;
/// The largest page on the wire: its envelopes and the records around
/// them (at most [`copy::PAGE_MESSAGES_MAX`] of a few dozen bytes each).
pub const PAGE_WIRE_BYTES_MAX: usize = PAGE_BYTES_MAX + (1 << 20);

// The server sends what the copier accepts.
const _: () = assert!(PAGE_WIRE_BYTES_MAX <= crate::grpc::peer::PEER_FRAME_BYTES_MAX);

/// What serving a page needs.
pub struct Serve<'a> {
    /// The calling node (from its certificate).
    pub caller: NodeId,
    /// Which nodes replicate which partitions now (following the cluster
    /// map's moves: a node that joined copies partitions it was given).
    pub placement: Arc<Placement>,
    /// The partition logs' applied marks; `None` on a single node.
    pub timeline: Option<&'a Timeline>,
    /// This node's store.
    pub store: &'a dyn ChatStore,
}

impl Serve<'_> {
    /// The partition, once checked: in range, and replicated by the caller.
    fn partition(&self, partition: u32) -> Result<u32, Status> {
        let partitions = self.placement.partitions();
        if partition >= partitions.get() {
            return Err(Status::invalid_argument(format!(
                "partition {partition}, but the cluster has {}",
                partitions.get()
            )));
        }
        if !self
            .placement
            .replicas(PartitionId(partition))
            .contains(&self.caller)
        {
            return Err(Status::permission_denied(format!(
                "{} does not replicate partition {partition}",
                self.caller
            )));
        }
        Ok(partition)
    }

    fn room_of(&self, partition: u32, name: &str) -> Result<RoomId, Status> {
        let room =
            RoomId::new(name).map_err(|e| Status::invalid_argument(format!("room name: {e}")))?;
        if self.placement.partitions().of_room(room.as_str()).0 != partition {
            return Err(Status::invalid_argument(format!(
                "room {room} is not in partition {partition}"
            )));
        }
        Ok(room)
    }

    /// Answers `CopyPartitionRooms`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad partition or cursor, PERMISSION_DENIED
    /// for a caller that does not replicate the partition,
    /// FAILED_PRECONDITION on a node that keeps no partition logs or does
    /// not replicate it; the store's error.
    pub async fn rooms(&self, call: pb::CopyRoomsCall) -> Result<pb::CopyRoomsPage, Status> {
        let partition = self.partition(call.partition)?;
        let after = if call.after.is_empty() {
            None
        } else {
            Some(self.room_of(partition, &call.after)?)
        };
        let timeline = self.timeline.ok_or_else(|| {
            Status::failed_precondition("this node keeps no partition logs (a single node)")
        })?;
        let (applied, checked) = timeline.copy_mark(partition).await?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "this node does not replicate partition {partition}"
            ))
        })?;
        let placement = Arc::clone(&self.placement);
        let in_partition =
            move |room: &RoomId| placement.partitions().of_room(room.as_str()).0 == partition;
        let page = copy::read_rooms(self.store, &in_partition, (applied, checked), after).await?;
        Ok(pb::CopyRoomsPage {
            applied: page.applied.0,
            rooms: page.rooms.iter().map(ToString::to_string).collect(),
            done: page.done,
            checked: page.checked,
        })
    }

    /// Answers `CopyRoom`.
    ///
    /// # Errors
    /// As [`Serve::rooms`], and INVALID_ARGUMENT for a room of another
    /// partition or a bad message id.
    pub async fn room(&self, call: pb::CopyRoomCall) -> Result<pb::CopyRoomPage, Status> {
        let partition = self.partition(call.partition)?;
        let room = self.room_of(partition, &call.room)?;
        let after = MessageId::from_optional(&call.after)
            .map_err(|e| Status::invalid_argument(format!("message id: {e}")))?;
        let page = copy::read_room(self.store, &room, after).await?;
        Ok(room_page_to_pb(page))
    }
}

fn room_page_to_pb(page: RoomPage) -> pb::CopyRoomPage {
    pb::CopyRoomPage {
        done: page.done,
        messages: page
            .messages
            .into_iter()
            .map(|m| pb::StoredMessageRecord {
                id: bytes::Bytes::copy_from_slice(&m.id.to_bytes()),
                seq: m.seq,
                envelope: m.envelope,
            })
            .collect(),
    }
}

fn bad(what: String) -> NodeError {
    NodeError::Unavailable(format!("copy page: {what}"))
}

fn room_page_from_pb(page: pb::CopyRoomPage, room: &RoomId) -> Result<RoomPage, NodeError> {
    let messages = page
        .messages
        .into_iter()
        .map(|m| {
            Ok(StoredMessage {
                room: room.clone(),
                id: MessageId::from_bytes(&m.id).map_err(|e| bad(format!("message id: {e}")))?,
                seq: m.seq,
                envelope: m.envelope,
            })
        })
        .collect::<Result<Vec<_>, NodeError>>()?;
    Ok(RoomPage {
        messages,
        done: page.done,
    })
}

fn rooms_page_from_pb(
    page: pb::CopyRoomsPage,
    partition: u32,
    placement: &Placement,
) -> Result<RoomsPage, NodeError> {
    let rooms = page
        .rooms
        .iter()
        .map(|name| {
            let room = RoomId::new(name).map_err(|e| bad(format!("room name: {e}")))?;
            if placement.partitions().of_room(room.as_str()).0 == partition {
                Ok(room)
            } else {
                Err(bad(format!("room {room} is not in partition {partition}")))
            }
        })
        .collect::<Result<Vec<_>, NodeError>>()?;
    Ok(RoomsPage {
        applied: Slot(page.applied),
        checked: page.checked,
        rooms,
        done: page.done,
    })
}

/// Pages from other replicas over the peer links.
#[derive(Debug)]
pub struct PeerCopySource {
    /// Channels to the other nodes.
    pub maps: ClusterMaps,
    /// Which rooms are in which partition.
    pub placement: Arc<Placement>,
}

impl PeerCopySource {
    fn client(&self, node: NodeId) -> Result<PeerClient<tonic::transport::Channel>, NodeError> {
        let channel = self
            .maps
            .channel(node.0)
            .ok_or_else(|| NodeError::Unavailable(format!("{node} cannot be dialled")))?;
        Ok(PeerClient::new(channel).max_decoding_message_size(PAGE_WIRE_BYTES_MAX))
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut call = tonic::Request::new(message);
    call.set_timeout(Duration::from_millis(PAGE_TIMEOUT_MS));
    call
}

fn answer_error(node: NodeId, status: &Status) -> NodeError {
    NodeError::Unavailable(format!("{node}: {}", status.message()))
}

#[async_trait]
impl CopySource for PeerCopySource {
    async fn rooms(
        &self,
        node: NodeId,
        partition: u32,
        after: Option<&RoomId>,
    ) -> Result<RoomsPage, NodeError> {
        let page = self
            .client(node)?
            .copy_partition_rooms(request(pb::CopyRoomsCall {
                partition,
                after: after.map(ToString::to_string).unwrap_or_default(),
            }))
            .await
            .map_err(|s| answer_error(node, &s))?
            .into_inner();
        rooms_page_from_pb(page, partition, &self.placement)
    }

    async fn room(
        &self,
        node: NodeId,
        partition: u32,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<RoomPage, NodeError> {
        let page = self
            .client(node)?
            .copy_room(request(pb::CopyRoomCall {
                partition,
                room: room.to_string(),
                after: after
                    .map(|id| bytes::Bytes::copy_from_slice(&id.to_bytes()))
                    .unwrap_or_default(),
            }))
            .await
            .map_err(|s| answer_error(node, &s))?
            .into_inner();
        room_page_from_pb(page, room)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use saferchat_placement::{ClusterNode, PartitionCount};

    use super::*;

    fn placement() -> Placement {
        let nodes: Vec<ClusterNode> = (1..=3)
            .map(|id| ClusterNode {
                id: NodeId(id),
                datacenter: "dc1".into(),
            })
            .collect();
        Placement::build(&nodes, PartitionCount::new(16).unwrap(), 3).unwrap()
    }

    fn room_in(placement: &Placement, partition: u32, not: bool) -> RoomId {
        (0..)
            .map(|i| RoomId::new(&format!("room-{i}")).unwrap())
            .find(|r| (placement.partitions().of_room(r.as_str()).0 == partition) != not)
            .unwrap()
    }

    #[test]
    fn pages_round_trip_and_foreign_rooms_are_refused() {
        let placement = placement();
        let mine = room_in(&placement, 3, false);
        let foreign = room_in(&placement, 3, true);
        let id = crate::message_id::IdGenerator::after(None).next(1_700_000_000_000, 7);
        let page = RoomPage {
            messages: vec![StoredMessage {
                room: mine.clone(),
                id,
                seq: 9,
                envelope: bytes::Bytes::from_static(b"ciphertext"),
            }],
            done: false,
        };
        assert_eq!(
            room_page_from_pb(room_page_to_pb(page.clone()), &mine).unwrap(),
            page
        );
        let rooms = pb::CopyRoomsPage {
            applied: 42,
            rooms: vec![mine.to_string()],
            done: true,
            checked: 7,
        };
        let back = rooms_page_from_pb(rooms.clone(), 3, &placement).unwrap();
        assert_eq!((back.applied, back.checked), (Slot(42), 7));
        assert_eq!(back.rooms, vec![mine]);
        let mut foreign_page = rooms;
        foreign_page.rooms.push(foreign.to_string());
        let e = rooms_page_from_pb(foreign_page, 3, &placement).unwrap_err();
        assert!(e.to_string().contains("not in partition 3"), "{e}");
    }

    /// The largest room page the source builds fits what the copier
    /// accepts: messages up to the byte budget, at the largest envelope.
    #[test]
    fn the_largest_page_fits_the_wire_limit() {
        let envelope = saferchat_envelope::ENVELOPE_BYTES_MAX;
        let per_page = (PAGE_BYTES_MAX / envelope).max(1);
        let id = crate::message_id::IdGenerator::after(None).next(1_700_000_000_000, 7);
        let page = pb::CopyRoomPage {
            done: false,
            messages: (0..per_page)
                .map(|i| pb::StoredMessageRecord {
                    id: bytes::Bytes::copy_from_slice(&id.to_bytes()),
                    seq: u64::MAX - i as u64,
                    envelope: bytes::Bytes::from(vec![0xa5; envelope]),
                })
                .collect(),
        };
        assert!(page.encoded_len() <= PAGE_WIRE_BYTES_MAX);
        let small = pb::CopyRoomPage {
            done: false,
            messages: (0..copy::PAGE_MESSAGES_MAX)
                .map(|i| pb::StoredMessageRecord {
                    id: bytes::Bytes::copy_from_slice(&id.to_bytes()),
                    seq: u64::MAX - i as u64,
                    envelope: bytes::Bytes::from(vec![
                        0xa5;
                        PAGE_BYTES_MAX / copy::PAGE_MESSAGES_MAX
                    ]),
                })
                .collect(),
        };
        assert!(small.encoded_len() <= PAGE_WIRE_BYTES_MAX);
    }
}
