//! A bound on how long one test may hold node processes.
//!
//! Every wait in a test has its own deadline, but a wait somebody forgot
//! to bound (a client call without a timeout, a stuck child) would hold
//! the whole test run until CI kills it, with nothing printed about which
//! test it was. Each [`crate::process::NodeProcess`] therefore arms a
//! [`Watchdog`] for as long as it exists: past the limit it names what was
//! running, SIGKILLs every node process this test binary started, and
//! ends the binary with a failure.
//!
//! The limit is `SAFERCHAT_TEST_LIMIT_S` seconds, 900 unless set: about
//! four times the longest cluster test on a loaded 2-core machine.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// Node processes of this binary that are running.
static RUNNING: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// The limit when `SAFERCHAT_TEST_LIMIT_S` is not set.
pub const LIMIT_DEFAULT: Duration = Duration::from_secs(900);

/// Notes a started node process (killed when a watchdog fires).
pub fn started(pid: u32) {
    RUNNING.lock().expect("lock").insert(pid);
}

/// Notes a node process that was waited for.
pub fn ended(pid: u32) {
    RUNNING.lock().expect("lock").remove(&pid);
}

/// The configured limit.
///
/// # Panics
/// When `SAFERCHAT_TEST_LIMIT_S` is not a number.
pub fn limit() -> Duration {
    std::env::var("SAFERCHAT_TEST_LIMIT_S").map_or(LIMIT_DEFAULT, |s| {
        Duration::from_secs(
            s.parse()
                .expect("SAFERCHAT_TEST_LIMIT_S: a number of seconds"),
        )
    })
}

/// Fires after its limit unless dropped first.
#[derive(Debug)]
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    /// Arms a watchdog for `what` (named in the message when it fires):
    /// past `limit` it kills this binary's node processes and exits.
    pub fn arm(what: String, limit: Duration) -> Watchdog {
        Watchdog::arm_with(limit, move || fire(&what, limit))
    }

    /// Arms a watchdog that runs `on_fire` past `limit`.
    pub fn arm_with(limit: Duration, on_fire: impl FnOnce() + Send + 'static) -> Watchdog {
        let (disarm, armed) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Nothing is ever sent: the channel disconnects when the
            // watchdog is disarmed or dropped.
            let fired = armed.recv_timeout(limit) == Err(RecvTimeoutError::Timeout);
            if fired {
                on_fire();
            }
            fired
        });
        Watchdog {
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }

    /// Disarms it and says whether it had fired.
    pub fn disarm(mut self) -> bool {
        self.disarm.take();
        self.thread
            .take()
            .is_some_and(|t| t.join().expect("watchdog thread"))
    }
}

fn fire(what: &str, limit: Duration) {
    eprintln!(
        "watchdog: {what} was still running after {limit:?} (SAFERCHAT_TEST_LIMIT_S); a wait \
         without a deadline? killing this binary's node processes and failing"
    );
    for pid in RUNNING.lock().expect("lock").iter() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    std::process::exit(101);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watchdog_disarmed_in_time_does_not_fire() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::arm_with(Duration::from_secs(3600), move || tx.send(()).unwrap());
        assert!(!dog.disarm());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_watchdog_past_its_limit_fires() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::arm_with(Duration::from_millis(1), move || tx.send(()).unwrap());
        rx.recv().expect("fired");
        assert!(dog.disarm());
    }
}
