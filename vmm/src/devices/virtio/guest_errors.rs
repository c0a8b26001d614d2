//! Counting what a guest gets wrong, and logging only some of it.
//!
//! A driver can post malformed chains as fast as it can kick a queue; a `warn!` for each would
//! let the guest flood the VMM's log (and the host's journal). Each device keeps a
//! [`GuestErrors`] counter and logs the first [`LOG_FIRST`] errors, then one in [`LOG_EVERY`],
//! with the running count in the line. Each error also counts in the device's total of the
//! VMM's [`crate::metrics::METRICS`].

use crate::metrics::Counter;

/// Guest-caused errors logged one by one before thinning out.
pub const LOG_FIRST: u64 = 10;
/// After the first [`LOG_FIRST`], one guest-caused error in this many is logged.
pub const LOG_EVERY: u64 = 1000;

/// How many errors a guest caused on one device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestErrors(u64);

impl GuestErrors {
    /// Counts one error, also in the device's process-wide `total` (the VMM's metrics); true
    /// if this one should be logged.
    pub fn record(&mut self, total: &Counter) -> bool {
        total.inc();
        self.0 = self.0.saturating_add(1);
        self.0 <= LOG_FIRST || self.0 % LOG_EVERY == 0
    }

    /// Errors counted so far.
    pub fn count(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_errors_are_logged_then_one_in_log_every() {
        let mut errors = GuestErrors::default();
        let total = Counter::new();
        let mut logged = Vec::new();
        for _ in 0..3 * LOG_EVERY {
            if errors.record(&total) {
                logged.push(errors.count());
            }
        }
        let mut want: Vec<u64> = (1..=LOG_FIRST).collect();
        want.extend([LOG_EVERY, 2 * LOG_EVERY, 3 * LOG_EVERY]);
        assert_eq!(logged, want);
        assert_eq!(errors.count(), 3 * LOG_EVERY);
        assert_eq!(total.get(), 3 * LOG_EVERY);
        let mut saturated = GuestErrors(u64::MAX);
        saturated.record(&total);
        assert_eq!(saturated.count(), u64::MAX);
    }
}
