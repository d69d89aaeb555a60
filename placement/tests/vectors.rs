//! Test vectors: placement is part of the protocol, so these values must
//! never change. They were computed by an independent implementation of
//! the documented rules (a few lines of Python's hashlib and bisect), not
//! by this crate:
//!
//! - `room_hash(name)` = first 8 bytes, big endian, of SHA-256(name);
//! - partition = ⌊room_hash · P / 2^64⌋;
//! - a virtual node sits at the hash of `"saferchat-vnode" ‖ id (u64 BE) ‖
//!   index (u32 BE)`, 256 per node; a partition at the hash of
//!   `"saferchat-partition" ‖ p (u32 BE)`; its replicas in a datacenter
//!   are the first distinct nodes at or after its position, clockwise.

use saferchat_consensus::NodeId;
use saferchat_placement::{ClusterNode, PartitionCount, PartitionId, Placement, room_hash};

/// (room, room_hash, partition of 256, partition of 1024)
const ROOMS: &[(&str, u64, u32, u32)] = &[
    ("", 0xe3b0_c442_98fc_1c14, 227, 910),
    ("aaa", 0x9834_876d_cfb0_5cb1, 152, 608),
    ("team", 0xca8b_22d0_db83_a22d, 202, 810),
    ("lunch", 0xf3bb_79e4_8a7a_8af1, 243, 974),
    ("élan", 0x640b_44d5_a781_9f78, 100, 400),
    ("room-0", 0x737e_a8b4_404c_7e65, 115, 461),
    ("room-999", 0xb681_524e_757a_5cf1, 182, 730),
];

#[test]
fn room_hashes_and_partitions() {
    let (p256, p1024) = (
        PartitionCount::new(256).unwrap(),
        PartitionCount::new(1024).unwrap(),
    );
    for (room, hash, in256, in1024) in ROOMS {
        assert_eq!(room_hash(room), *hash, "{room:?}");
        assert_eq!(p256.of_room(room), PartitionId(*in256), "{room:?}");
        assert_eq!(p1024.of_room(room), PartitionId(*in1024), "{room:?}");
    }
    let long = "x".repeat(64);
    assert_eq!(room_hash(&long), 0x7ce1_0097_1f64_e700);
}

/// Nodes 1-5 in one datacenter, 256 partitions, 3 replicas.
#[test]
fn replica_sets_of_a_five_node_cluster() {
    let nodes: Vec<ClusterNode> = (1..=5)
        .map(|id| ClusterNode {
            id: NodeId(id),
            datacenter: "dc1".into(),
        })
        .collect();
    let placement = Placement::build(&nodes, PartitionCount::DEFAULT, 3).unwrap();
    for (p, replicas) in [
        (0, [2, 3, 5]),
        (1, [3, 1, 4]),
        (152, [4, 3, 5]),
        (202, [3, 1, 4]),
        (255, [3, 1, 2]),
    ] {
        let expected: Vec<NodeId> = replicas.into_iter().map(NodeId).collect();
        assert_eq!(placement.replicas(PartitionId(p)), expected, "p{p}");
    }
    // "team" is in partition 202: served by node 3 while all is well.
    assert_eq!(placement.room("team").0, PartitionId(202));
    assert_eq!(placement.preferred_owner(PartitionId(202)), NodeId(3));
}
