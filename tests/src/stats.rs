//! Percentiles and summaries: one definition for every report (the tests,
//! `saferchat-bench`, `clusterbench`, `storebench`), the one the peers'
//! benchmark harness uses (nearest rank at round-half-even of
//! q/100 × (n − 1)), so saferchat's numbers compare directly with
//! ejabberd's, prosody's and Synapse's measured beside them.
//!
//! Exact values rather than an HDR histogram: the runs keep at most a few
//! million samples, so sorting them costs less than a second, and an HDR
//! histogram's bucketing (a relative error per value) is exactly what
//! would keep the numbers from comparing with the peers'.

/// How far an open-loop generator fell behind its schedule (coordinated
/// omission made visible): latency counts from when a post was due, and
/// this counts the posts that left more than [`Lateness::LATE`] after
/// that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lateness {
    /// Posts sent late.
    pub late: u64,
    /// The longest lag.
    pub max: std::time::Duration,
}

impl Lateness {
    /// A post sent this long after it was due counts as late.
    pub const LATE: std::time::Duration = std::time::Duration::from_millis(5);

    /// Records a post due at `due` and sent at `sent`.
    pub fn record(&mut self, due: std::time::Instant, sent: std::time::Instant) {
        let lag = sent.saturating_duration_since(due);
        if lag > Self::LATE {
            self.late += 1;
        }
        self.max = self.max.max(lag);
    }

    /// The longest lag in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.max.as_secs_f64() * 1e3
    }
}

/// Latencies of one phase of a benchmark: how many, p50, p99 and the
/// largest, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    /// Samples.
    pub posts: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// The summary of `ms` (any order).
    pub fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        Latency {
            posts: ms.len(),
            p50_ms: percentile(&ms, 50.0).unwrap_or(0.0),
            p99_ms: percentile(&ms, 99.0).unwrap_or(0.0),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// Nearest-rank percentile of sorted `xs`: the element at
/// round(q/100 × (n−1)).
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let k = ((q / 100.0) * (n as f64 - 1.0)).round_ties_even() as usize;
    Some(sorted[k.min(n - 1)])
}

/// Median of unsorted values (mean of the middle two for an even count,
/// like Python's `statistics.median`).
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median, minimum and maximum.
pub fn spread(xs: &[f64]) -> Option<(f64, f64, f64)> {
    let m = median(xs)?;
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((m, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_the_peer_harness() {
        let xs: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&xs, 50.0), Some(51)); // round-half-even(49.5) = 50 → 51
        assert_eq!(percentile(&xs, 99.0), Some(99)); // round(98.01) = 98 → 99
        assert_eq!(percentile::<u64>(&[], 50.0), None);
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), Some(2.5));
        assert_eq!(spread(&[2.0, 1.0, 3.0]), Some((2.0, 1.0, 3.0)));
    }

    #[test]
    fn only_posts_beyond_the_late_bound_count_as_late() {
        use std::time::{Duration, Instant};
        let due = Instant::now();
        let mut l = Lateness::default();
        l.record(due, due + Lateness::LATE);
        l.record(due + Duration::from_millis(3), due);
        assert_eq!(l.late, 0, "at the bound, or early, is on time");
        l.record(due, due + Duration::from_millis(12));
        assert_eq!(l.late, 1);
        assert_eq!(l.max, Duration::from_millis(12));
        assert!((l.max_ms() - 12.0).abs() < 1e-9);
    }
}
