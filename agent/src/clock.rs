//! Clocks reported to the host.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time, nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Time since the guest kernel booted (CLOCK_BOOTTIME), in nanoseconds.
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        })
        .unwrap_or(0)
}

/// Clocks further apart than this are corrected.
const MAX_SKEW_NS: u64 = 50_000_000;

/// Sets the wall clock to `host_ns` if it is off by more than [`MAX_SKEW_NS`]; returns whether
/// it was set.
pub fn sync_to(host_ns: u64) -> std::io::Result<bool> {
    if host_ns == 0 || unix_ns().abs_diff(host_ns) <= MAX_SKEW_NS {
        return Ok(false);
    }
    let secs = i64::try_from(host_ns / 1_000_000_000).map_err(std::io::Error::other)?;
    let nanos = i64::try_from(host_ns % 1_000_000_000).map_err(std::io::Error::other)?;
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_advance() {
        assert!(unix_ns() > 1_600_000_000_000_000_000);
        let a = boottime_ns();
        assert!(boottime_ns() >= a);
    }

    #[test]
    fn a_close_or_missing_host_time_changes_nothing() {
        assert!(!sync_to(0).expect("no time"));
        assert!(!sync_to(unix_ns()).expect("same time"));
    }
}
