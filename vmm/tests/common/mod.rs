//! What the VMM's integration tests share: no test is skipped silently; the guest command line
//! that PVM can run and the control-socket client of the tests that boot a guest.
#![allow(dead_code)] // each test binary uses its part

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// PVM emulates guest kernel code and misses a few instructions; these keep the guest off them.
pub const PVM_SAFE: &str = "earlyprintk=serial noxsave nosmap nosmep \
    clearcpuid=popcnt,cx16,smap,smep,xsave,avx,avx2 int3_selftest=off";

/// Sends one request line on the VMM's control socket `sock`; the whole answer.
pub fn request(sock: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(sock).expect("connect control socket");
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Environment variable listing the tests whose skip is expected on this machine
/// (comma-separated test names); the same variable as the e2e suites'. CI sets none.
pub const EXPECTED_SKIPS_ENV: &str = "PANGOLIN_EXPECTED_SKIPS";

/// Whether `test` may be skipped here for `reason`: true (after saying so) when
/// [`EXPECTED_SKIPS_ENV`] names it; otherwise the test fails with the reason.
///
/// # Panics
/// When the skip is not expected: a test that cannot run must not pass.
pub fn cannot_run(test: &str, reason: &str) -> bool {
    let expected = std::env::var(EXPECTED_SKIPS_ENV).unwrap_or_default();
    if expected.split(',').any(|t| t.trim() == test) {
        eprintln!("SKIPPED (expected by {EXPECTED_SKIPS_ENV}): {test}: {reason}");
        return true;
    }
    panic!(
        "{test} cannot run here: {reason} (set {EXPECTED_SKIPS_ENV}={test} if that is expected)"
    );
}
