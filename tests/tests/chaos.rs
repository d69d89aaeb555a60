//! Seeded fault schedules against a three-node cluster with members
//! posting and listening (`saferchat_tests::chaos`): kills and restarts,
//! pauses, isolated nodes, one-way cuts, slow links and clock drift within
//! the bound, while an admin changes and reads the membership and removes
//! a listening member part-way through. Then every checker runs over what
//! the clients saw and the nodes stored (the removed member got nothing
//! posted after its removal, and no stored envelope since carries its
//! key; no posted text is in a data folder, a log or the capture of every
//! byte between the processes), and the membership operations are checked
//! for linearizability.
//!
//! `SEED=n` replays schedule `n` (and runs only it); `CHAOS_SECONDS`
//! lengthens the fault window (default 20 s).

use std::time::Duration;

use saferchat_tests::chaos::history::{Outcome, check};
use saferchat_tests::chaos::linear::linearizable;
use saferchat_tests::chaos::membership::Room;
use saferchat_tests::chaos::run::{Plan, run};

/// Seeds run when `SEED` is not set.
const SEEDS: [u64; 2] = [1, 2];

fn plan_seeds() -> Vec<u64> {
    match std::env::var("SEED") {
        Ok(seed) => vec![seed.parse().expect("SEED is a number")],
        Err(_) => SEEDS.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_fault_schedules_lose_duplicate_and_reorder_nothing() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .map_or(20, |s| s.parse().expect("CHAOS_SECONDS is a number"));
    for seed in plan_seeds() {
        eprintln!("chaos: SEED={seed} ({seconds} s of faults)");
        let out = run(Plan {
            seed,
            nodes: 3,
            duration: Duration::from_secs(seconds),
        })
        .await;
        let h = &out.history;
        let acked = h
            .posts
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Acked { .. }))
            .count();
        let unknown = h
            .posts
            .iter()
            .filter(|p| p.outcome == Outcome::Unknown)
            .count();
        eprintln!(
            "chaos: SEED={seed}: {} faults, {} posts ({acked} acknowledged, {unknown} unknown), {} stored, {} sessions, store lengths {:?}",
            out.steps.len(),
            h.posts.len(),
            h.fin.len(),
            h.sessions.len(),
            h.stores.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let anomalies = check(h);
        assert!(
            anomalies.is_empty(),
            "SEED={seed}: {anomalies:#?}\nschedule: {:#?}",
            out.steps
        );
        assert!(
            out.unreadable.is_empty(),
            "SEED={seed}: unreadable messages: {:?}",
            out.unreadable
        );
        assert!(
            out.plaintext_in.is_empty(),
            "SEED={seed}: plaintext in {:?}",
            out.plaintext_in
        );
        eprintln!(
            "chaos: SEED={seed}: {} bytes captured between the processes",
            out.wire.bytes
        );
        assert!(
            out.wire.hits == 0,
            "SEED={seed}: {} posted texts on the wire: {:?}",
            out.wire.hits,
            out.wire.excerpts
        );
        assert!(out.wire.bytes > 0, "SEED={seed}: the capture saw nothing");
        assert!(acked > 0, "SEED={seed}: nothing was acknowledged at all");
        let removal = out.removal.as_ref().expect("the member was removed");
        eprintln!(
            "chaos: SEED={seed}: member removed at revision {}",
            removal.revision
        );
        assert!(
            removal.delivered_after.is_empty() && removal.keyed_after == 0,
            "SEED={seed}: the removed member got {:?} and {} stored envelopes carry its key",
            removal.delivered_after,
            removal.keyed_after
        );
        let answered = out.membership.iter().filter(|o| o.ret.is_some()).count();
        eprintln!(
            "chaos: SEED={seed}: {} membership operations ({answered} answered)",
            out.membership.len()
        );
        assert!(
            linearizable(
                &Room {
                    initial: out.initial.clone()
                },
                &out.membership
            ),
            "SEED={seed}: membership operations are not linearizable: {:#?}",
            out.membership
        );
    }
}
