//! `Peer/CopyPartition` on the wire: the pages of [`crate::timeline::copy`]
//! as the answering replica serves them and as the copying replica asks
//! for them over the mutual-TLS peer links.

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
use crate::timeline::copy::{self, CopySource, Cursor, PAGE_BYTES_MAX, Page};

/// How long one page may take.
const PAGE_TIMEOUT_MS: u64 = 30_000;
/// The largest page on the wire: its envelopes, one more envelope of up to
/// 512 KiB that crossed the limit, and the records around them.
const PAGE_WIRE_BYTES_MAX: usize = PAGE_BYTES_MAX + (1 << 20) + (1 << 20);

/// Answers one `CopyPartition` call from `caller`, which must replicate
/// the partition.
///
/// # Errors
/// INVALID_ARGUMENT for a bad partition or cursor, PERMISSION_DENIED for a
/// caller that does not replicate the partition, FAILED_PRECONDITION on a
/// node that keeps no partition logs or does not replicate it; the store's
/// error.
pub async fn serve(
    caller: NodeId,
    call: pb::CopyPartitionCall,
    placement: &Arc<Placement>,
    timeline: Option<&Timeline>,
    store: &dyn ChatStore,
) -> Result<pb::CopyPartitionPage, Status> {
    let partitions = placement.partitions();
    if call.partition >= partitions.get() {
        return Err(Status::invalid_argument(format!(
            "partition {}, but the cluster has {}",
            call.partition,
            partitions.get()
        )));
    }
    if !placement
        .replicas(PartitionId(call.partition))
        .contains(&caller)
    {
        return Err(Status::permission_denied(format!(
            "{caller} does not replicate partition {}",
            call.partition
        )));
    }
    let timeline = timeline.ok_or_else(|| {
        Status::failed_precondition("this node keeps no partition logs (a single node)")
    })?;
    let cursor = cursor_from_pb(&call, placement)?;
    let applied = timeline.applied(call.partition).await?.ok_or_else(|| {
        Status::failed_precondition(format!(
            "this node does not replicate partition {}",
            call.partition
        ))
    })?;
    let partition = call.partition;
    let placement = Arc::clone(placement);
    let in_partition =
        move |room: &RoomId| placement.partitions().of_room(room.as_str()).0 == partition;
    let page = copy::read_page(store, &in_partition, applied, cursor).await?;
    Ok(page_to_pb(page))
}

fn cursor_from_pb(
    call: &pb::CopyPartitionCall,
    placement: &Placement,
) -> Result<Option<Cursor>, Status> {
    if call.room.is_empty() {
        return if call.after.is_empty() {
            Ok(None)
        } else {
            Err(Status::invalid_argument(
                "a cursor's message id without its room",
            ))
        };
    }
    let room = RoomId::new(&call.room)
        .map_err(|e| Status::invalid_argument(format!("cursor room name: {e}")))?;
    if placement.partitions().of_room(room.as_str()).0 != call.partition {
        return Err(Status::invalid_argument(format!(
            "room {room} is not in partition {}",
            call.partition
        )));
    }
    let after = MessageId::from_optional(&call.after)
        .map_err(|e| Status::invalid_argument(format!("cursor message id: {e}")))?;
    Ok(Some(Cursor { room, after }))
}

fn page_to_pb(page: Page) -> pb::CopyPartitionPage {
    let (next_room, next_after) = match &page.next {
        Some(c) => (
            c.room.to_string(),
            c.after
                .map(|id| bytes::Bytes::copy_from_slice(&id.to_bytes()))
                .unwrap_or_default(),
        ),
        None => (String::new(), bytes::Bytes::new()),
    };
    pb::CopyPartitionPage {
        applied: page.applied.0,
        done: page.next.is_none(),
        messages: page
            .messages
            .into_iter()
            .map(|m| pb::StoredMessageRecord {
                room: m.room.to_string(),
                id: bytes::Bytes::copy_from_slice(&m.id.to_bytes()),
                seq: m.seq,
                envelope: m.envelope,
            })
            .collect(),
        next_room,
        next_after,
    }
}

/// A page from wire, every message checked to be of `partition`.
fn page_from_pb(
    page: pb::CopyPartitionPage,
    partition: u32,
    placement: &Placement,
) -> Result<Page, NodeError> {
    let bad = |what: String| NodeError::Unavailable(format!("copy page: {what}"));
    let room_of = |name: &str| -> Result<RoomId, NodeError> {
        let room = RoomId::new(name).map_err(|e| bad(format!("room name: {e}")))?;
        if placement.partitions().of_room(room.as_str()).0 == partition {
            Ok(room)
        } else {
            Err(bad(format!("room {room} is not in partition {partition}")))
        }
    };
    let messages = page
        .messages
        .into_iter()
        .map(|m| {
            Ok(StoredMessage {
                room: room_of(&m.room)?,
                id: MessageId::from_bytes(&m.id).map_err(|e| bad(format!("message id: {e}")))?,
                seq: m.seq,
                envelope: m.envelope,
            })
        })
        .collect::<Result<Vec<_>, NodeError>>()?;
    let next = if page.done {
        None
    } else {
        Some(Cursor {
            room: room_of(&page.next_room)?,
            after: MessageId::from_optional(&page.next_after)
                .map_err(|e| bad(format!("cursor message id: {e}")))?,
        })
    };
    Ok(Page {
        applied: Slot(page.applied),
        messages,
        next,
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

#[async_trait]
impl CopySource for PeerCopySource {
    async fn page(
        &self,
        node: NodeId,
        partition: u32,
        cursor: Option<&Cursor>,
    ) -> Result<Page, NodeError> {
        let channel = self
            .maps
            .channel(node.0)
            .ok_or_else(|| NodeError::Unavailable(format!("{node} cannot be dialled")))?;
        let mut call = tonic::Request::new(pb::CopyPartitionCall {
            partition,
            room: cursor.map(|c| c.room.to_string()).unwrap_or_default(),
            after: cursor
                .and_then(|c| c.after)
                .map(|id| bytes::Bytes::copy_from_slice(&id.to_bytes()))
                .unwrap_or_default(),
        });
        call.set_timeout(Duration::from_millis(PAGE_TIMEOUT_MS));
        let page = PeerClient::new(channel)
            .max_decoding_message_size(PAGE_WIRE_BYTES_MAX)
            .copy_partition(call)
            .await
            .map_err(|s| NodeError::Unavailable(format!("{node}: {}", s.message())))?
            .into_inner();
        page_from_pb(page, partition, &self.placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saferchat_placement::{ClusterNode, PartitionCount};

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
    fn pages_round_trip_and_foreign_rooms_or_bad_cursors_are_refused() {
        let placement = placement();
        let mine = room_in(&placement, 3, false);
        let foreign = room_in(&placement, 3, true);
        let id = crate::message_id::IdGenerator::after(None).next(1_700_000_000_000, 7);
        let page = Page {
            applied: Slot(42),
            messages: vec![StoredMessage {
                room: mine.clone(),
                id,
                seq: 9,
                envelope: bytes::Bytes::from_static(b"ciphertext"),
            }],
            next: Some(Cursor {
                room: mine.clone(),
                after: Some(id),
            }),
        };
        let back = page_from_pb(page_to_pb(page.clone()), 3, &placement).unwrap();
        assert_eq!(back, page);
        let last = Page {
            next: None,
            ..page.clone()
        };
        assert_eq!(
            page_from_pb(page_to_pb(last.clone()), 3, &placement).unwrap(),
            last
        );

        let mut wire = page_to_pb(page);
        wire.messages[0].room = foreign.to_string();
        let e = page_from_pb(wire, 3, &placement).unwrap_err();
        assert!(e.to_string().contains("not in partition 3"), "{e}");

        let call = |room: &RoomId, after: &[u8]| pb::CopyPartitionCall {
            partition: 3,
            room: room.to_string(),
            after: bytes::Bytes::copy_from_slice(after),
        };
        assert!(cursor_from_pb(&call(&foreign, &[]), &placement).is_err());
        assert!(cursor_from_pb(&call(&mine, &[1, 2, 3]), &placement).is_err());
        let orphan = pb::CopyPartitionCall {
            partition: 3,
            room: String::new(),
            after: bytes::Bytes::copy_from_slice(&id.to_bytes()),
        };
        assert!(cursor_from_pb(&orphan, &placement).is_err());
        assert_eq!(
            cursor_from_pb(&call(&mine, &id.to_bytes()), &placement).unwrap(),
            Some(Cursor {
                room: mine,
                after: Some(id)
            })
        );
    }
}
