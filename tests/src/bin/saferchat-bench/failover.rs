//! Failover: how long a room cannot take posts when the node serving it
//! dies, measured K times on one cluster.
//!
//! Each trial uses a fresh room (so a partition nobody has used yet: its
//! preferred owner leads it). A member joins through node `trial mod N`,
//! follows the redirect to the room's leader, and posts pre-sealed
//! envelopes at a steady rate. After `before_kill_s` the leader gets
//! SIGKILL. The client notices its stream end, rejoins through a
//! surviving node (retrying every `retry_ms` while that node still sends
//! it to the dead one or has no leader yet), posts again, byte for byte,
//! every envelope it has no acknowledgement for, and keeps posting.
//! Failover time = SIGKILL → the first Accepted from the new leader.
//! Then the tool checks that every post was acknowledged with the room's
//! sequence numbers 1..N, once each, and that History on the new leader
//! holds exactly those N messages; restarts the killed node and waits
//! (bounded) until it has applied the partition as far as the leader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use saferchat_client::admin::Admin;
use saferchat_client::{Identity, JoinOptions, Session};
use saferchat_consensus::RoomId;
use saferchat_proto::chat::{
    self as pb, chat_room_client::ChatRoomClient, client_frame, server_frame,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::cluster::{self, Cluster};
use crate::stats::percentile;

/// Most trials.
pub const TRIALS_MAX: usize = 100;
/// Most envelopes one trial posts.
const POSTS_MAX: usize = 1000;
/// Longest single join attempt.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often catching up is looked at.
const CATCHUP_POLL_MS: u64 = 50;

/// What the failover trials do.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverPlan {
    /// Trials.
    pub trials: usize,
    /// Posts per second of the stream.
    pub rate_per_s: f64,
    /// Posting before the kill, s.
    pub before_kill_s: f64,
    /// Posting after the first post accepted by the new leader, s.
    pub after_s: f64,
    /// Pause between failed rejoin attempts, ms.
    pub retry_ms: u64,
    /// Longest a trial may take from the kill to the last acknowledgement, s.
    pub trial_time_max_s: f64,
    /// Longest wait for the restarted node to catch up, s.
    pub catchup_max_s: f64,
}

/// One trial.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverTrial {
    /// Number.
    pub trial: usize,
    /// Its room.
    pub room: String,
    /// The room's partition (of 256).
    pub partition: u32,
    /// The node the member joined through first (1-based id).
    pub joined_through: u64,
    /// The leader that was killed (1-based id).
    pub killed: u64,
    /// The node the member rejoined through.
    pub rejoined_through: u64,
    /// The new leader.
    pub new_leader: u64,
    /// The new leader's rank for the partition, from its log ("campaigning").
    pub new_leader_rank: Option<u64>,
    /// Posts acknowledged before the kill.
    pub acked_before_kill: usize,
    /// Posts sent but not acknowledged when the leader died.
    pub unacked_at_kill: usize,
    /// SIGKILL → the client's stream ended, ms.
    pub detect_ms: f64,
    /// SIGKILL → joined on the new leader, ms.
    pub rejoin_ms: f64,
    /// Join attempts until then.
    pub join_attempts: u32,
    /// What the failed attempts said (first few).
    pub join_errors: Vec<String>,
    /// **SIGKILL → first Accepted from the new leader**, ms.
    pub failover_ms: f64,
    /// Posts re-sent byte for byte after rejoining.
    pub resent: usize,
    /// Of those, how many got a number at or below the highest one
    /// acknowledged before the kill or were otherwise recovered from the
    /// log (committed before the kill, acknowledgement lost).
    pub resent_recovered: usize,
    /// Posts in the trial.
    pub posts: usize,
    /// Posts acknowledged.
    pub acked: usize,
    /// Whether the acknowledged numbers are exactly 1..posts.
    pub seqs_gapless: bool,
    /// Whether they follow the posting order.
    pub seqs_in_posting_order: bool,
    /// Messages in History on the new leader.
    pub history_messages: usize,
    /// Whether History is exactly the acknowledged posts.
    pub history_ok: bool,
    /// Restarting the killed node until it listens, ms.
    pub restart_ms: f64,
    /// Restart → it applied the partition as far as the leader, ms.
    pub catchup_ms: Option<f64>,
    /// Load average (1 min) at the kill.
    pub loadavg_1m: f64,
    /// What went wrong.
    pub errors: Vec<String>,
}

/// All trials.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverResult {
    /// The plan.
    pub plan: FailoverPlan,
    /// Node command line (node 1).
    pub node_command: String,
    /// The trials.
    pub trials: Vec<FailoverTrial>,
    /// Failover ms: min, median, max.
    pub failover_ms_min_p50_max: Option<(f64, f64, f64)>,
    /// Whether every trial lost and duplicated nothing.
    pub all_clean: bool,
}

fn partition_of(room: &str) -> u32 {
    // ⌊room_hash · 256 / 2^64⌋ = the first byte of SHA-256 over the name
    // (placement/src/partition.rs).
    u32::from(Sha256::digest(room.as_bytes())[0])
}

/// The rank the node logged when it last campaigned for `partition`.
fn campaign_rank(log: &std::path::Path, partition: u32) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"] == "no leader heard from; campaigning"
                && v["fields"]["partition"].as_u64() == Some(u64::from(partition))
        })
        .filter_map(|v| v["fields"]["rank"].as_u64())
        .next_back()
}

struct Stream {
    out: tokio::sync::mpsc::Sender<pb::ClientFrame>,
    inbound: tonic::Streaming<pb::ServerFrame>,
    channel: tonic::transport::Channel,
    token: String,
}

fn open(session: Session) -> Stream {
    let raw = session.into_raw();
    Stream {
        out: raw.out,
        inbound: raw.inbound,
        channel: raw.channel,
        token: raw.token,
    }
}

fn post(seq: usize, envelope: &Bytes) -> pb::ClientFrame {
    pb::ClientFrame {
        frame: Some(client_frame::Frame::Post(pb::Post {
            client_seq: seq as u64 + 1,
            envelope: envelope.clone(),
            ..pb::Post::default()
        })),
    }
}

/// Runs every trial on `cluster` (three or more nodes, metrics on).
///
/// # Errors
/// When a room cannot be set up or a node cannot be restarted.
#[allow(clippy::too_many_lines)]
pub async fn run(
    cluster: &mut Cluster,
    admin_token: &str,
    users: &[Arc<Identity>],
    plan: FailoverPlan,
) -> anyhow::Result<FailoverResult> {
    anyhow::ensure!(cluster.nodes.len() >= 3, "failover needs 3 or more nodes");
    anyhow::ensure!(
        (1..=TRIALS_MAX).contains(&plan.trials),
        "trials: 1..={TRIALS_MAX}"
    );
    anyhow::ensure!(
        plan.rate_per_s > 0.0 && plan.rate_per_s <= 1000.0,
        "rate: (0, 1000]"
    );
    anyhow::ensure!(users.len() >= 2, "two users");
    let n = cluster.nodes.len();
    let addresses = cluster.addresses();
    let alice = Arc::clone(&users[0]);
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let posts = ((plan.rate_per_s * (plan.before_kill_s + plan.after_s + plan.trial_time_max_s))
        .ceil() as usize)
        .min(POSTS_MAX);
    let interval = Duration::from_secs_f64(1.0 / plan.rate_per_s);
    let mut trials = Vec::with_capacity(plan.trials);
    for trial in 0..plan.trials {
        let name = format!("fo{trial:03}-{}", std::process::id());
        let room = RoomId::new(&name)?;
        let mut t = FailoverTrial {
            trial,
            partition: partition_of(&name),
            room: name.clone(),
            ..FailoverTrial::default()
        };
        let via = trial % n;
        let mut admin = Admin::connect(&addresses[via], admin_token).await?;
        admin.create_chat(&name).await?;
        admin
            .add_user(&name, &alice.handle().to_string(), None)
            .await?;
        admin
            .add_user(&name, &users[1].handle().to_string(), None)
            .await?;
        let session = Session::join(&addresses[via], &room, Arc::clone(&alice), &options)
            .await
            .context("joining the failover room")?;
        let leader = cluster
            .index_of(session.address())
            .context("joined an unknown node")?;
        t.joined_through = via as u64 + 1;
        t.killed = leader as u64 + 1;
        let envelopes: Vec<Bytes> = (0..posts)
            .map(|k| session.seal(format!("failover {trial} post {k}").as_bytes()))
            .collect::<Result<_, _>>()?;
        let mut stream = open(session);
        let mut acked: Vec<Option<(u64, Bytes)>> = vec![None; posts];
        let mut acked_count = 0usize;
        let mut posted = 0usize;
        let start = Instant::now();
        let kill_at = start + Duration::from_secs_f64(plan.before_kill_s);
        let mut ticker = tokio::time::interval_at(start.into(), interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut killed: Option<Instant> = None;
        let mut max_seq_before_kill = 0u64;
        let mut first_after: Option<Instant> = None;
        let mut rejoined = false;
        let mut resent_slots: Vec<usize> = Vec::new();
        // Posting and reading, across one rejoin.
        loop {
            let now = Instant::now();
            if let Some(k) = killed
                && now.duration_since(k).as_secs_f64() > plan.trial_time_max_s
            {
                t.errors
                    .push("the trial ran out of time before every post was acknowledged".into());
                break;
            }
            let stop_posting = first_after
                .is_some_and(|f| now.duration_since(f).as_secs_f64() >= plan.after_s)
                || posted >= posts;
            if stop_posting && acked_count >= posted {
                break;
            }
            tokio::select! {
                _ = ticker.tick(), if !stop_posting => {
                    if stream.out.try_send(post(posted, &envelopes[posted])).is_ok() {
                        posted += 1;
                    }
                }
                _ = tokio::time::sleep_until(kill_at.into()), if killed.is_none() => {
                    t.acked_before_kill = acked_count;
                    t.unacked_at_kill = posted - acked_count;
                    t.loadavg_1m = crate::rooms::loadavg_1m();
                    max_seq_before_kill = acked.iter().flatten().map(|(s, _)| *s).max().unwrap_or(0);
                    killed = cluster.kill(leader);
                }
                frame = stream.inbound.message() => {
                    let now = Instant::now();
                    match frame {
                        Ok(Some(pb::ServerFrame { frame: Some(server_frame::Frame::Result(r)) })) => {
                            let k = usize::try_from(r.client_seq.saturating_sub(1)).unwrap_or(usize::MAX);
                            match r.outcome {
                                Some(pb::post_result::Outcome::Accepted(a)) if k < posted => {
                                    if rejoined {
                                        first_after.get_or_insert(now);
                                    }
                                    match &acked[k] {
                                        Some((seq, id)) if *seq != a.seq || *id != a.id => {
                                            t.errors.push(format!("post {k} acknowledged as #{seq} and as #{}", a.seq));
                                        }
                                        Some(_) => {}
                                        None => {
                                            acked[k] = Some((a.seq, a.id));
                                            acked_count += 1;
                                        }
                                    }
                                }
                                Some(pb::post_result::Outcome::Rejected(r)) => {
                                    t.errors.push(format!("post {k} rejected: {} {}", r.code, r.message));
                                }
                                _ => t.errors.push(format!("an odd result for post {k}")),
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            let Some(k) = killed else {
                                t.errors.push(format!("the session ended before the kill: {frame:?}"));
                                break;
                            };
                            if rejoined {
                                t.errors.push(format!("the session on the new leader ended: {frame:?}"));
                                break;
                            }
                            t.detect_ms = k.elapsed().as_secs_f64() * 1e3;
                            // Rejoin through a surviving node.
                            let survivor = (leader + 1) % n;
                            t.rejoined_through = survivor as u64 + 1;
                            let session = loop {
                                t.join_attempts += 1;
                                let attempt = tokio::time::timeout(
                                    JOIN_TIMEOUT,
                                    Session::join(&addresses[survivor], &room, Arc::clone(&alice), &options),
                                )
                                .await;
                                match attempt {
                                    Ok(Ok(s)) => break Some(s),
                                    Ok(Err(e)) => {
                                        if t.join_errors.len() < 3 {
                                            t.join_errors.push(e.to_string());
                                        }
                                    }
                                    Err(_) => {
                                        if t.join_errors.len() < 3 {
                                            t.join_errors.push("join timed out".into());
                                        }
                                    }
                                }
                                if k.elapsed().as_secs_f64() > plan.trial_time_max_s {
                                    break None;
                                }
                                tokio::time::sleep(Duration::from_millis(plan.retry_ms)).await;
                            };
                            let Some(session) = session else {
                                t.errors.push("could not rejoin in time".into());
                                break;
                            };
                            t.rejoin_ms = k.elapsed().as_secs_f64() * 1e3;
                            let Some(new_leader) = cluster.index_of(session.address()) else {
                                t.errors.push("rejoined an unknown node".into());
                                break;
                            };
                            t.new_leader = new_leader as u64 + 1;
                            if new_leader == leader {
                                t.errors.push("rejoined the killed node".into());
                                break;
                            }
                            stream = open(session);
                            rejoined = true;
                            for (slot, envelope) in envelopes.iter().enumerate().take(posted) {
                                if acked[slot].is_none() {
                                    resent_slots.push(slot);
                                    if stream.out.send(post(slot, envelope)).await.is_err() {
                                        t.errors.push("the new session closed while re-sending".into());
                                        break;
                                    }
                                }
                            }
                            t.resent = resent_slots.len();
                        }
                    }
                }
            }
        }
        let Some(killed_at) = killed else {
            anyhow::bail!("trial {trial}: the leader was never killed");
        };
        t.failover_ms = first_after.map_or(f64::NAN, |f| (f - killed_at).as_secs_f64() * 1e3);
        t.posts = posted;
        t.acked = acked_count;
        let seqs: Vec<u64> = acked
            .iter()
            .take(posted)
            .flatten()
            .map(|(s, _)| *s)
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        t.seqs_gapless = acked_count == posted && sorted == (1..=posted as u64).collect::<Vec<_>>();
        t.seqs_in_posting_order = seqs.windows(2).all(|w| w[0] < w[1]);
        t.resent_recovered = resent_slots
            .iter()
            .filter(|k| {
                acked[**k]
                    .as_ref()
                    .is_some_and(|(s, _)| *s <= max_seq_before_kill)
            })
            .count();
        // History on the new leader: exactly the acknowledged posts.
        if rejoined {
            let mut client = ChatRoomClient::new(stream.channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024);
            let request = pb::HistoryRequest {
                chat: name.clone(),
                session: stream.token.clone(),
                before_id: Bytes::new(),
                after_id: Bytes::new(),
                limit: POSTS_MAX as u32,
                min_seq: 0,
                after_seq: 0,
            };
            match client.history(request).await {
                Ok(pages) => {
                    let mut pages = pages.into_inner();
                    let mut items: BTreeMap<u64, Bytes> = BTreeMap::new();
                    let mut count = 0;
                    while let Ok(Some(page)) = pages.message().await {
                        for i in page.items {
                            count += 1;
                            items.insert(i.seq, i.id);
                        }
                    }
                    t.history_messages = count;
                    let want: BTreeMap<u64, Bytes> = acked.iter().flatten().cloned().collect();
                    t.history_ok = count == items.len() && items == want;
                }
                Err(status) => t.errors.push(format!("History: {status}")),
            }
        }
        drop(stream);
        // Bring the killed node back and let it catch up.
        let restart = Instant::now();
        cluster.restart(leader)?;
        t.restart_ms = restart.elapsed().as_secs_f64() * 1e3;
        let new_leader = usize::try_from(t.new_leader).unwrap_or(0).saturating_sub(1);
        t.new_leader_rank = campaign_rank(&cluster.nodes[new_leader].log, t.partition);
        let series = format!(
            "saferchat_partition_applied_slot{{partition=\"{}\"}}",
            t.partition
        );
        if let (Some(m_leader), Some(m_back)) = (
            cluster.nodes[new_leader].metrics,
            cluster.nodes[leader].metrics,
        ) && rejoined
        {
            loop {
                let want = cluster::scrape_value(m_leader, &series).await;
                let have = cluster::scrape_value(m_back, &series).await;
                if let (Some(w), Some(h)) = (want, have)
                    && w > 0.0
                    && h >= w
                {
                    t.catchup_ms = Some(restart.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                if restart.elapsed().as_secs_f64() > plan.catchup_max_s {
                    t.errors.push(format!(
                        "node {} did not catch up within {} s ({have:?} of {want:?})",
                        leader + 1,
                        plan.catchup_max_s
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(CATCHUP_POLL_MS)).await;
            }
        }
        eprintln!(
            "  failover trial {trial}: room {} (partition {}), killed n{} → n{} (rank {:?}): detect {:.0} ms, rejoined {:.0} ms ({} attempts), first accepted {:.0} ms; {} posts, {} re-sent ({} recovered), numbers gapless {}, history ok {}, caught up {:?} ms, load {:.1}{}",
            t.room,
            t.partition,
            t.killed,
            t.new_leader,
            t.new_leader_rank,
            t.detect_ms,
            t.rejoin_ms,
            t.join_attempts,
            t.failover_ms,
            t.posts,
            t.resent,
            t.resent_recovered,
            t.seqs_gapless,
            t.history_ok,
            t.catchup_ms.map(|c| c.round()),
            t.loadavg_1m,
            if t.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {:?}", t.errors)
            }
        );
        trials.push(t);
    }
    let mut times: Vec<u64> = trials
        .iter()
        .filter(|t| t.failover_ms.is_finite())
        .map(|t| (t.failover_ms * 1e3) as u64)
        .collect();
    times.sort_unstable();
    let ms = |us: u64| us as f64 / 1e3;
    let summary = match (times.first(), percentile(&times, 50.0), times.last()) {
        (Some(lo), Some(mid), Some(hi)) => Some((ms(*lo), ms(mid), ms(*hi))),
        _ => None,
    };
    let all_clean = trials
        .iter()
        .all(|t| t.errors.is_empty() && t.seqs_gapless && t.history_ok);
    Ok(FailoverResult {
        plan,
        node_command: cluster.command.clone(),
        trials,
        failover_ms_min_p50_max: summary,
        all_clean,
    })
}
