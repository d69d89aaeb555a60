//! Time, injected: the node reads clocks only through [`Clock`], so tests
//! can run the node at a chosen instant (e.g. across a month boundary).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use saferchat_consensus::Millis;

/// The two clocks a node needs.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Monotonic milliseconds since an arbitrary origin: consensus and lease
    /// time. Never goes backwards.
    fn monotonic(&self) -> Millis;
    /// Wall-clock Unix milliseconds: message timestamps and ids.
    fn unix_ms(&self) -> i64;
}

/// The machine's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Arc<SystemClock> {
        Arc::new(SystemClock {
            origin: Instant::now(),
        })
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> Millis {
        Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn unix_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// The system's monotonic clock with a wall clock shifted by a settable
/// offset: a node "living" at another date, for tests.
#[derive(Debug)]
pub struct ShiftedClock {
    system: SystemClock,
    offset_ms: AtomicI64,
}

impl ShiftedClock {
    /// A clock whose wall time currently reads `unix_ms`.
    pub fn at(unix_ms: i64) -> Arc<ShiftedClock> {
        let system = SystemClock {
            origin: Instant::now(),
        };
        let offset = unix_ms - system.unix_ms();
        Arc::new(ShiftedClock {
            system,
            offset_ms: AtomicI64::new(offset),
        })
    }

    /// Moves the wall clock to read `unix_ms` now.
    pub fn set(&self, unix_ms: i64) {
        self.offset_ms
            .store(unix_ms - self.system.unix_ms(), Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn monotonic(&self) -> Millis {
        self.system.monotonic()
    }

    fn unix_ms(&self) -> i64 {
        self.system.unix_ms() + self.offset_ms.load(Ordering::SeqCst)
    }
}
