//! A small builder over `seccompiler`'s rule map, so the allow-lists read as a list of calls
//! with their conditions.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// Syscall number → the rules under which it is allowed (an empty list: always).
#[derive(Debug, Default)]
pub struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    /// Allows `nr` with any arguments.
    pub fn allow(&mut self, nr: i64) -> &mut Self {
        self.0.entry(nr).or_default();
        self
    }

    /// Allows `nr` when argument `arg` (its low 32 bits: every argument ruled on is an int or a flag word) equals one of `values`.
    ///
    /// # Errors
    /// A condition seccompiler cannot express.
    pub fn allow_arg_in(
        &mut self,
        nr: i64,
        arg: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for &v in values {
            let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
            self.push(nr, SeccompRule::new(vec![cond])?);
        }
        Ok(self)
    }

    /// Allows `nr` when the bits of `mask` in argument `arg` are all clear.
    ///
    /// # Errors
    /// A condition seccompiler cannot express.
    pub fn allow_arg_without(
        &mut self,
        nr: i64,
        arg: u8,
        mask: u64,
    ) -> Result<&mut Self, BackendError> {
        let cond = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?;
        self.push(nr, SeccompRule::new(vec![cond])?);
        Ok(self)
    }

    fn push(&mut self, nr: i64, rule: SeccompRule) {
        self.0.entry(nr).or_default().push(rule);
    }

    /// Whether `nr` is on the list (with or without conditions).
    pub fn contains(&self, nr: i64) -> bool {
        self.0.contains_key(&nr)
    }

    /// The map seccompiler compiles.
    pub fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }
}

/// `u64` of a non-negative libc constant (the kernel reads arguments as unsigned).
pub fn arg(v: impl Into<i64>) -> u64 {
    u64::from_ne_bytes(v.into().to_ne_bytes())
}

/// What any Rust thread of this process needs, whatever it does.
///
/// # Errors
/// A condition seccompiler cannot express (a bug here).
pub fn common(r: &mut Rules) -> Result<(), BackendError> {
    // The allocator: glibc's per-thread arenas grow and shrink with these. Never executable.
    let exec = arg(libc::PROT_EXEC);
    r.allow_arg_without(libc::SYS_mmap, 2, exec)?;
    r.allow_arg_without(libc::SYS_mprotect, 2, exec)?;
    r.allow(libc::SYS_munmap);
    r.allow(libc::SYS_mremap);
    r.allow(libc::SYS_madvise);
    r.allow(libc::SYS_brk);
    // glibc blocks signals around pthread_kill and thread exit.
    r.allow(libc::SYS_rt_sigprocmask);
    // std's HashMap seeds (once per thread), and the clocks when the host's clocksource has no
    // vDSO fast path (log timestamps, Instant).
    r.allow(libc::SYS_getrandom);
    r.allow(libc::SYS_clock_gettime);
    r.allow(libc::SYS_gettimeofday);
    // Spinning locks back off with a yield.
    r.allow(libc::SYS_sched_yield);
    Ok(())
}
