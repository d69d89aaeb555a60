//! A vote is on disk before it leaves the node, by the system calls.
//!
//! Node 2 of a three-node cluster is traced with strace while node 1 makes
//! membership changes that node 2 votes on (and, in the second test, while
//! a client posts into a room whose partition log node 2 replicates: each
//! entry written to its partition-log file must be fdatasynced before the
//! Accept or Accepted that carries it leaves). Peer traffic is TLS, so a
//! send cannot be matched to the entry it carries; the criterion is the
//! one `check_order` describes. A driver patched to send before it writes
//! failed the second test when tried (the last entry written had no send
//! after its sync), but a reordering that kept sends flowing between
//! posts could pass it: the criterion is necessary, not sufficient. Every write of the room's
//! acceptor or membership record into sled's log file must be followed by
//! an `fdatasync` (or `fsync`) of that file before the send that carries
//! the vote (`check_order` says how that send is told apart, through TLS,
//! from older messages still leaving). sled's own flush only calls `sync_file_range`, which is not
//! durable; without the node's extra sync this test finds no `fdatasync`
//! of the file at all.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use saferchat_client::test_keys;
use saferchat_tests::cluster::{Cluster, Options};

const ROOM: &str = "durable-votes-room";
const CHANGES: usize = 8;

/// What a line of `strace -f -yy` output says, as far as this test cares.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A write into sled's log file that carries the room's record.
    VoteWrite,
    /// A sync of sled's log file finished.
    Synced,
    /// A write towards another node started.
    PeerSend,
}

/// `file` is how strace's `-yy` names the file descriptor of the file that
/// holds votes: a whole path followed by `>`, or the start of one.
fn parse(trace: &str, file: &str, peer_ports: &[u16]) -> Vec<(usize, Event)> {
    let is_peer_socket = |line: &str| {
        peer_ports
            .iter()
            .any(|p| line.contains(&format!("->127.0.0.1:{p}]>")))
    };
    let db = file;
    // A sync of the db file that strace split in two: pid → how many of
    // `unsynced` were written before it started.
    let mut pending: HashMap<&str, usize> = HashMap::new();
    // Record writes (their bytes) since the last sync, and those a sync
    // made durable: a node may write the same record again (a leader
    // re-sent an Accept), and its answer may then leave before the second
    // copy's sync, rightly: the first copy is durable. Such a write is
    // not a new vote.
    let mut unsynced: Vec<&str> = Vec::new();
    let mut durable: HashSet<&str> = HashSet::new();
    let mut events = Vec::new();
    for (n, line) in trace.lines().enumerate() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        let is_sync = call.starts_with("fdatasync(") || call.starts_with("fsync(");
        if is_sync && call.contains(db) {
            if call.contains("<unfinished ...>") {
                pending.insert(pid, unsynced.len());
            } else if call.ends_with("= 0") {
                durable.extend(unsynced.drain(..));
                events.push((n, Event::Synced));
            }
        } else if call.starts_with("<... fdatasync resumed>")
            || call.starts_with("<... fsync resumed>")
        {
            if let Some(before) = pending.remove(pid)
                && call.ends_with("= 0")
            {
                durable.extend(unsynced.drain(..before.min(unsynced.len())));
                events.push((n, Event::Synced));
            }
        } else if ["pwrite64(", "write(", "writev("]
            .iter()
            .any(|c| call.starts_with(c))
            && call.contains(db)
            && call.contains(ROOM)
            && carries_a_vote(call, db)
        {
            let bytes = payload(call).unwrap_or(call);
            if durable.contains(bytes) {
                continue;
            }
            unsynced.push(bytes);
            events.push((n, Event::VoteWrite));
        } else if ["write(", "writev(", "sendmsg(", "sendto("]
            .iter()
            .any(|c| call.starts_with(c))
            && is_peer_socket(call)
        {
            events.push((n, Event::PeerSend));
        }
    }
    events
}

/// Whether a write of the vote file carries a vote: for the partition
/// log, any record of the room; for sled's log, the room's
/// `AcceptorRecord`, not its `CommittedRecord` (learning a commit sends
/// nothing, so an unrelated send in its wake, such as a new connection's
/// handshake, must not be judged as a vote leaving early; a run under load
/// was failed that way). A sled log message stores a key as `len ‖ key`
/// and a value as `len ‖ value`, lengths in sled 0.34's varint; the two
/// records differ by their top-level protobuf fields: an acceptor record
/// has `promised` alone or all three, a committed one `ballot` and
/// `state`. A write this cannot read counts as a vote: the check then
/// judges more, never less.
fn carries_a_vote(call: &str, db: &str) -> bool {
    if !db.ends_with("db>") {
        return true;
    }
    let Some(bytes) = payload(call).map(unescape) else {
        return true;
    };
    let mut key = vec![u8::try_from(ROOM.len()).expect("short name")];
    key.extend_from_slice(ROOM.as_bytes());
    // One write may carry several records (sled batches what was inserted
    // since its last flush): it carries a vote when any of them is one.
    let mut found = false;
    for at in (0..bytes.len()).filter(|&i| bytes[i..].starts_with(&key)) {
        found = true;
        let rest = &bytes[at + key.len()..];
        let fields = sled_varint(rest)
            .and_then(|(len, skip)| rest.get(skip..skip + len))
            .and_then(top_level_fields);
        if fields.is_none_or(|f| f != [1, 2]) {
            return true;
        }
    }
    !found
}

/// The string argument of a traced write, still escaped.
fn payload(call: &str) -> Option<&str> {
    call.split_once(", \"")
        .and_then(|(_, rest)| rest.rsplit_once("\", "))
        .map(|(payload, _)| payload)
}

/// Undoes strace's escaping of a string argument (`\n`, `\"`, octal).
fn unescape(s: &str) -> Vec<u8> {
    let raw = s.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 == raw.len() {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        let simple = match c {
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'v' => Some(0x0b),
            b'f' => Some(0x0c),
            b'"' | b'\\' => Some(c),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        let mut value = u32::from(c - b'0');
        let mut digits = 1;
        while digits < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
            value = value * 8 + u32::from(raw[i] - b'0');
            i += 1;
            digits += 1;
        }
        out.push(u8::try_from(value).unwrap_or(u8::MAX));
    }
    out
}

/// sled 0.34's length prefix: one byte up to 240, then a marker byte and
/// big-endian bytes. Returns the value and how many bytes it took.
fn sled_varint(b: &[u8]) -> Option<(usize, usize)> {
    let first = usize::from(*b.first()?);
    match first {
        0..=240 => Some((first, 1)),
        241..=248 => Some((240 + 256 * (first - 241) + usize::from(*b.get(1)?), 2)),
        249 => Some((
            2288 + 256 * usize::from(*b.get(1)?) + usize::from(*b.get(2)?),
            3,
        )),
        _ => None,
    }
}

/// The field numbers of a protobuf message's top level, in order, when
/// every field is a length-delimited one (as in both records).
fn top_level_fields(mut b: &[u8]) -> Option<Vec<u64>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut fields = Vec::new();
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        if tag & 7 != 2 {
            return None;
        }
        let len = usize::try_from(varint(&mut b)?).ok()?;
        b = b.get(len..)?;
        fields.push(tag >> 3);
    }
    Some(fields)
}

/// Starts strace on node `i`, returning once it traces.
fn trace(cluster: &Cluster, i: usize, trace_path: &Path) -> std::process::Child {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "this test needs strace (Debian: apt-get install strace; scripts/test.sh installs it)"
    );
    let pid = cluster.nodes[i].pid().expect("the node runs");
    let mut tracer = Command::new("strace")
        .args(["-f", "-yy", "-s", "65536", "-o"])
        .arg(trace_path)
        .args([
            "-e",
            "trace=pwrite64,write,writev,sendmsg,sendto,fdatasync,fsync,sync_file_range",
            "-p",
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start strace");
    // strace says "Process N attached" on stderr once it traces.
    let stderr = tracer.stderr.take().expect("piped");
    let (attached, wait_attached) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut told = false;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if !told && line.contains("attached") {
                let _ = attached.send(());
                told = true;
            }
        }
    });
    wait_attached
        .recv_timeout(Duration::from_secs(30))
        .expect("strace never attached to the node");
    tracer
}

/// Stops strace and reads what it wrote.
fn stop(mut tracer: std::process::Child, trace_path: &Path) -> String {
    let _ = Command::new("kill")
        .args(["-INT", &tracer.id().to_string()])
        .status();
    let _ = tracer.wait();
    std::fs::read_to_string(trace_path).expect("trace")
}

/// The first (write, send) pair of a failed [`check_order`], shown.
fn explain(trace: &str, (w, send): (usize, usize)) -> String {
    let lines: Vec<&str> = trace.lines().collect();
    format!(
        "a peer send (trace line {}) left before the record written at line {} was fdatasynced:\n{}",
        send + 1,
        w + 1,
        lines[w..=send.min(w + 40)]
            .iter()
            .map(|l| &l[..l.len().min(200)])
            .collect::<Vec<_>>()
            .join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_log_entry_is_fdatasynced_before_any_peer_send() {
    const POSTS: usize = 8;
    const SLACK: usize = 2;
    let cluster = Cluster::start(Options::single_dc(3)).await;
    let mut admin = cluster.admin(0).await;
    admin.create_chat(ROOM).await.expect("create");
    let alice = test_keys::identity(0);
    admin
        .add_user(ROOM, &alice.handle().to_string(), None)
        .await
        .expect("add");
    let room = saferchat_consensus::RoomId::new(ROOM).unwrap();
    let mut session = saferchat_client::session::Session::join(
        &cluster.server(0),
        &room,
        std::sync::Arc::new(alice),
        &saferchat_client::session::JoinOptions::default(),
    )
    .await
    .expect("join");

    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("node2.strace");
    let tracer = trace(&cluster, 1, &trace_path);
    // A post is acknowledged once a quorum has it: the leader and either
    // follower. When the other follower answered first, node 2's answer
    // for the last posts may still be on its way when tracing stops, so a
    // few more posts are made than the check needs.
    for n in 0..POSTS + SLACK {
        let seq = session
            .post(format!("post {n}").as_bytes())
            .await
            .expect("post");
        loop {
            match tokio::time::timeout(Duration::from_secs(60), session.next()).await {
                Ok(Ok(Some(saferchat_client::session::Event::Accepted { seq: s, .. })))
                    if s == seq =>
                {
                    break;
                }
                Ok(Ok(Some(_))) => {}
                other => panic!("no acknowledgement for post {n}: {other:?}"),
            }
        }
    }
    let trace = stop(tracer, &trace_path);
    let log_dir = cluster.nodes[1].data_dir.join("partition-log");
    let events = parse(
        &trace,
        &format!("{}/partition-log-", log_dir.display()),
        &cluster.outgoing_peer_ports(1),
    );
    let writes = events
        .iter()
        .filter(|(_, e)| *e == Event::VoteWrite)
        .count();
    assert!(
        writes >= POSTS,
        "expected an entry write per post on node 2, saw {writes} in {} trace lines",
        trace.lines().count()
    );
    let checked = check_order(&events).unwrap_or_else(|pair| panic!("{}", explain(&trace, pair)));
    assert!(
        checked >= POSTS,
        "only {checked} entry writes were followed by a peer send"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_is_fdatasynced_before_any_peer_send() {
    let cluster = Cluster::start(Options::single_dc(3)).await;
    let mut admin = cluster.admin(0).await;
    admin.create_chat(ROOM).await.expect("create");

    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("node2.strace");
    let tracer = trace(&cluster, 1, &trace_path);
    for n in 0..CHANGES {
        let handle = test_keys::identity(n).handle().to_string();
        admin.add_user(ROOM, &handle, None).await.expect("add");
    }

    let trace = stop(tracer, &trace_path);
    let db_file = cluster.nodes[1].data_dir.join("db").join("db");
    let events = parse(
        &trace,
        &format!("{}>", db_file.display()),
        &cluster.outgoing_peer_ports(1),
    );
    let writes: Vec<usize> = events
        .iter()
        .filter(|(_, e)| *e == Event::VoteWrite)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        writes.len() >= CHANGES,
        "expected a record write per change, saw {} in {} trace lines",
        writes.len(),
        trace.lines().count()
    );
    assert!(
        events.iter().any(|(_, e)| *e == Event::PeerSend),
        "saw no send to a peer"
    );
    let checked = check_order(&events).unwrap_or_else(|pair| {
        panic!(
            "{} (sled's flush alone is sync_file_range)",
            explain(&trace, pair)
        )
    });
    // Node 2 voted on every change; each vote was followed by a send.
    assert!(
        checked >= CHANGES,
        "only {checked} record writes were followed by a peer send"
    );
}

/// For every record write followed by sends to peers (before the next
/// record write), an fdatasync of the file must come after the write and
/// before at least one of those sends: the one that carries the vote.
/// Sends that all come before the sync mean the vote left first. (A send
/// before the sync may be an older message a sender task was still
/// flushing: it is allowed as long as one send follows the sync.) A write
/// with no send after it (the trace ended first) says nothing. Returns how many writes were judged,
/// or the first (write, send) pair that shows a vote leaving unsynced.
fn check_order(events: &[(usize, Event)]) -> Result<usize, (usize, usize)> {
    let writes: Vec<usize> = events
        .iter()
        .filter(|(_, e)| *e == Event::VoteWrite)
        .map(|(n, _)| *n)
        .collect();
    let mut checked = 0;
    for (k, w) in writes.iter().enumerate() {
        let until = writes.get(k + 1).copied().unwrap_or(usize::MAX);
        let sends: Vec<usize> = events
            .iter()
            .filter(|(n, e)| *n > *w && *n < until && *e == Event::PeerSend)
            .map(|(n, _)| *n)
            .collect();
        let Some(first_send) = sends.first().copied() else {
            continue;
        };
        let synced = events
            .iter()
            .find(|(n, e)| *n > *w && *e == Event::Synced)
            .map(|(n, _)| *n);
        match synced {
            Some(sync) if sends.iter().any(|s| *s > sync) => checked += 1,
            _ => return Err((*w, first_send)),
        }
    }
    Ok(checked)
}

#[test]
fn the_parser_reads_strace_lines() {
    let db = "/d/node2/db/db";
    let trace = format!(
        "10 pwrite64(12<{db}>, \"..{ROOM}..\", 300, 0) = 300\n\
         11 writev(9<TCP:[127.0.0.1:5000->127.0.0.1:7001]>, [..], 2) = 90\n\
         10 fdatasync(12<{db}> <unfinished ...>\n\
         11 write(9<TCP:[127.0.0.1:5000->127.0.0.1:7001]>, \"..\", 30) = 30\n\
         10 <... fdatasync resumed>) = 0\n\
         10 write(2<pipe:[1]>, \"log\", 3) = 3\n"
    );
    let events = parse(&trace, &format!("{db}>"), &[7001]);
    assert_eq!(
        events,
        vec![
            (0, Event::VoteWrite),
            (1, Event::PeerSend),
            (3, Event::PeerSend),
            (4, Event::Synced),
        ]
    );
    assert!(Path::new(db).is_absolute());
    // Both sends after the write left before its sync (line 5).
    assert_eq!(check_order(&events), Err((0, 1)));
    let in_order = [
        (0, Event::VoteWrite),
        (1, Event::PeerSend),
        (2, Event::Synced),
        (3, Event::PeerSend),
        (4, Event::VoteWrite),
    ];
    assert_eq!(
        check_order(&in_order),
        Ok(1),
        "an older send before the sync is fine when one follows it; a trailing write is not judged"
    );
    let rewritten = format!(
        "10 pwrite64(12<{db}>, \"..{ROOM}..\", 300, 0) = 300\n\
         10 fdatasync(12<{db}>) = 0\n\
         10 pwrite64(12<{db}>, \"..{ROOM}..\", 300, 300) = 300\n\
         11 writev(9<TCP:[127.0.0.1:5000->127.0.0.1:7001]>, [..], 2) = 90\n\
         10 pwrite64(12<{db}>, \"..{ROOM}.!\", 300, 600) = 300\n\
         10 pwrite64(12<{db}>, \"..{ROOM}.!\", 300, 900) = 300\n"
    );
    assert_eq!(
        parse(&rewritten, &format!("{db}>"), &[7001]),
        vec![
            (0, Event::VoteWrite),
            (1, Event::Synced),
            (3, Event::PeerSend),
            (4, Event::VoteWrite),
            (5, Event::VoteWrite),
        ],
        "a record written again after a sync made it durable is no new vote; one not yet synced is"
    );
    let never_synced = [(0, Event::VoteWrite), (1, Event::PeerSend)];
    assert_eq!(check_order(&never_synced), Err((0, 1)));
}

#[test]
fn only_acceptor_records_count_as_votes_in_sleds_log() {
    let db = "/d/node2/db/db>";
    // A pwrite64 of sled's log carrying the room's key with each value.
    let write = |values: &[&str]| {
        let records: String = values.iter().map(|v| format!("\\0\\22{ROOM}{v}")).collect();
        format!("pwrite64(13</d/node2/db/db>, \"{records}\", 40, 0) = 40")
    };
    // CommittedRecord { ballot, state }: learning a commit sends nothing.
    let committed = "\\10\\n\\2\\10\\5\\22\\2\\10\\1";
    // AcceptorRecord { promised, accepted_ballot, accepted_value }.
    let accepted = "\\f\\n\\2\\10\\6\\22\\2\\10\\5\\32\\2\\10\\1";
    // AcceptorRecord { promised }: a promise with nothing accepted.
    let promised = "\\4\\n\\2\\10\\6";
    assert!(!carries_a_vote(&write(&[committed]), db));
    assert!(carries_a_vote(&write(&[accepted]), db));
    assert!(carries_a_vote(&write(&[promised]), db));
    assert!(
        carries_a_vote(&write(&[committed, accepted]), db),
        "one write of both records carries the vote"
    );
    assert!(
        carries_a_vote(&write(&["\\377"]), db),
        "a record it cannot read is judged"
    );
    assert_eq!(unescape("\\0\\22a\\\"\\\\\\3777"), b"\0\x12a\"\\\xff7");
    assert_eq!(sled_varint(&[241, 29]), Some((269, 2)));
}
