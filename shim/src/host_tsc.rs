//! The host's TSC rate, for TCG guests' `tsc_early_khz`.
//!
//! Under QEMU's TCG a guest's RDTSC reads the host's TSC, but the guest kernel must still
//! learn the rate: it polls the PIT for it (about 20 ms of emulated polling per boot), and
//! under emulation that polling often misses its windows ("Unable to calibrate against PIT";
//! microvm has no HPET or PM timer to fall back on). The kernel then marks the TSC unstable,
//! calibrates a delay loop instead (another ~90 ms) and keeps time with jiffies. Told the
//! rate on its command line, it does neither.
//!
//! The rate is measured once per host boot (RDTSC against `CLOCK_MONOTONIC_RAW` over 50 ms)
//! and kept in [`CACHE`] with the boot id it belongs to, so a pod pays nothing for it. It is
//! the host's, not any pod's or state dir's: `/run` goes with the boot, the boot id guards a
//! `/run` that does not.
//! A host whose TSC is not invariant (`constant_tsc` and `nonstop_tsc` in /proc/cpuinfo) has
//! no rate to give: its guests calibrate as before.

use std::path::Path;
use std::time::Duration;

/// The host's cache file: `<boot id> <kHz>`.
pub const CACHE: &str = "/run/pangolin-host-tsc-khz";

/// How long one measurement spans.
const SPAN: Duration = Duration::from_millis(50);

/// The host's TSC rate in kHz: cached in `cache` ([`CACHE`]) for this boot, or measured and
/// cached. None where the host's TSC has no fixed rate or cannot be read.
pub fn tsc_khz(cache: &Path) -> Option<u64> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let boot_id = boot_id.trim();
    if let Some(khz) = std::fs::read_to_string(cache)
        .ok()
        .and_then(|text| cached(&text, boot_id))
    {
        return Some(khz);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    if !invariant(&cpuinfo) {
        tracing::debug!("the host's TSC is not invariant: TCG guests calibrate it themselves");
        return None;
    }
    let khz = measure()?;
    // Written whole under another name, then renamed: a reader never sees half a line.
    let mut tmp = cache.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let written = std::fs::write(&tmp, format!("{boot_id} {khz}\n"))
        .and_then(|()| std::fs::rename(&tmp, cache));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, path = %cache.display(), "the host's TSC rate is not cached");
    }
    tracing::debug!(khz, "measured the host's TSC rate");
    Some(khz)
}

/// The rate in a cache file's `text` when it was written in boot `boot_id`.
fn cached(text: &str, boot_id: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    if words.next()? != boot_id {
        return None;
    }
    let khz: u64 = words.next()?.parse().ok()?;
    (words.next().is_none() && plausible(khz)).then_some(khz)
}

/// A TSC rate that a guest may be told: 100 MHz to 10 GHz.
fn plausible(khz: u64) -> bool {
    (100_000..=10_000_000).contains(&khz)
}

/// True when /proc/cpuinfo's first `flags` line has both invariant-TSC flags.
fn invariant(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags")
                .and_then(|r| r.trim_start().strip_prefix(':'))
        })
        .is_some_and(|flags| {
            let has = |f: &str| flags.split_whitespace().any(|w| w == f);
            has("constant_tsc") && has("nonstop_tsc")
        })
}

/// RDTSC against `CLOCK_MONOTONIC_RAW` over [`SPAN`]: kHz, or None off x86_64 or when the
/// clocks disagree beyond [`plausible`].
fn measure() -> Option<u64> {
    let (t0, c0) = paired_read()?;
    std::thread::sleep(SPAN);
    let (t1, c1) = paired_read()?;
    let ns = t1.checked_sub(t0).filter(|&ns| ns > 0)?;
    let cycles = c1.checked_sub(c0)?;
    let khz = u64::try_from(u128::from(cycles) * 1_000_000 / u128::from(ns)).ok()?;
    plausible(khz).then_some(khz)
}

/// A (ns, TSC) pair read as close together as this process manages: of a few tries, the one
/// whose two clock reads around the RDTSC are nearest, the TSC set against their midpoint.
#[cfg(target_arch = "x86_64")]
fn paired_read() -> Option<(u64, u64)> {
    let now = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_RAW)
            .ok()
            .and_then(|t| {
                u64::try_from(t.tv_sec())
                    .ok()?
                    .checked_mul(1_000_000_000)?
                    .checked_add(u64::try_from(t.tv_nsec()).ok()?)
            })
    };
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..5 {
        let before = now()?;
        // SAFETY: RDTSC reads a counter; it has no memory effects or preconditions.
        let tsc = unsafe { std::arch::x86_64::_rdtsc() };
        let after = now()?;
        let width = after.saturating_sub(before);
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, before + width / 2, tsc));
        }
    }
    best.map(|(_, ns, tsc)| (ns, tsc))
}

#[cfg(not(target_arch = "x86_64"))]
fn paired_read() -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_line_counts_only_in_its_own_boot() {
        assert_eq!(cached("abc 2596094\n", "abc"), Some(2_596_094));
        assert_eq!(cached("abc 2596094\n", "def"), None, "another boot");
        assert_eq!(cached("abc 12\n", "abc"), None, "implausible");
        assert_eq!(cached("abc 2596094 x\n", "abc"), None, "trailing words");
        assert_eq!(cached("abc\n", "abc"), None, "no rate");
        assert_eq!(cached("", "abc"), None);
    }

    #[test]
    fn only_a_constant_nonstop_tsc_has_a_rate() {
        let both = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc rdtscp\n";
        assert!(invariant(both));
        assert!(!invariant("flags\t\t: fpu tsc constant_tsc\n"));
        assert!(!invariant(
            "flags\t\t: fpu tsc nonstop_tsc_x constant_tsc\n"
        ));
        assert!(!invariant("processor\t: 0\n"));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn this_hosts_rate_is_measured_and_cached() {
        let dir = crate::test_dir::TestDir::new("host-tsc");
        let cache = dir.path.join("tsc-khz");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
        let first = tsc_khz(&cache);
        if !invariant(&cpuinfo) {
            assert_eq!(first, None);
            return;
        }
        let khz = first.expect("a rate on a host with an invariant TSC");
        let text = std::fs::read_to_string(&cache).expect("cache file");
        assert!(text.ends_with(&format!(" {khz}\n")), "{text}");
        // The second call reads the cache: the same value, not a new measurement.
        assert_eq!(tsc_khz(&cache), Some(khz));
    }
}
