//! What the VMM's integration tests share: no test is skipped silently.

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
