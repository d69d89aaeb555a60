//! Chat across a three-node cluster, as the cluster issue's report tried
//! it: bob listens through one node, alice posts through the other two.
//! Every session of a room is served by the node that serves the room (its
//! partition log's leader): our client library follows the other nodes'
//! redirects there, and a client that follows none is relayed there by the
//! node it reached. So bob receives both posts live; every replica applies
//! the committed posts, and every node's history is the same.
//!
//! History itself is answered by every node: one that does not serve the
//! room forwards the call to the one that does, so the client library and
//! plain grpcurl read the same messages through any node, and a forwarded
//! call is never forwarded again.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use saferchat_client::ClientError;
use saferchat_client::connect::{connect, redirect_of};
use saferchat_client::crypto::{Recipient, open, seal};
use saferchat_client::history::{self, Query};
use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_consensus::{NodeId, Revision, RoomId};
use saferchat_placement::{ClusterNode, PartitionCount, Placement};
use saferchat_proto::chat::chat_room_server::{ChatRoom, ChatRoomServer};
use saferchat_proto::chat::{self as pb, chat_room_client::ChatRoomClient, server_frame};
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::process::{self, fixture_key};
use saferchat_tests::raw::Raw;
use tonic::{Code, Status};

/// How long anything a test waits for may take.
const DEADLINE: Duration = Duration::from_secs(60);

const ROOM: &str = "team";

/// The placement of a one-datacenter cluster of `n`, as the nodes
/// compute it.
fn placement(n: u64) -> Placement {
    let nodes: Vec<ClusterNode> = (1..=n)
        .map(|id| ClusterNode {
            id: NodeId(id),
            datacenter: "dc1".into(),
        })
        .collect();
    Placement::build(&nodes, PartitionCount::DEFAULT, 3).unwrap()
}

/// Which node prefers to serve `ROOM` in a cluster of `n`.
fn owner(n: u64) -> usize {
    let placement = placement(n);
    let (p, _) = placement.room(ROOM);
    placement.preferred_owner(p).0 as usize - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_of_three_chat_and_read_one_history() {
    chat_across(3).await;
}

/// Five nodes: each partition has three replicas, so two nodes of five
/// replicate nothing of the room and send its clients on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_of_five_chat_and_read_one_history() {
    chat_across(5).await;
}

async fn chat_across(n: usize) {
    let cluster = Cluster::start(Options::single_dc(n)).await;
    let dir = tempfile::tempdir().unwrap();
    let (alice_key, alice) = fixture_key(dir.path(), "alice", 0);
    let (_, bob) = fixture_key(dir.path(), "bob", 1);
    let owner = owner(n as u64);
    let others: Vec<usize> = (0..n).filter(|i| *i != owner).collect();

    // Admin calls work on any node.
    let mut admin = cluster.admin(others[0]).await;
    admin.create_chat(ROOM).await.expect("create");
    admin.add_user(ROOM, &alice, None).await.expect("add alice");
    cluster
        .admin(others[1])
        .await
        .add_user(ROOM, &bob, None)
        .await
        .expect("add bob");

    // Bob listens through a node that does not serve the room.
    let room = RoomId::new(ROOM).unwrap();
    let bob_id = Arc::new(saferchat_client::test_keys::identity(1));
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut listening = Session::join(&cluster.server(others[0]), &room, bob_id.clone(), &options)
        .await
        .expect("bob joins");
    // The room is served by its partition's leader: whichever replica won
    // the election (usually the preferred owner). Joins through every node
    // end there.
    let leader = listening.address().to_owned();
    for i in 0..n {
        let again = Session::join(&cluster.server(i), &room, bob_id.clone(), &options)
            .await
            .expect("bob joins again");
        assert_eq!(
            again.address(),
            leader,
            "joins through node {i} end at the leader"
        );
    }
    let _ = owner;

    // Alice posts through two other nodes (in a cluster of five, the last
    // ones, which may not replicate the room at all).
    let server_a = cluster.server(others[others.len() - 1]);
    let server_b = cluster.server(others[0]);
    let key = alice_key.clone();
    tokio::task::spawn_blocking(move || {
        process::send(&server_a, &key, ROOM, "through one node");
        process::send(&server_b, &key, ROOM, "through another");
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(60), listening.next())
            .await
            .expect("a live message within a minute")
            .expect("session")
            .expect("not ended");
        if let Event::Message(m) = event {
            let plain = m.content.expect("verified");
            seen.push(String::from_utf8(plain.body).unwrap());
        }
    }
    assert_eq!(seen, ["through one node", "through another"]);

    // Membership lives on the room's partition's replicas; the other nodes
    // (two of five) ask a replica and say so.
    let shape = placement(n as u64);
    let (_, replicas) = shape.room(ROOM);
    for i in 0..n {
        // The room list is the cluster's on every node, also on a node
        // whose store does not hold the room (see `grpc/room_list.rs`).
        let listed = cluster.admin(i).await.list_chats().await.expect("list");
        assert_eq!(
            listed.iter().map(|c| c.chat.as_str()).collect::<Vec<_>>(),
            [ROOM],
            "node {}",
            i + 1
        );
        let reply = cluster.admin(i).await.members(ROOM).await.expect("members");
        assert_eq!(reply.membership.expect("membership").members.len(), 2);
        let replica = replicas.contains(&NodeId(i as u64 + 1));
        assert_eq!(
            reply.read_path == "forwarded to a replica",
            !replica,
            "node {} ({}a replica): {}",
            i + 1,
            if replica { "" } else { "not " },
            reply.read_path
        );
    }

    // Every node answers history with the same two messages, in order.
    let histories = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|i| process::history(&cluster.server(i), &alice_key, ROOM))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for h in &histories {
        let one = h.find("through one node").expect(h);
        let another = h.find("through another").expect(h);
        assert!(one < another, "{h}");
        assert_eq!(h, &histories[0]);
    }
}

/// A cluster with `ROOM` and alice in it; alice joined on the room's node
/// and posted `bodies` there, each acknowledged. Returns the cluster, the
/// owner's index, alice's session and the acknowledged ids in order.
async fn room_with_posts(bodies: &[&str]) -> (Cluster, usize, Session, Vec<Bytes>) {
    let (cluster, owner, mut session) = room_with_alice(Options::single_dc(3), &[]).await;
    let mut ids = Vec::new();
    for body in bodies {
        ids.push(post_acked(&mut session, body.as_bytes()).await);
    }
    (cluster, owner, session, ids)
}

/// A cluster started with `options`, with `ROOM` and alice (and `others`)
/// in it, alice joined on the room's node. Returns the cluster, the
/// owner's index and alice's session.
async fn room_with_alice(
    options: Options,
    others: &[&Arc<saferchat_client::Identity>],
) -> (Cluster, usize, Session) {
    let cluster = Cluster::start(options).await;
    let preferred = owner(3);
    let alice_id = Arc::new(saferchat_client::test_keys::identity(0));
    let mut admin = cluster.admin((preferred + 1) % 3).await;
    admin.create_chat(ROOM).await.expect("create");
    for id in std::iter::once(&alice_id).chain(others.iter().copied()) {
        admin
            .add_user(ROOM, &id.handle().to_string(), None)
            .await
            .expect("add a member");
    }
    let room = RoomId::new(ROOM).unwrap();
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let session = Session::join(&cluster.server(preferred), &room, alice_id, &options)
        .await
        .expect("alice joins");
    // The node that serves the room: its partition's leader (the preferred
    // owner, which a first client makes run at once, unless it lost).
    let owner = (0..3)
        .find(|i| cluster.server(*i) == session.address())
        .expect("a node of the cluster");
    (cluster, owner, session)
}

/// Posts `body` and waits for its acknowledgement; returns its id.
async fn post_acked(session: &mut Session, body: &[u8]) -> Bytes {
    let seq = session.post(body).await.expect("post");
    loop {
        let event = tokio::time::timeout(DEADLINE, session.next())
            .await
            .expect("a post result in time")
            .expect("session")
            .expect("not ended");
        match event {
            Event::Accepted { seq: s, id, .. } if s == seq => return id,
            Event::Rejected {
                seq: s, message, ..
            } if s == seq => panic!("post refused: {message}"),
            _ => {}
        }
    }
}

/// History through `address` with a plain generated client, which follows
/// no redirect; `forwarded` marks the request as one a node forwarded.
async fn raw_history(address: &str, token: &str, forwarded: bool) -> Result<Vec<Bytes>, Status> {
    let channel = connect(address).await.expect("connect");
    let mut request = tonic::Request::new(pb::HistoryRequest {
        chat: ROOM.into(),
        session: token.to_owned(),
        limit: 100,
        ..pb::HistoryRequest::default()
    });
    if forwarded {
        request
            .metadata_mut()
            .insert("saferchat-forwarded", "1".parse().unwrap());
    }
    let mut pages = ChatRoomClient::new(channel)
        .history(request)
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(page) = pages.message().await? {
        ids.extend(page.items.into_iter().map(|d| d.id));
    }
    Ok(ids)
}

/// A node as older versions were: History on a room it does not serve is
/// answered with a redirect to `to` (or to itself when `to` is `None`).
struct Redirecting {
    to: Option<String>,
    itself: String,
}

#[tonic::async_trait]
impl ChatRoom for Redirecting {
    type PostStream = futures::stream::Empty<Result<pb::ServerFrame, Status>>;
    type HistoryStream = futures::stream::Empty<Result<pb::HistoryPage, Status>>;

    async fn post(
        &self,
        _: tonic::Request<tonic::Streaming<pb::ClientFrame>>,
    ) -> Result<tonic::Response<Self::PostStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn history(
        &self,
        _: tonic::Request<pb::HistoryRequest>,
    ) -> Result<tonic::Response<Self::HistoryStream>, Status> {
        let to = self.to.as_ref().unwrap_or(&self.itself);
        let mut status = Status::unavailable(format!("served at {to}"));
        status
            .metadata_mut()
            .insert("saferchat-redirect", to.parse().unwrap());
        Err(status)
    }

    async fn members(
        &self,
        _: tonic::Request<pb::MembersRequest>,
    ) -> Result<tonic::Response<saferchat_proto::common::Membership>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves [`Redirecting`] on a loopback port until the test ends.
async fn redirecting_node(to: Option<String>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let itself = listener.local_addr().expect("address").to_string();
    let service = ChatRoomServer::new(Redirecting {
        to,
        itself: itself.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    itself
}

const BODIES: [&str; 5] = ["one", "two", "three", "four", "five"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_answers_history_by_forwarding_to_the_rooms_node() {
    let (mut cluster, owner, session, posted) = room_with_posts(&BODIES).await;
    let query = Query {
        limit: 100,
        ..Query::default()
    };

    // Through every node, the client library reads the owner's timeline:
    // the same ids, newest first, each verified and decrypted.
    let newest_first: Vec<Bytes> = posted.iter().rev().cloned().collect();
    for i in 0..3 {
        let messages = history::read_via(&cluster.server(i), &session, &query)
            .await
            .unwrap_or_else(|e| panic!("history through node {}: {e}", i + 1));
        let ids: Vec<Bytes> = messages.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids, newest_first, "history through node {}", i + 1);
        let bodies: Vec<String> = messages
            .into_iter()
            .map(|m| String::from_utf8(m.content.expect("verified").body).unwrap())
            .collect();
        let mut expected: Vec<String> = BODIES.iter().map(|b| (*b).to_owned()).collect();
        expected.reverse();
        assert_eq!(bodies, expected, "history through node {}", i + 1);

        // Oldest first after the first post, through this node too.
        let after = Query {
            after_id: Some(posted[0].clone()),
            limit: 2,
            ..Query::default()
        };
        let page = history::read_via(&cluster.server(i), &session, &after)
            .await
            .expect("history after an id");
        let ids: Vec<Bytes> = page.into_iter().map(|m| m.id).collect();
        assert_eq!(ids, posted[1..3], "history after through node {}", i + 1);
    }

    // A plain client that follows no redirect gets the same pages
    // through every node: the others forward the call.
    for i in 0..3 {
        let ids = raw_history(&cluster.server(i), session.token(), false)
            .await
            .unwrap_or_else(|s| panic!("plain History through node {}: {s:?}", i + 1));
        assert_eq!(ids, newest_first, "plain History through node {}", i + 1);
    }

    // A request another node already forwarded is not forwarded again:
    // a node that does not serve the room answers with the redirect...
    for i in (0..3).filter(|i| *i != owner) {
        let status = raw_history(&cluster.server(i), session.token(), true)
            .await
            .expect_err("a forwarded request at a node that does not serve the room");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            redirect_of(&status).as_deref(),
            Some(cluster.server(owner).as_str()),
            "{status:?}"
        );
    }
    // ...and the owner answers it itself.
    let ids = raw_history(&cluster.server(owner), session.token(), true)
        .await
        .expect("the owner answers a forwarded request");
    assert_eq!(ids, newest_first);

    // The client library still follows a redirect (from a node that
    // answers with one instead of forwarding), a bounded number of times.
    let older = redirecting_node(Some(cluster.server(owner))).await;
    let messages = history::read_via(&older, &session, &query)
        .await
        .expect("history through a redirecting node");
    let ids: Vec<Bytes> = messages.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, newest_first);
    let looping = redirecting_node(None).await;
    let err = history::read_via(&looping, &session, &query)
        .await
        .expect_err("a redirect loop");
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("too many redirects")),
        "{err}"
    );

    // The caller is still authenticated where the call arrives: a bad
    // token is refused there, owner or not.
    for i in 0..3 {
        let channel = connect(&cluster.server(i)).await.expect("connect");
        let status = ChatRoomClient::new(channel)
            .history(pb::HistoryRequest {
                chat: ROOM.into(),
                session: "not-a-session-token".into(),
                ..pb::HistoryRequest::default()
            })
            .await
            .expect_err("a bad token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    // With the owner down, another node says which node it could not
    // reach rather than hanging or redirecting to a dead node.
    let owner_address = cluster.server(owner);
    cluster.kill(owner);
    let other = (owner + 1) % 3;
    let err = history::read_via(&cluster.server(other), &session, &query)
        .await
        .expect_err("the room's node is down");
    let ClientError::Status(status) = err else {
        panic!("expected a status, got {err}");
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&owner_address), "{status:?}");
    assert!(redirect_of(&status).is_none(), "{status:?}");
}

/// grpcurl on the command line: it cannot follow redirects.
fn grpcurl_history(address: &str, token: &str) -> Vec<String> {
    let bin = saferchat_tests::bin::grpcurl()
        .expect("grpcurl not found: run scripts/test.sh (installs it) or set GRPCURL");
    let request = serde_json::json!({"chat": ROOM, "session": token, "limit": 100}).to_string();
    let out = Command::new(bin)
        .args([
            "-plaintext",
            "-d",
            &request,
            address,
            "server.grpc.chat.ChatRoom/History",
        ])
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl History on {address} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // One JSON object per page; ids are bytes, which grpcurl prints in
    // standard base64.
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .flat_map(|page| {
            let page = page.expect("grpcurl prints JSON");
            page["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|item| item["id"].as_str().expect("an id").to_owned())
        })
        .collect()
}

/// Standard base64 with padding, as grpcurl prints bytes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs grpcurl: run scripts/test.sh or set GRPCURL"]
async fn grpcurl_reads_the_same_history_through_every_node() {
    let (cluster, _, session, posted) = room_with_posts(&BODIES).await;
    let token = session.token().to_owned();
    let addresses: Vec<String> = (0..3).map(|i| cluster.server(i)).collect();
    let histories = tokio::task::spawn_blocking(move || {
        addresses
            .iter()
            .map(|a| grpcurl_history(a, &token))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let newest_first: Vec<String> = posted.iter().rev().map(|id| base64(id)).collect();
    for (i, ids) in histories.iter().enumerate() {
        assert_eq!(ids, &newest_first, "grpcurl History through node {}", i + 1);
    }
}

/// One admin call with plain grpcurl; its JSON answer.
fn grpcurl_admin(address: &str, method: &str, request: &serde_json::Value) -> serde_json::Value {
    let bin = saferchat_tests::bin::grpcurl()
        .expect("grpcurl not found: run scripts/test.sh (installs it) or set GRPCURL");
    let auth = format!("authorization: Bearer {}", saferchat_tests::ADMIN_TOKEN);
    let out = Command::new(bin)
        .args([
            "-plaintext",
            "-H",
            &auth,
            "-d",
            &request.to_string(),
            address,
        ])
        .arg(format!("server.grpc.admin.Admin/{method}"))
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {method} on {address} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("grpcurl prints JSON")
}

/// The README's grpcurl calls against every node of five: the room is
/// created through one node, each node adds a member, and every node lists
/// all of them (the two nodes that do not replicate the room ask a replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs grpcurl: run scripts/test.sh or set GRPCURL"]
async fn grpcurl_admin_calls_work_through_every_node_of_five() {
    const CHAT: &str = "grpcurl-five";
    let cluster = Cluster::start(Options::single_dc(5)).await;
    let addresses: Vec<String> = (0..5).map(|i| cluster.server(i)).collect();
    let handles: Vec<String> = (0..5)
        .map(|i| {
            saferchat_client::test_keys::identity(i)
                .handle()
                .to_string()
        })
        .collect();
    let replies = tokio::task::spawn_blocking(move || {
        let created = grpcurl_admin(
            &addresses[0],
            "AddChat",
            &serde_json::json!({"chat": CHAT, "op": "CREATE"}),
        );
        assert_eq!(created["revision"], "1", "{created}");
        for (address, handle) in addresses.iter().zip(&handles) {
            let added = grpcurl_admin(
                address,
                "AddUser",
                &serde_json::json!({"chat": CHAT, "op": "ADD", "user": handle}),
            );
            assert_eq!(added["changed"], true, "{added}");
        }
        addresses
            .iter()
            .map(|a| grpcurl_admin(a, "Members", &serde_json::json!({"chat": CHAT})))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (i, reply) in replies.iter().enumerate() {
        let members = reply["membership"]["members"]
            .as_array()
            .unwrap_or_else(|| panic!("node {}: {reply}", i + 1));
        assert_eq!(members.len(), 5, "node {}: {reply}", i + 1);
        assert_eq!(
            reply["membership"]["revision"],
            "6",
            "node {}: {reply}",
            i + 1
        );
    }
}

/// The next live delivery on a raw stream, skipping other frames.
async fn next_live(raw: &mut Raw) -> pb::Delivery {
    loop {
        let frame = tokio::time::timeout(DEADLINE, raw.next())
            .await
            .expect("a live delivery in time")
            .expect("the relayed session stays open");
        if let server_frame::Frame::Deliveries(d) = frame
            && !d.history
            && let Some(item) = d.items.into_iter().next()
        {
            return item;
        }
    }
}

/// A client that follows no redirect (grpcurl, a generated stub) joins
/// through a node that does not serve the room. That node relays the
/// session to the room's node, so the client is challenged, chats live in
/// both directions and is removed exactly as on the room's node; its
/// session token works on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_follows_no_redirect_chats_through_a_relaying_node() {
    let (cluster, owner, mut alice, _) = room_with_posts(&[]).await;
    let alice_id = Arc::new(saferchat_client::test_keys::identity(0));
    let bob = Arc::new(saferchat_client::test_keys::identity(1));
    let mut admin = cluster.admin(owner).await;
    admin
        .add_user(ROOM, &bob.handle().to_string(), None)
        .await
        .expect("add bob");
    let through = (owner + 1) % 3;
    let (mut raw, joined) = Raw::join(&cluster.server(through), ROOM, &bob).await;
    assert!(!joined.session.is_empty());

    // Alice posts on the room's node; bob's relayed session has it live.
    let room = RoomId::new(ROOM).unwrap();
    // (Her session learns bob's key first, so the post is sealed for him
    // rather than refused as stale and resealed.)
    alice.refresh_members().await.expect("members");
    alice.post(b"to bob, relayed").await.expect("post");
    let item = next_live(&mut raw).await;
    assert_eq!(item.seq, 1);
    let sender_key =
        |h: &saferchat_consensus::Handle| (*h == alice_id.handle()).then(|| alice_id.public_key());
    let plain = open(&bob, &room, item.sealed, sender_key).expect("bob opens it");
    assert_eq!(plain.body, b"to bob, relayed");

    // Bob posts through the relay; the room's node places it next, and
    // alice has it live.
    let envelope = seal(
        &bob,
        &room,
        Revision(joined.revision),
        &[&alice_id, &bob]
            .iter()
            .map(|id| Recipient::of(id))
            .collect::<Vec<_>>(),
        b"from bob, relayed",
    )
    .expect("seal");
    raw.post(7, envelope.encode()).await;
    let result = raw.result().await;
    assert_eq!(result.client_seq, 7);
    match result.outcome {
        Some(pb::post_result::Outcome::Accepted(a)) => assert_eq!(a.seq, 2),
        other => panic!("bob's post through the relay: {other:?}"),
    }
    loop {
        let event = tokio::time::timeout(DEADLINE, alice.next())
            .await
            .expect("bob's post reaches alice in time")
            .expect("session")
            .expect("not ended");
        // (Alice's own post comes back to her first.)
        if let Event::Message(m) = event
            && m.seq == 2
        {
            assert_eq!(m.content.expect("verified").body, b"from bob, relayed");
            break;
        }
    }

    // The token the relayed join issued reads history on the third node.
    let third = (owner + 2) % 3;
    let mut reader = ChatRoomClient::new(connect(&cluster.server(third)).await.unwrap());
    let mut pages = reader
        .history(pb::HistoryRequest {
            chat: ROOM.into(),
            session: joined.session.clone(),
            ..pb::HistoryRequest::default()
        })
        .await
        .expect("history with the relayed session's token")
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(page) = pages.message().await.expect("page") {
        seqs.extend(page.items.iter().map(|i| i.seq));
    }
    assert_eq!(seqs, [2, 1], "newest first");

    // Removing bob ends his relayed session, as on the room's node.
    admin
        .remove_user(ROOM, &bob.handle().to_string(), None)
        .await
        .expect("remove bob");
    let status = tokio::time::timeout(DEADLINE, raw.end())
        .await
        .expect("the relayed session ends in time");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("removed"), "{status:?}");
}

/// A relayed session that stops reading is closed by the room's node as
/// too slow, as a direct one is: the relay's bounded queues and HTTP/2
/// flow control carry the backpressure back to the room's node, which
/// never waits for a slow reader. The client gets RESOURCE_EXHAUSTED after
/// what was queued, in order, and History still holds every post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_session_that_stops_reading_is_closed_as_too_slow() {
    const POSTS: usize = 240;
    let mut options = Options::single_dc(3);
    options
        .env
        .push(("SAFERCHAT_SESSION_QUEUE_MAX".into(), "16".into()));
    let bob = Arc::new(saferchat_client::test_keys::identity(1));
    let (cluster, owner, mut alice) = room_with_alice(options, &[&bob]).await;
    // Bob joins through another node, which relays him, and then does not
    // read.
    let (mut raw, _) = Raw::join(&cluster.server((owner + 1) % 3), ROOM, &bob).await;
    alice.refresh_members().await.expect("members");

    // Enough bytes to fill both hops' flow-control windows (megabytes) as
    // well as the relay's and the session's queues.
    for i in 0..POSTS {
        let mut body = format!("message {i} ").into_bytes();
        body.resize(60 * 1024, b'.');
        post_acked(&mut alice, &body).await;
    }

    // Bob reads now: what was queued, in order, then RESOURCE_EXHAUSTED.
    let mut seqs = Vec::new();
    let end = loop {
        match tokio::time::timeout(DEADLINE, raw.next())
            .await
            .expect("the relayed session ends in time")
        {
            Ok(server_frame::Frame::Deliveries(d)) => seqs.extend(d.items.iter().map(|i| i.seq)),
            Ok(_) => {}
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(
        seqs.len() < POSTS,
        "bob fell behind ({} of {POSTS})",
        seqs.len()
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "what he got came in order"
    );
    // Nothing is lost: every post is in the room's history, read through
    // the third node.
    let query = Query {
        limit: 1000,
        ..Query::default()
    };
    let stored: Vec<u64> = history::read_via(&cluster.server((owner + 2) % 3), &alice, &query)
        .await
        .expect("history")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(
        stored,
        (1..=POSTS as u64).rev().collect::<Vec<_>>(),
        "newest first"
    );
}

/// A client that got no answer to a post (the partition's leader moved
/// while it was in flight) sends the same envelope again; by then the
/// membership may have moved on. The first attempt may be in the log
/// still, and may commit: the retry must get its place, and not a refusal
/// that makes the client wrap the message again (the room would then hold
/// it twice, which the chaos campaign saw under load). Here the first
/// attempt committed before the membership moved on; a stale envelope
/// never sent before is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sent_after_the_membership_moved_on_gets_the_first_attempts_place() {
    let (cluster, owner, mut session) = room_with_alice(Options::single_dc(3), &[]).await;
    let bob = saferchat_client::test_keys::identity(1);
    let add_bob = async {
        let mut admin = cluster.admin((owner + 1) % 3).await;
        admin
            .add_user(ROOM, &bob.handle().to_string(), None)
            .await
            .expect("add bob");
    };
    let seen =
        saferchat_tests::load::retry_across_a_membership_change(&mut session, add_bob, DEADLINE)
            .await;
    let first = seen.first.clone().expect("acknowledged");
    assert_eq!(seen.again, seen.first, "the retry gets the first place");
    let refused = seen
        .never_sent
        .expect_err("a stale envelope never sent is refused");
    assert!(refused.contains("membership is at revision"), "{refused}");

    let query = Query {
        limit: 100,
        ..Query::default()
    };
    for i in 0..3 {
        let ids: Vec<Bytes> = history::read_via(&cluster.server(i), &session, &query)
            .await
            .unwrap_or_else(|e| panic!("history through node {}: {e}", i + 1))
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, vec![first.0.clone()], "history through node {}", i + 1);
    }
}
