//! The peer port of a three-node cluster trusts nothing but a cluster
//! certificate: a caller without one, or with one from another CA, gets no
//! frame through; a node with a valid certificate cannot speak for another
//! node; a frame with an absurd ballot is refused; a message sent in parts
//! is joined only in order, and what its parts make is held to the same
//! rules; and the room's membership is untouched by all of it.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use saferchat_client::test_keys;
use saferchat_proto::peer::{self as pb, peer_client::PeerClient};
use saferchat_tests::cluster::{Cluster, Options};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn handle(n: usize) -> String {
    test_keys::identity(n).handle().to_string()
}

/// A `Commit` that would make `outsider` a member at revision 50.
fn forged_commit(room: &str, outsider: &[u8; 32], round: u64) -> pb::RoomMessage {
    pb::RoomMessage {
        room: room.to_owned(),
        body: Some(pb::room_message::Body::Commit(pb::Commit {
            ballot: Some(pb::Ballot {
                round,
                node: 2,
                epoch: 1,
            }),
            value: Some(pb::RoomStateRecord {
                revision: 50,
                created: true,
                members: vec![pb::MemberRecord {
                    handle: Bytes::copy_from_slice(outsider),
                    public_key: Bytes::new(),
                }],
                recent: Vec::new(),
            }),
        })),
    }
}

fn tls(dir: &Path, node: Option<u64>, target: u64) -> ClientTlsConfig {
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca");
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(format!("n{target}.dc1.saferchat"));
    if let Some(node) = node {
        let cert = std::fs::read(dir.join(format!("node-{node}.pem"))).expect("cert");
        let key = std::fs::read(dir.join(format!("node-{node}.key"))).expect("key");
        config = config.identity(Identity::from_pem(cert, key));
    }
    config
}

/// Sends one frame to node `target` (1-based) over `tls`; the call's
/// outcome (a refused handshake is an error too).
async fn send_frame(
    cluster: &Cluster,
    target: u64,
    tls: Option<ClientTlsConfig>,
    frame: pb::PeerFrame,
) -> Result<u64, tonic::Status> {
    send_frames(cluster, target, tls, vec![frame]).await
}

/// [`send_frame`] with several frames on one stream.
async fn send_frames(
    cluster: &Cluster,
    target: u64,
    tls: Option<ClientTlsConfig>,
    frames: Vec<pb::PeerFrame>,
) -> Result<u64, tonic::Status> {
    let addr = cluster.peer_addresses[target as usize - 1];
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap(),
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    }
    .connect_timeout(Duration::from_secs(5))
    .timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let mut client = PeerClient::new(channel);
    client
        .exchange(tokio_stream::iter(frames))
        .await
        .map(|r| r.into_inner().frames)
}

async fn members_everywhere(cluster: &Cluster, room: &str) -> Vec<(u64, Vec<String>)> {
    let mut out = Vec::new();
    for i in 0..cluster.nodes.len() {
        let reply = cluster.admin(i).await.members(room).await.expect("members");
        let m = reply.membership.expect("membership");
        out.push((m.revision, m.members.into_iter().map(|m| m.user).collect()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_what_a_cluster_certificate_does_not_vouch_for() {
    let cluster = Cluster::start(Options::single_dc(3)).await;
    let mut admin = cluster.admin(0).await;
    admin.create_chat("team").await.expect("create");
    admin
        .add_user("team", &handle(0), None)
        .await
        .expect("add alice");
    let outsider = *test_keys::identity(5).handle().as_bytes();
    let outsider_text = handle(5);

    // Wait until every node agrees on revision 2.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views = members_everywhere(&cluster, "team").await;
        if views.iter().all(|(rev, _)| *rev == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "nodes never agreed: {views:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let frame = |from: u64, message: pb::RoomMessage| pb::PeerFrame {
        from,
        messages: vec![message],
        ..pb::PeerFrame::default()
    };
    // `whole` in parts, each in a frame from `from`.
    let in_parts = |from: u64, whole: &pb::PeerFrame| -> Vec<pb::PeerFrame> {
        saferchat_node::grpc::message_parts::split(1, whole)
            .into_iter()
            .map(|part| pb::PeerFrame {
                from,
                part: Some(part),
                ..pb::PeerFrame::default()
            })
            .collect()
    };

    // Plaintext: the listener speaks only TLS.
    let plain = send_frame(
        &cluster,
        2,
        None,
        frame(2, forged_commit("team", &outsider, 9)),
    )
    .await;
    assert!(plain.is_err(), "plaintext frame accepted: {plain:?}");

    // TLS without a client certificate: the handshake is refused.
    let anonymous = send_frame(
        &cluster,
        2,
        Some(tls(&cluster.tls_dir, None, 2)),
        frame(2, forged_commit("team", &outsider, 9)),
    )
    .await;
    assert!(
        anonymous.is_err(),
        "anonymous frame accepted: {anonymous:?}"
    );

    // A certificate for "n3" from another CA: refused too.
    let rogue = tempfile::tempdir().unwrap();
    saferchat_node::peer_tls::generate(
        rogue.path(),
        &[(saferchat_consensus::NodeId(3), "dc1".into())],
    )
    .unwrap();
    std::fs::copy(cluster.tls_dir.join("ca.pem"), rogue.path().join("ca.pem")).unwrap();
    let foreign = send_frame(
        &cluster,
        2,
        Some(tls(rogue.path(), Some(3), 2)),
        frame(3, forged_commit("team", &outsider, 9)),
    )
    .await;
    assert!(foreign.is_err(), "foreign-CA frame accepted: {foreign:?}");

    // Node 3's real certificate, claiming to be node 1: refused by name.
    let forged = send_frame(
        &cluster,
        2,
        Some(tls(&cluster.tls_dir, Some(3), 2)),
        frame(1, forged_commit("team", &outsider, 9)),
    )
    .await
    .expect_err("forged from accepted");
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
    assert!(forged.message().contains("n1"), "{forged:?}");

    // Node 3's certificate, an absurd ballot: refused as malformed.
    let absurd = send_frame(
        &cluster,
        1,
        Some(tls(&cluster.tls_dir, Some(3), 1)),
        frame(
            3,
            pb::RoomMessage {
                room: "team".into(),
                body: Some(pb::room_message::Body::Prepare(pb::Prepare {
                    ballot: Some(pb::Ballot {
                        epoch: 1,
                        round: u64::MAX,
                        node: 3,
                    }),
                })),
            },
        ),
    )
    .await
    .expect_err("absurd ballot accepted");
    assert_eq!(absurd.code(), tonic::Code::InvalidArgument, "{absurd:?}");

    // Node 3's certificate, the forged commit from "n1" in parts: the
    // parts join, and what they make is refused by name.
    let forged_whole = pb::PeerFrame {
        from: 1,
        messages: vec![forged_commit("team", &outsider, 9)],
        ..pb::PeerFrame::default()
    };
    let forged = send_frames(
        &cluster,
        2,
        Some(tls(&cluster.tls_dir, Some(3), 2)),
        in_parts(3, &forged_whole),
    )
    .await
    .expect_err("forged from in parts accepted");
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");

    // A message of more than 4 MiB (handover answers nobody waits for)
    // in parts: joined and taken; the same parts out of order: refused.
    let stray = pb::HandoverMessage {
        partition: 0,
        body: Some(pb::handover_message::Body::Installed(
            pb::HandoverInstalled {
                ballot: Some(pb::Ballot {
                    epoch: 1,
                    round: 0,
                    node: 3,
                }),
            },
        )),
    };
    let large = pb::PeerFrame {
        handover: vec![stray; 600_000],
        ..pb::PeerFrame::default()
    };
    let parts = in_parts(3, &large);
    assert!(parts.len() >= 2, "{} parts", parts.len());
    let taken = send_frames(
        &cluster,
        1,
        Some(tls(&cluster.tls_dir, Some(3), 1)),
        parts.clone(),
    )
    .await
    .expect("a message in parts");
    assert_eq!(taken, parts.len() as u64);
    let mut shuffled = parts;
    shuffled.swap(0, 1);
    let refused = send_frames(
        &cluster,
        1,
        Some(tls(&cluster.tls_dir, Some(3), 1)),
        shuffled,
    )
    .await
    .expect_err("parts out of order accepted");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Nothing of the above changed the room, and it still changes.
    for (revision, members) in members_everywhere(&cluster, "team").await {
        assert_eq!(revision, 2);
        assert!(!members.contains(&outsider_text), "{members:?}");
    }
    let r = cluster
        .admin(1)
        .await
        .add_user("team", &handle(1), None)
        .await
        .expect("a change after the attacks");
    assert_eq!(r.revision, 3);
}
