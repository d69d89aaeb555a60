//! Time, injected: the node reads clocks only through [`Clock`], so tests
//! can run the node at a chosen instant (e.g. across a month boundary).
//!
//! Lease time is read from `CLOCK_BOOTTIME`, not from `CLOCK_MONOTONIC`
//! (what [`std::time::Instant`] reads): the latter stops while the machine
//! is suspended, so a lease holder suspended past its lease would wake up
//! believing it still valid and read a room whose membership changed
//! meanwhile. `CLOCK_BOOTTIME` counts the suspension like any other
//! elapsed time; it advances at the same rate otherwise, so the drift bound
//! holds for it as for the other.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use saferchat_consensus::Millis;

/// The two clocks a node needs.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Monotonic milliseconds since an arbitrary origin, time spent
    /// suspended included: consensus and lease time. Never goes backwards.
    fn monotonic(&self) -> Millis;
    /// Wall-clock Unix milliseconds: message timestamps and ids.
    fn unix_ms(&self) -> i64;
}

/// The machine's clocks.
#[derive(Debug)]
pub struct SystemClock {
    /// Where lease time comes from: [`boottime_ms`], except in tests.
    source: fn() -> u64,
    /// `source()` when the clock was made.
    origin: u64,
}

impl SystemClock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Arc<SystemClock> {
        Arc::new(SystemClock::starting_now())
    }

    fn starting_now() -> SystemClock {
        SystemClock::reading(boottime_ms)
    }

    /// A clock whose lease time is read from `source`.
    fn reading(source: fn() -> u64) -> SystemClock {
        SystemClock {
            source,
            origin: source(),
        }
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> Millis {
        Millis((self.source)().saturating_sub(self.origin))
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
        let system = SystemClock::starting_now();
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

/// Test builds only (feature `test-clock`): the machine's clocks made to
/// drift or jump, as a control file says, so that chaos tests can break
/// the drift bound the leases rely on.
///
/// The file holds `RATE_PPM OFFSET_MS`: lease time runs at `1 + RATE_PPM /
/// 10⁶` of real time, and is moved forward by `OFFSET_MS` (wall time by the
/// same offset). The offset only grows (a monotonic clock never goes back)
/// and the file is read at most every [`SKEW_READ_EVERY_MS`] of real time.
#[cfg(feature = "test-clock")]
#[derive(Debug)]
pub struct SkewedClock {
    system: SystemClock,
    path: std::path::PathBuf,
    skew: std::sync::Mutex<Skew>,
}

/// How often a [`SkewedClock`] reads its control file.
#[cfg(feature = "test-clock")]
pub const SKEW_READ_EVERY_MS: u64 = 20;

#[cfg(feature = "test-clock")]
#[derive(Debug, Default)]
struct Skew {
    read_at: Option<u64>,
    rate_ppm: i64,
    offset_ms: u64,
    /// Real and skewed time (offset excluded) when the rate last changed.
    base_real: u64,
    base_skewed: u64,
    last: u64,
}

#[cfg(feature = "test-clock")]
impl Skew {
    fn skewed(&self, real: u64) -> u64 {
        let elapsed = i128::from(real - self.base_real);
        let scaled = elapsed * (1_000_000 + i128::from(self.rate_ppm)) / 1_000_000;
        self.base_skewed + u64::try_from(scaled.max(0)).unwrap_or(u64::MAX)
    }
}

#[cfg(feature = "test-clock")]
impl SkewedClock {
    /// A clock controlled by the file at `path` (no file: no skew).
    pub fn new(path: std::path::PathBuf) -> Arc<SkewedClock> {
        Arc::new(SkewedClock {
            system: SystemClock::starting_now(),
            path,
            skew: std::sync::Mutex::new(Skew::default()),
        })
    }

    fn control(&self) -> Option<(i64, u64)> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut parts = text.split_whitespace();
        let rate = parts.next()?.parse::<i64>().ok()?;
        let offset = parts.next()?.parse::<u64>().ok()?;
        (rate > -1_000_000).then_some((rate, offset))
    }

    /// Lease time and the wall-clock offset now.
    fn now(&self) -> (u64, u64) {
        let real = self.system.monotonic().0;
        let mut s = self.skew.lock().expect("clock lock");
        if s.read_at.is_none_or(|at| real >= at + SKEW_READ_EVERY_MS) {
            s.read_at = Some(real);
            if let Some((rate, offset)) = self.control() {
                if rate != s.rate_ppm {
                    s.base_skewed = s.skewed(real);
                    s.base_real = real;
                    s.rate_ppm = rate;
                }
                s.offset_ms = s.offset_ms.max(offset);
            }
        }
        let value = (s.skewed(real) + s.offset_ms).max(s.last);
        s.last = value;
        (value, s.offset_ms)
    }
}

#[cfg(feature = "test-clock")]
impl Clock for SkewedClock {
    fn monotonic(&self) -> Millis {
        Millis(self.now().0)
    }

    fn unix_ms(&self) -> i64 {
        let offset = i64::try_from(self.now().1).unwrap_or(i64::MAX);
        self.system.unix_ms().saturating_add(offset)
    }
}

/// Milliseconds of `CLOCK_BOOTTIME`: time since boot, suspensions included.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn boottime_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000).saturating_add(nanos / 1_000_000)
}

/// Elsewhere (development builds only: the node is deployed on Linux), the
/// monotonic clock std offers, which may stop during a suspension.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use std_monotonic_ms as boottime_ms;

/// See the `boottime_ms` above; compiled only where CLOCK_BOOTTIME is
/// missing.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn std_monotonic_ms() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::membership::View;

    /// A machine's two clocks, moved by hand: boot time counts a
    /// suspension, monotonic time does not.
    static FAKE_BOOTTIME: AtomicU64 = AtomicU64::new(1_000_000);
    static FAKE_MONOTONIC: AtomicU64 = AtomicU64::new(900_000);

    fn fake_boottime() -> u64 {
        FAKE_BOOTTIME.load(Ordering::SeqCst)
    }

    fn fake_monotonic() -> u64 {
        FAKE_MONOTONIC.load(Ordering::SeqCst)
    }

    fn run(ms: u64) {
        FAKE_BOOTTIME.fetch_add(ms, Ordering::SeqCst);
        FAKE_MONOTONIC.fetch_add(ms, Ordering::SeqCst);
    }

    fn suspend(ms: u64) {
        FAKE_BOOTTIME.fetch_add(ms, Ordering::SeqCst);
    }

    /// A holder whose machine sleeps through its lease wakes up without
    /// it on boot time, and would still read on monotonic time: the reason
    /// the node reads boot time.
    #[test]
    fn a_lease_runs_out_while_the_machine_is_suspended() {
        let boot = SystemClock::reading(fake_boottime);
        let monotonic = SystemClock::reading(fake_monotonic);
        run(100);
        let lease_ms = 2_000;
        let on_boot = View {
            state: Some(Arc::default()),
            readable_until: boot.monotonic().plus(lease_ms),
        };
        let on_monotonic = View {
            readable_until: monotonic.monotonic().plus(lease_ms),
            ..on_boot.clone()
        };
        run(500);
        assert!(on_boot.read(boot.monotonic()).is_some());
        assert!(on_monotonic.read(monotonic.monotonic()).is_some());
        suspend(60_000);
        run(1);
        assert!(
            on_boot.read(boot.monotonic()).is_none(),
            "slept through the lease"
        );
        assert!(
            on_monotonic.read(monotonic.monotonic()).is_some(),
            "the clock a suspension stops would still read"
        );
    }

    /// The node's clock reads the kernel's boot time, relative to the
    /// clock's creation.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_node_reads_boottime() {
        let clock = SystemClock::starting_now();
        assert!(std::ptr::fn_addr_eq(
            clock.source,
            boottime_ms as fn() -> u64
        ));
        for _ in 0..1_000 {
            let before = boottime_ms();
            let read = clock.monotonic().0;
            let after = boottime_ms();
            assert!(before - clock.origin <= read && read <= after - clock.origin);
        }
    }

    /// `boottime_ms` is the kernel's time since boot, which `/proc/uptime`
    /// also reports (in seconds, to the hundredth).
    #[cfg(target_os = "linux")]
    #[test]
    fn boottime_is_the_time_since_boot() {
        let uptime_ms = || -> u64 {
            let text = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
            let secs: f64 = text
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .expect("uptime seconds");
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let ms = (secs * 1_000.0) as u64;
            ms
        };
        let before = uptime_ms();
        let read = boottime_ms();
        let after = uptime_ms();
        // /proc/uptime is truncated to 10 ms; a generous margin besides.
        assert!(
            before <= read + 10 && read <= after + 1_000,
            "uptime {before}..{after} ms, boottime_ms {read}"
        );
    }

    /// The wall clock reads the system's, or the date a shifted clock was
    /// moved to (plus the time since).
    #[test]
    fn wall_clocks_read_the_system_time_or_their_shifted_date() {
        let system_now = || {
            i64::try_from(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("after 1970")
                    .as_millis(),
            )
            .expect("fits")
        };
        let margin = 60_000; // a loaded machine may stall between reads
        let before = system_now();
        let read = SystemClock::starting_now().unix_ms();
        assert!(before <= read && read <= system_now());
        let clock = ShiftedClock::at(1_000_000);
        let read = clock.unix_ms();
        assert!((1_000_000..1_000_000 + margin).contains(&read), "{read}");
        clock.set(5_000_000_000);
        let read = clock.unix_ms();
        assert!(
            (5_000_000_000..5_000_000_000 + margin).contains(&read),
            "{read}"
        );
        // Lease time is not shifted: it counts from the clock's creation on
        // boot time. Wait (by reading, bounded) until 5 ms have passed.
        let start = boottime_ms();
        let give_up = start + 60_000;
        while boottime_ms() < start + 5 {
            assert!(boottime_ms() < give_up, "boot time stands still");
            std::hint::spin_loop();
        }
        let lease_time = clock.monotonic().0;
        assert!((5..3_600_000).contains(&lease_time), "{lease_time}");
    }

    #[cfg(feature = "test-clock")]
    #[test]
    fn a_skewed_clock_follows_its_control_file_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        let clock = SkewedClock::new(path.clone());
        let start = clock.monotonic().0;
        std::fs::write(&path, "0 60000").unwrap();
        // The file is read within SKEW_READ_EVERY_MS of real time: wait on
        // that condition, not on a fixed sleep.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while clock.monotonic().0 < start + 60_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the jump never showed"
            );
            std::thread::yield_now();
        }
        let jumped = clock.monotonic().0;
        std::fs::write(&path, "0 0").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < deadline {
            assert!(clock.monotonic().0 >= jumped, "an offset never shrinks");
        }
        assert!(clock.unix_ms() > SystemClock::starting_now().unix_ms() + 59_000);
    }
}
