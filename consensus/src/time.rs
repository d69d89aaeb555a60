//! Local time as an input, and the arithmetic of bounded clock drift.
//!
//! No node trusts another node's clock. Each node reads only its own
//! monotonic clock, passed to the core as [`Millis`]. What the lease logic
//! assumes is that every clock's *rate* stays within `1 ± ρ` of real time,
//! where ρ = `drift_ppm_max / 1_000_000`. The conversions below turn a
//! duration measured on one clock into a duration on another that is
//! guaranteed to cover it.

/// A reading of the local monotonic clock, in milliseconds since an
/// arbitrary origin (e.g. process start). Never compared across nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + ms`, saturating.
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// The bound on clock rate drift that lease safety rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Drift {
    /// ρ in parts per million: every clock advances between `1 - ρ` and
    /// `1 + ρ` times as fast as real time.
    pub ppm_max: u64,
}

impl Drift {
    const PPM: u64 = 1_000_000;

    /// Builds a drift bound.
    ///
    /// # Panics
    /// If ρ is 50% or more: the factors below would be meaningless.
    pub fn new(ppm_max: u64) -> Drift {
        assert!(ppm_max < Self::PPM / 2, "clock drift bound must be < 50%");
        Drift { ppm_max }
    }

    /// A duration on a *later-starting* clock that outlasts `ms` on an
    /// earlier-starting one, whatever the two clocks' rates:
    /// `ceil(ms * (1 + ρ) / (1 - ρ))`.
    ///
    /// Used twice: a grantor keeps its promise for `cover(lease_ms)` after
    /// granting, which outlasts the holder's `lease_ms` counted from the
    /// (earlier) request; a proposer told "`r` ms remain" waits `cover(r)`.
    pub fn cover(self, ms: u64) -> u64 {
        let num = u128::from(ms) * u128::from(Self::PPM + self.ppm_max);
        let den = u128::from(Self::PPM - self.ppm_max);
        let covered = num.div_ceil(den);
        u64::try_from(covered).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_is_identity_without_drift() {
        assert_eq!(Drift::new(0).cover(1234), 1234);
    }

    #[test]
    fn cover_outlasts_worst_case_rates() {
        // A holder clock running fast by ρ measures `ms` in ms/(1+ρ) real
        // time at least; its slowest case is ms/(1-ρ). A grantor clock
        // running fast needs cover(ms)/(1+ρ) >= ms/(1-ρ).
        for ppm in [0, 100, 1_000, 10_000, 100_000, 200_000] {
            let d = Drift::new(ppm);
            for ms in [1, 10, 999, 2_000, 60_000] {
                let rho = ppm as f64 / 1e6;
                let grantor_real = d.cover(ms) as f64 / (1.0 + rho);
                let holder_real = ms as f64 / (1.0 - rho);
                assert!(grantor_real + 1e-9 >= holder_real, "ppm={ppm} ms={ms}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "drift bound")]
    fn absurd_drift_is_refused() {
        let _ = Drift::new(500_000);
    }
}
