//! What a room actor may read without asking anyone: the newest committed
//! membership this node knows, and until when reading it locally is
//! linearizable.

use std::sync::Arc;

use saferchat_consensus::{Millis, RoomState};

/// One room's membership as seen by this node, republished by the
/// membership driver after every input that touches the room — and before
/// any message caused by that input leaves the node, so a lease holder's
/// readers stop using a state before the holder acknowledges a change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The newest committed state known here (may be stale).
    pub state: Option<Arc<RoomState>>,
    /// Local reads of `state` are linearizable strictly before this
    /// instant (monotonic clock); `Millis(0)` when they are not at all.
    pub readable_until: Millis,
}

impl View {
    /// The state, if reading it locally is linearizable at `now`.
    pub fn read(&self, now: Millis) -> Option<&Arc<RoomState>> {
        if now < self.readable_until {
            self.state.as_ref()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_strictly_before_its_end() {
        let state = Arc::new(RoomState::default());
        let view = View {
            state: Some(Arc::clone(&state)),
            readable_until: Millis(100),
        };
        assert_eq!(view.read(Millis(0)), Some(&state));
        assert_eq!(view.read(Millis(99)), Some(&state));
        assert_eq!(view.read(Millis(100)), None);
        assert_eq!(view.read(Millis(101)), None);
        assert_eq!(View::default().read(Millis(0)), None, "nothing known");
    }
}
