//! What the partition-log simulations (`partition_log.rs`,
//! `partition_move.rs`) learn from every release: each node releases its
//! slots in order, no slot is released with two values (Agreement), and
//! no acknowledged post is acknowledged in two slots (AckedOnce).

use std::collections::BTreeMap;

use saferchat_consensus::NodeId;
use saferchat_consensus::partition_log::{Committed, Slot, Value};

/// Every slot released anywhere, and every acknowledged post.
#[derive(Default)]
pub struct Ledger {
    /// Each released slot's value, as first released.
    pub chosen: BTreeMap<u64, Value<u32>>,
    /// Posts a leader acknowledged: slot by post.
    pub acked: BTreeMap<u32, u64>,
}

impl Ledger {
    /// Records what `node` released after `released` (moved along), as a
    /// leader (`leading`: it acknowledges the posts) or a follower.
    pub fn release(
        &mut self,
        node: NodeId,
        leading: bool,
        released: &mut Slot,
        committed: Vec<Committed<u32>>,
    ) -> Result<(), String> {
        for c in committed {
            if c.slot != released.next() {
                return Err(format!("{node} released {} after {released}", c.slot));
            }
            *released = c.slot;
            match self.chosen.get(&c.slot.0) {
                Some(v) if *v != c.value => {
                    return Err(format!(
                        "Agreement: {} released as {v:?} and as {:?} (by {node})",
                        c.slot, c.value
                    ));
                }
                _ => {
                    self.chosen.insert(c.slot.0, c.value.clone());
                }
            }
            if let (true, Value::Post(p)) = (leading, &c.value)
                && let Some(other) = self.acked.insert(*p, c.slot.0)
                && other != c.slot.0
            {
                return Err(format!("AckedOnce: post {p} in #{other} and {}", c.slot));
            }
        }
        Ok(())
    }
}

/// The first seed of a run: `SEED` from the environment, else `default`.
pub fn seed_base(default: u64) -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
