//! Chat load for cluster tests: members who post one message at a time
//! and members who listen, each through whichever node answers, moving to
//! the next node when one fails; and the room's whole history read back
//! through one node. What they record is what
//! [`crate::chaos::history::check`] judges.
//!
//! A post ends acknowledged, refused, or unknown (no answer within
//! [`POST_TIMEOUT`]); unknown posts are not retried, so each text is
//! posted once and may be stored at most once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_client::{Identity, history};
use saferchat_consensus::RoomId;
use tokio_util::sync::CancellationToken;

use crate::chaos::history::{Outcome, Post, Seen};

/// How long a post may go unanswered before it counts as unknown.
pub const POST_TIMEOUT: Duration = Duration::from_secs(8);
/// A post answered later than this is reported on stderr.
const SLOW_POST: Duration = Duration::from_secs(2);
/// Messages read per history page.
const PAGE: u32 = 1000;

/// A test member's identity (the fixture keys, by number).
pub fn identity(member: usize) -> Arc<Identity> {
    Arc::new(saferchat_client::test_keys::identity(member))
}

/// Joins `room` through node `through`, trying the next node until
/// `deadline`; returns the session and the node it was joined through.
pub async fn join_any(
    servers: &[String],
    room: &RoomId,
    mut through: usize,
    me: &Arc<Identity>,
    deadline: Instant,
) -> Option<(Session, usize)> {
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    while Instant::now() < deadline {
        let joined = tokio::time::timeout(
            POST_TIMEOUT,
            Session::join(&servers[through], room, Arc::clone(me), &options),
        )
        .await;
        let failed = match joined {
            Ok(Ok(session)) => return Some((session, through)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer in {POST_TIMEOUT:?}"),
        };
        eprintln!(
            "{} {} joining {room} through {}: {failed}",
            wall_clock(),
            me.handle(),
            servers[through]
        );
        through = (through + 1) % servers.len();
        // Paces the retries (not a synchronisation: the next attempt
        // succeeds or fails on its own).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Seconds since the Unix epoch, to the millisecond: what a line on
/// stderr is set beside the nodes' logs by.
fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

/// One member posting.
#[derive(Clone, Debug)]
pub struct Poster {
    /// The nodes, tried in turn.
    pub servers: Vec<String>,
    /// The room.
    pub room: RoomId,
    /// The fixture member who posts (and joins first through node
    /// `member % servers.len()`).
    pub member: usize,
    /// Texts are `{prefix}-{member}-{n}`: unique in the run.
    pub prefix: String,
    /// Time between one post's answer and the next post.
    pub gap: Duration,
    /// When to stop at the latest.
    pub until: Instant,
    /// Cancelled to stop earlier (after the post in flight).
    pub stop: CancellationToken,
}

/// What a [`Poster`] saw, besides its posts.
#[derive(Clone, Debug, Default)]
pub struct Posted {
    /// Each acknowledged post: when it was answered, and how long after
    /// it was sent.
    pub acks: Vec<(Instant, Duration)>,
    /// The longest time between the first post and an acknowledgement,
    /// or between two acknowledgements: how long the member could not
    /// chat.
    pub longest_without_ack: Duration,
    /// Sessions joined (1 + how often the member had to join again).
    pub sessions: usize,
}

impl Poster {
    /// Posts until `until`, one post at a time; every attempt is pushed to
    /// `posts`.
    pub async fn run(self, posts: Arc<Mutex<Vec<Post>>>) -> Posted {
        let me = identity(self.member);
        let mut through = self.member % self.servers.len();
        let mut n = 0;
        let mut posted = Posted::default();
        let mut last_ack: Option<Instant> = None;
        let going = || Instant::now() < self.until && !self.stop.is_cancelled();
        while going() {
            let Some((mut session, at)) =
                join_any(&self.servers, &self.room, through, &me, self.until).await
            else {
                break;
            };
            posted.sessions += 1;
            through = at;
            while going() {
                let text = format!("{}-{}-{n}", self.prefix, self.member);
                n += 1;
                let started = Instant::now();
                let outcome = post_one(&mut session, &text).await;
                let answered = Instant::now();
                if matches!(outcome, Outcome::Acked { .. }) {
                    let since = last_ack.unwrap_or(started);
                    if answered - since > SLOW_POST {
                        eprintln!(
                            "{} {}: {:?} without an acknowledged post, until now",
                            wall_clock(),
                            self.room,
                            answered - since
                        );
                    }
                    posted.longest_without_ack = posted.longest_without_ack.max(answered - since);
                    posted.acks.push((answered, answered - started));
                    last_ack = Some(answered);
                }
                let took = answered - started;
                if took > SLOW_POST || !matches!(outcome, Outcome::Acked { .. }) {
                    // Why a member could not chat is what a failed stall
                    // bound needs explained: which node, which answer.
                    eprintln!(
                        "{} {text} through {}: {outcome:?} after {took:?}",
                        wall_clock(),
                        self.servers[through]
                    );
                }
                // UNAVAILABLE asks the client to reconnect (the node no
                // longer leads the room's partition, or cannot tell what
                // became of the post); through the same node, which
                // forwards to the room's new owner.
                let reconnect =
                    matches!(&outcome, Outcome::Refused(why) if why.starts_with("Unavailable"));
                let lost_session = outcome == Outcome::Unknown;
                posts.lock().expect("lock").push(Post {
                    text,
                    outcome,
                    sent: started,
                    answered,
                });
                if lost_session {
                    through = (through + 1) % self.servers.len();
                    break;
                }
                if reconnect {
                    break;
                }
                tokio::time::sleep(self.gap).await;
            }
        }
        if let Some(last) = last_ack {
            posted.longest_without_ack = posted.longest_without_ack.max(Instant::now() - last);
        }
        posted
    }
}

/// Posts `text` and waits for its answer.
async fn post_one(session: &mut Session, text: &str) -> Outcome {
    let Ok(seq) = session.post(text.as_bytes()).await else {
        return Outcome::Unknown;
    };
    let answer = tokio::time::timeout(POST_TIMEOUT, async {
        loop {
            match session.next().await {
                Ok(Some(Event::Accepted {
                    seq: s,
                    id,
                    room_seq,
                    ..
                })) if s == seq => {
                    return Outcome::Acked {
                        id: id.to_vec(),
                        seq: room_seq,
                    };
                }
                Ok(Some(Event::Rejected {
                    seq: s,
                    code,
                    message,
                })) if s == seq => {
                    return Outcome::Refused(format!("{code:?}: {message}"));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Outcome::Unknown,
            }
        }
    })
    .await;
    answer.unwrap_or(Outcome::Unknown)
}

/// Listens to `room` as `member` until `until` (joining first through
/// node `(member + 1) % servers.len()`): one list of deliveries per
/// session in `sessions`; a delivery that does not decrypt is described
/// in `unreadable`.
pub async fn listen(
    servers: Vec<String>,
    room: RoomId,
    member: usize,
    until: Instant,
    sessions: Arc<Mutex<Vec<Vec<Seen>>>>,
    unreadable: Arc<Mutex<Vec<String>>>,
) {
    let me = identity(member);
    let mut through = (member + 1) % servers.len();
    while Instant::now() < until {
        let Some((mut session, at)) = join_any(&servers, &room, through, &me, until).await else {
            return;
        };
        through = at;
        let mut seen = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, session.next()).await {
                Ok(Ok(Some(Event::Message(m)))) => match m.content {
                    Ok(plain) => seen.push(Seen {
                        id: m.id.to_vec(),
                        seq: m.seq,
                        text: String::from_utf8_lossy(&plain.body).into_owned(),
                        revision: plain.revision.0,
                    }),
                    Err(e) => unreadable.lock().expect("lock").push(e.to_string()),
                },
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None) | Err(_)) => {
                    through = (through + 1) % servers.len();
                    break;
                }
                Err(_) => break,
            }
        }
        sessions.lock().expect("lock").push(seen);
    }
}

/// The room's whole history, oldest first, read through `session`'s node
/// (or through `via`, another node); a message that does not decrypt is
/// described in `unreadable`.
///
/// # Errors
/// The history call's error.
pub async fn read_all(
    session: &Session,
    via: Option<&str>,
    unreadable: &Mutex<Vec<String>>,
) -> Result<Vec<Seen>, saferchat_client::ClientError> {
    let mut all = Vec::new();
    // Oldest first from the start: after the smallest UUIDv7 (time 0; no
    // after id at all would read newest first).
    let mut after = Some(bytes::Bytes::from_static(&[
        0, 0, 0, 0, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 0,
    ]));
    loop {
        let query = history::Query {
            after_id: after.clone(),
            limit: PAGE,
            ..history::Query::default()
        };
        let page = match via {
            Some(server) => history::read_via(server, session, &query).await?,
            None => history::read(session, &query).await?,
        };
        let full = page.len() == PAGE as usize;
        for m in page {
            after = Some(m.id.clone());
            match m.content {
                Ok(p) => all.push(Seen {
                    id: m.id.to_vec(),
                    seq: m.seq,
                    text: String::from_utf8_lossy(&p.body).into_owned(),
                    revision: p.revision.0,
                }),
                Err(e) => unreadable.lock().expect("lock").push(e.to_string()),
            }
        }
        if !full {
            return Ok(all);
        }
    }
}

/// The text of a stored envelope, opened as `reader`; the sender is one of
/// the fixture members `senders`.
pub fn open_stored(
    reader: &Identity,
    room: &RoomId,
    raw: &bytes::Bytes,
    senders: std::ops::Range<usize>,
) -> Option<String> {
    use saferchat_envelope::Envelope;
    use saferchat_envelope::sealed::Fanout;
    let envelope = Envelope::decode(raw.clone()).ok()?;
    let sealed = Fanout::new(&envelope).sealed_for_recipient(&reader.handle())?;
    let sender = senders
        .map(identity)
        .find(|id| id.handle() == envelope.sender)?;
    let plain =
        saferchat_client::crypto::open(reader, room, sealed, |_| Some(sender.public_key())).ok()?;
    Some(String::from_utf8_lossy(&plain.body).into_owned())
}

/// A stopped node's own store of each of `rooms` (sled, in
/// `data_dir/db`, opened once and closed: its lock is held until its tasks
/// end), oldest first, opened as `reader` (texts that do not open read
/// `<unreadable>`).
///
/// # Panics
/// When the store cannot be opened or read.
pub async fn stored(
    data_dir: &std::path::Path,
    rooms: &[RoomId],
    reader: &Identity,
    senders: std::ops::Range<usize>,
) -> Vec<Vec<Seen>> {
    use saferchat_node::storage::{self, Range, sled::SledStore};
    let store = SledStore::open(&data_dir.join("db")).expect("open a node's store");
    let mut all = Vec::new();
    for room in rooms {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = storage::history(&store, room, Range::After(after), PAGE as usize)
                .await
                .expect("read a node's store");
            let full = page.len() == PAGE as usize;
            for m in &page {
                after = Some(m.id);
                out.push(Seen {
                    id: m.id.to_bytes().to_vec(),
                    seq: m.seq,
                    text: open_stored(reader, room, &m.envelope, senders.clone())
                        .unwrap_or_else(|| "<unreadable>".into()),
                    revision: saferchat_envelope::Envelope::decode(m.envelope.clone())
                        .map_or(0, |e| e.revision.0),
                });
            }
            if !full {
                break;
            }
        }
        all.push(out);
    }
    store.close().await.expect("close a node's store");
    all
}

/// Posts `n` texts `{prefix}-{member}-{i}-` (then `pad` more bytes) into
/// `room` as `member`, at most 16 in flight, and waits for every answer;
/// every post is returned, acknowledged (a refusal or a lost session is an
/// error).
///
/// # Errors
/// No node let the member join, a post was refused, or the session ended.
pub async fn fill(
    servers: &[String],
    room: &RoomId,
    member: usize,
    prefix: &str,
    n: usize,
    pad: usize,
) -> Result<Vec<Post>, String> {
    const WINDOW: usize = 16;
    let deadline = Instant::now() + POST_TIMEOUT * 8;
    let (mut session, _) = join_any(servers, room, 0, &identity(member), deadline)
        .await
        .ok_or("no node let the member join")?;
    let mut texts = std::collections::HashMap::new();
    let mut posts = Vec::new();
    let mut sent = 0;
    while posts.len() < n {
        while sent < n && sent - posts.len() < WINDOW {
            let text = format!("{prefix}-{member}-{sent}-{}", "x".repeat(pad));
            let seq = session
                .post(text.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            texts.insert(seq, text);
            sent += 1;
        }
        let event = tokio::time::timeout(POST_TIMEOUT * 4, session.next())
            .await
            .map_err(|_| "no answer to the fill")?
            .map_err(|e| e.to_string())?;
        match event {
            Some(Event::Accepted {
                seq, id, room_seq, ..
            }) => posts.push(Post {
                text: texts.remove(&seq).ok_or("an answer to no post")?,
                outcome: Outcome::Acked {
                    id: id.to_vec(),
                    seq: room_seq,
                },
                // A fill's posts are pipelined: when each left is not
                // kept (no loss window applies to them).
                sent: Instant::now(),
                answered: Instant::now(),
            }),
            Some(Event::Rejected { message, .. }) => return Err(format!("refused: {message}")),
            Some(_) => {}
            None => return Err("the session ended".into()),
        }
    }
    Ok(posts)
}

/// What the clients of one room saw over a whole test: the posts with
/// their outcomes, each listening session's deliveries, and what did not
/// decrypt.
#[derive(Default)]
pub struct RoomRecord {
    /// Every post made, with its outcome.
    pub posts: Arc<Mutex<Vec<Post>>>,
    /// One list of deliveries per listening session.
    pub sessions: Arc<Mutex<Vec<Vec<Seen>>>>,
    /// Deliveries that did not decrypt.
    pub unreadable: Arc<Mutex<Vec<String>>>,
}

/// A steady chat load over some rooms: in each, `poster` posts one
/// message at a time (200 ms apart) and `listener` listens, through
/// whichever of the servers answers, until [`RoomsLoad::stop`].
pub struct RoomsLoad {
    stop: CancellationToken,
    posters: Vec<tokio::task::JoinHandle<Posted>>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl RoomsLoad {
    /// Starts the load in `rooms` through `servers`, recording into
    /// `records` (one per room); it ends at `until` at the latest. Posts
    /// are texts `{phase}-{room}-…`.
    pub fn start(
        servers: &[String],
        rooms: &[RoomId],
        (poster, listener): (usize, usize),
        phase: &str,
        records: &[RoomRecord],
        until: Instant,
    ) -> RoomsLoad {
        let stop = CancellationToken::new();
        let mut posters = Vec::new();
        let mut listeners = Vec::new();
        for (room, record) in rooms.iter().zip(records) {
            let posting = Poster {
                servers: servers.to_vec(),
                room: room.clone(),
                member: poster,
                prefix: format!("{phase}-{room}"),
                gap: Duration::from_millis(200),
                until,
                stop: stop.clone(),
            };
            posters.push(tokio::spawn(posting.run(Arc::clone(&record.posts))));
            let listen = listen(
                servers.to_vec(),
                room.clone(),
                listener,
                until,
                Arc::clone(&record.sessions),
                Arc::clone(&record.unreadable),
            );
            let stop = stop.clone();
            listeners.push(tokio::spawn(async move {
                tokio::select! {
                    () = listen => {}
                    () = stop.cancelled() => {}
                }
            }));
        }
        RoomsLoad {
            stop,
            posters,
            listeners,
        }
    }

    /// Stops the posters after the post each has in flight, then the
    /// listeners; returns the longest time a poster went without an
    /// acknowledgement.
    ///
    /// # Panics
    /// When a poster or listener task panicked.
    pub async fn stop(self) -> Duration {
        self.stop.cancel();
        let mut longest = Duration::ZERO;
        for task in self.posters {
            let posted = task.await.expect("a poster");
            longest = longest.max(posted.longest_without_ack);
        }
        for task in self.listeners {
            task.await.expect("a listener");
        }
        longest
    }
}

/// Each room's history, read as `reader` through every one of `servers`
/// (joining through any of them by `deadline`).
///
/// # Panics
/// When no server lets the reader join, a read fails, or two servers show
/// different histories of a room.
pub async fn agreed_histories(
    servers: &[String],
    rooms: &[RoomId],
    reader: usize,
    records: &[RoomRecord],
    deadline: Instant,
) -> Vec<Vec<Seen>> {
    let mut agreed = Vec::new();
    for (room, record) in rooms.iter().zip(records) {
        let (session, _) = join_any(servers, room, 0, &identity(reader), deadline)
            .await
            .expect("the room serves");
        let mut reads = Vec::new();
        for server in servers {
            reads.push(
                read_all(&session, Some(server), &record.unreadable)
                    .await
                    .expect("read the history"),
            );
        }
        for (i, h) in reads.iter().enumerate() {
            assert_eq!(*h, reads[0], "{room}: {} shows another history", servers[i]);
        }
        agreed.push(reads.swap_remove(0));
    }
    agreed
}

/// Judges each room after a run: what its clients saw (`records`, taken
/// out), the history the nodes agree on (`histories`), and each stopped
/// node's own store (`stores`, per node, per room; labelled `nodes`) must
/// pass [`crate::chaos::history::check`]; every delivery decrypts; more
/// than `fill` posts were acknowledged; and the stores of the nodes in
/// `full` hold at least `fill` posts of every room (they replicate it from
/// its first post). Prints a line per room.
///
/// # Panics
/// On any of those failing.
pub fn judge_rooms(
    rooms: &[RoomId],
    records: &[RoomRecord],
    histories: Vec<Vec<Seen>>,
    stores: Vec<Vec<Vec<Seen>>>,
    nodes: &[u64],
    (fill, full): (usize, &[u64]),
) {
    use crate::chaos::history::{self, History};
    let mut by_room: Vec<Vec<Vec<Seen>>> = rooms.iter().map(|_| Vec::new()).collect();
    for node in stores {
        for (r, stored) in node.into_iter().enumerate() {
            by_room[r].push(stored);
        }
    }
    for (((room, record), fin), stores) in rooms.iter().zip(records).zip(histories).zip(by_room) {
        let posts = std::mem::take(&mut *record.posts.lock().expect("lock"));
        let acked = posts
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Acked { .. }))
            .count();
        let h = History {
            posts,
            sessions: std::mem::take(&mut *record.sessions.lock().expect("lock")),
            fin,
            stores,
            lossy: Vec::new(),
        };
        println!(
            "{room}: {} posts, {acked} acknowledged, {} in the history, {} listening sessions, stores of nodes {nodes:?}: {:?}",
            h.posts.len(),
            h.fin.len(),
            h.sessions.len(),
            h.stores.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (node, stored) in nodes.iter().zip(&h.stores) {
            assert!(
                !full.contains(node) || stored.len() >= fill,
                "{room}: node {node} stores {} posts",
                stored.len()
            );
        }
        assert!(acked > fill, "{room}: posts got through");
        let anomalies = history::check(&h);
        assert!(anomalies.is_empty(), "{room}: {anomalies:?}");
        assert!(
            record.unreadable.lock().expect("lock").is_empty(),
            "{room}: every message decrypts"
        );
    }
}

/// Posts `n` messages `"{label} {i}"` on `session` and waits for every
/// acknowledgement, each within `deadline`: (id, room sequence number)
/// in posting order.
///
/// # Panics
/// On a refusal, or when the session ends or an acknowledgement does not
/// come in time (a test's assertion).
pub async fn post_acked(
    session: &mut Session,
    label: &str,
    n: usize,
    deadline: Duration,
) -> Vec<(bytes::Bytes, u64)> {
    let mut seqs = Vec::new();
    for i in 0..n {
        seqs.push(
            session
                .post(format!("{label} {i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    let mut acked: std::collections::HashMap<u64, (bytes::Bytes, u64)> =
        std::collections::HashMap::new();
    while acked.len() < n {
        match tokio::time::timeout(deadline, session.next()).await {
            Ok(Ok(Some(Event::Accepted {
                seq, id, room_seq, ..
            }))) => {
                acked.insert(seq, (id, room_seq));
            }
            Ok(Ok(Some(Event::Rejected { message, .. }))) => panic!("{label}: refused: {message}"),
            Ok(Ok(Some(_))) => {}
            other => panic!("{label}: session ended: {other:?}"),
        }
    }
    seqs.iter().map(|s| acked[s].clone()).collect()
}

/// Waits up to `deadline` for the outcome of post `seq`: `Ok((id, room
/// seq))`, or the refusal's message (also when the session ends: the node
/// ended it).
///
/// # Panics
/// When no outcome came by then.
pub async fn outcome(
    session: &mut Session,
    seq: u64,
    deadline: Duration,
) -> Result<(bytes::Bytes, u64), String> {
    loop {
        match tokio::time::timeout(deadline, session.next()).await {
            Ok(Ok(Some(Event::Accepted {
                seq: s,
                id,
                room_seq,
                ..
            }))) if s == seq => return Ok((id, room_seq)),
            Ok(Ok(Some(Event::Rejected {
                seq: s, message, ..
            }))) if s == seq => return Err(message),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Err("the session ended".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => panic!("post {seq}: no outcome within {deadline:?}"),
        }
    }
}

/// What [`retry_across_a_membership_change`] saw.
#[derive(Debug)]
pub struct RetryAcross {
    /// The first post's outcome.
    pub first: Result<(bytes::Bytes, u64), String>,
    /// The same envelope sent again after the change.
    pub again: Result<(bytes::Bytes, u64), String>,
    /// An envelope sealed before the change and first sent after it.
    pub never_sent: Result<(bytes::Bytes, u64), String>,
}

/// Posts one envelope and waits for its answer, lets `move_on` change
/// the room's membership, then sends the same bytes again (the retry of
/// a post whose answer was lost) and an envelope sealed before the change
/// but never sent; each waits up to `deadline`.
///
/// # Panics
/// When the session cannot seal or send, or an answer does not come.
pub async fn retry_across_a_membership_change(
    session: &mut Session,
    move_on: impl std::future::Future<Output = ()>,
    deadline: Duration,
) -> RetryAcross {
    const FIRST: u64 = 1 << 40;
    let envelope = session.seal(b"sent twice").expect("seal");
    let never_sent = session
        .seal(b"wrapped for the old membership")
        .expect("seal");
    session
        .send_raw(FIRST, envelope.clone())
        .await
        .expect("send");
    let first = outcome(session, FIRST, deadline).await;
    move_on.await;
    session.send_raw(FIRST + 1, envelope).await.expect("send");
    let again = outcome(session, FIRST + 1, deadline).await;
    session.send_raw(FIRST + 2, never_sent).await.expect("send");
    let never_sent = outcome(session, FIRST + 2, deadline).await;
    RetryAcross {
        first,
        again,
        never_sent,
    }
}
