//! What an exec'd process inherits from its container, beyond what libcontainer gives it.
//!
//! A process exec'd into a container must be confined exactly as the container's init is, as
//! runc's `setns_init_linux.go` does it. libcontainer 0.7's tenant builder, given an OCI process
//! file, takes the process fields from that file (args, env, cwd, terminal, user, additional
//! gids, umask, capabilities, rlimits, no_new_privileges, oom_score_adj, apparmor, scheduler,
//! I/O priority) but rebuilds the spec's `linux` section with only namespaces, cgroupsPath,
//! personality and time offsets. Audit of what that drops and what it means for an exec:
//!
//! | `linux` field | runc exec | tenant builder | here |
//! |---|---|---|---|
//! | `seccomp` | filter applied | **dropped** | applied by [`ConfinedExecutor`] |
//! | `maskedPaths`, `readonlyPaths`, `rootfsPropagation`, `mountLabel` | set up by init, joined with the mount namespace | same | nothing to do |
//! | `resources`, `devices` (cgroup v2 device program) | joined with the cgroup | same | nothing to do |
//! | `sysctl` | set by init in its namespaces | same | nothing to do |
//! | `uidMappings`/`gidMappings` | user namespace joined | same | nothing to do |
//! | `memoryPolicy` | applied (runc ≥ 1.3) | dropped | the guest has one NUMA node: no effect |
//! | `intelRdt` | joined | dropped | the guest has no RDT |
//!
//! And one ordering quirk: libcontainer installs the filter before dropping capabilities only
//! when `noNewPrivileges` is absent, so an explicit `false` would make the filter load after
//! the capabilities are gone and fail with EACCES. [`prepare`] turns `false` into absent (the
//! same meaning in the runtime spec).
//!
//! Installing a seccomp filter needs either no_new_privs or CAP_SYS_ADMIN. runc, for a process
//! without no_new_privs, installs it while it still holds every capability, then drops them.
//! libcontainer's executor runs after the drop, so [`prepare`] lends CAP_SYS_ADMIN in the
//! effective and permitted sets (never bounding, inheritable or ambient) to a process that
//! would not keep it, and [`ConfinedExecutor`] installs the filter and then takes the lent
//! capability back, right before `execve`. The process that runs has exactly the capability
//! sets of its process spec and the container's filter.

use caps::{CapSet, Capability};
use libcontainer::oci_spec::runtime::{
    Capability as SpecCapability, LinuxSeccomp, LinuxSeccompAction, Process, Spec,
};
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

/// What [`ConfinedExecutor`] must do to the exec'd process before `execve`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// The container's seccomp filter, installed last.
    pub seccomp: Option<LinuxSeccomp>,
    /// CAP_SYS_ADMIN was lent to load the filter and is dropped right after.
    pub lent_sys_admin: bool,
}

/// Why an exec cannot be confined as its container.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    /// The container's filter hands syscalls to a seccomp agent: that needs the notify fd sent
    /// to the agent's socket, which only the init path does.
    #[error("the container's seccomp profile uses SCMP_ACT_NOTIFY, which exec does not support")]
    Notify,
}

/// Adjusts `process` (the exec's process spec) so libcontainer can confine it as the container
/// `spec`'s init, and returns what the executor must still apply.
///
/// # Errors
/// [`ConfinementError::Notify`] when the container's filter uses seccomp notification.
pub fn prepare(spec: &Spec, process: &mut Process) -> Result<Confinement, ConfinementError> {
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    let Some(seccomp) = seccomp else {
        return Ok(Confinement::default());
    };
    if uses_notify(&seccomp) {
        return Err(ConfinementError::Notify);
    }
    let lent_sys_admin = process.no_new_privileges() != Some(true) && lend_sys_admin(process);
    Ok(Confinement {
        seccomp: Some(seccomp),
        lent_sys_admin,
    })
}

fn uses_notify(seccomp: &LinuxSeccomp) -> bool {
    seccomp.default_action() == LinuxSeccompAction::ScmpActNotify
        || seccomp.syscalls().as_ref().is_some_and(|rules| {
            rules
                .iter()
                .any(|r| r.action() == LinuxSeccompAction::ScmpActNotify)
        })
}

/// Adds CAP_SYS_ADMIN to the effective and permitted sets unless the process keeps it anyway;
/// true when it was added. A process spec without capabilities keeps all of root's, so it
/// needs no loan.
fn lend_sys_admin(process: &mut Process) -> bool {
    let Some(mut caps) = process.capabilities().clone() else {
        return false;
    };
    let has = |set: &Option<_>| {
        set.as_ref()
            .is_some_and(|s: &std::collections::HashSet<SpecCapability>| {
                s.contains(&SpecCapability::SysAdmin)
            })
    };
    if has(caps.effective()) && has(caps.permitted()) {
        return false;
    }
    let with = |set: &Option<std::collections::HashSet<SpecCapability>>| {
        let mut set = set.clone().unwrap_or_default();
        set.insert(SpecCapability::SysAdmin);
        Some(set)
    };
    let (effective, permitted) = (with(caps.effective()), with(caps.permitted()));
    caps.set_effective(effective).set_permitted(permitted);
    process.set_capabilities(Some(caps));
    true
}

/// Applies `confinement` to the calling process: the seccomp filter, then the lent capability
/// given back. Called by [`ConfinedExecutor`] in the exec'd process right before `execve`.
///
/// # Errors
/// The filter does not load, or the capability cannot be dropped.
pub fn apply(confinement: &Confinement) -> Result<(), ExecutorError> {
    if let Some(seccomp) = &confinement.seccomp {
        let notify = libcontainer::seccomp::initialize_seccomp(seccomp)
            .map_err(|e| ExecutorError::Other(format!("container seccomp filter: {e}")))?;
        if notify.is_some() {
            // `prepare` refused notify actions; a filter that still returned an fd is a bug.
            return Err(ExecutorError::Other(ConfinementError::Notify.to_string()));
        }
    }
    if confinement.lent_sys_admin {
        for set in [CapSet::Effective, CapSet::Permitted] {
            caps::drop(None, set, Capability::CAP_SYS_ADMIN)
                .map_err(|e| ExecutorError::Other(format!("dropping lent CAP_SYS_ADMIN: {e}")))?;
        }
    }
    Ok(())
}

/// libcontainer's default executor (`execvp` of the process args), after [`apply`].
#[derive(Clone)]
pub struct ConfinedExecutor {
    confinement: Confinement,
}

impl ConfinedExecutor {
    /// An executor that applies `confinement` first.
    pub fn new(confinement: Confinement) -> ConfinedExecutor {
        ConfinedExecutor { confinement }
    }
}

impl Executor for ConfinedExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        apply(&self.confinement)?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("spec")
    }

    fn process(json: &str) -> Process {
        serde_json::from_str(json).expect("process")
    }

    const SECCOMP: &str = r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
        "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;

    fn container_with_seccomp() -> Spec {
        spec(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"seccomp":{SECCOMP}}}}}"#
        ))
    }

    fn set(caps: &[SpecCapability]) -> Option<HashSet<SpecCapability>> {
        Some(caps.iter().copied().collect())
    }

    #[test]
    fn the_containers_filter_is_carried_and_sys_admin_lent_without_no_new_privs() {
        let mut p = process(
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"capabilities":{
                "bounding":["CAP_CHOWN"],"effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN"]}}"#,
        );
        let c = prepare(&container_with_seccomp(), &mut p).expect("prepare");
        assert!(c.seccomp.is_some());
        assert!(c.lent_sys_admin);
        let caps = p.capabilities().as_ref().expect("caps");
        let both = set(&[SpecCapability::Chown, SpecCapability::SysAdmin]);
        assert_eq!(caps.effective(), &both);
        assert_eq!(caps.permitted(), &both);
        assert_eq!(
            caps.bounding(),
            &set(&[SpecCapability::Chown]),
            "bounding never grows"
        );
    }

    #[test]
    fn no_loan_with_no_new_privs_or_when_the_process_keeps_sys_admin() {
        let mut nnp = process(
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"noNewPrivileges":true,
                "capabilities":{"effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN"]}}"#,
        );
        let c = prepare(&container_with_seccomp(), &mut nnp).expect("prepare");
        assert!(c.seccomp.is_some() && !c.lent_sys_admin);
        assert_eq!(
            nnp.capabilities()
                .as_ref()
                .and_then(|c| c.effective().clone()),
            set(&[SpecCapability::Chown])
        );

        let mut privileged = process(
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},
                "capabilities":{"effective":["CAP_SYS_ADMIN"],"permitted":["CAP_SYS_ADMIN"]}}"#,
        );
        let c = prepare(&container_with_seccomp(), &mut privileged).expect("prepare");
        assert!(!c.lent_sys_admin);

        // No capabilities in the spec: libcontainer leaves root's, SYS_ADMIN included.
        let mut bare = process(r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}"#);
        let c = prepare(&container_with_seccomp(), &mut bare).expect("prepare");
        assert!(!c.lent_sys_admin && bare.capabilities().is_none());
    }

    #[test]
    fn explicit_no_new_privs_false_becomes_absent_and_no_filter_means_nothing_to_do() {
        let mut p = process(
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"noNewPrivileges":false}"#,
        );
        let c = prepare(&spec(r#"{"ociVersion":"1.0.2"}"#), &mut p).expect("prepare");
        assert_eq!(c, Confinement::default());
        assert_eq!(p.no_new_privileges(), None);
    }

    #[test]
    fn a_notify_filter_is_refused() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"seccomp":{"defaultAction":"SCMP_ACT_ALLOW",
                "listenerPath":"/run/agent.sock",
                "syscalls":[{"names":["mount"],"action":"SCMP_ACT_NOTIFY"}]}}}"#,
        );
        let mut p = process(r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}"#);
        let err = prepare(&s, &mut p).expect_err("notify");
        assert!(err.to_string().contains("SCMP_ACT_NOTIFY"), "{err}");
    }

    /// Env var that makes [`apply_confines_the_calling_process`] the confined child.
    const CHILD: &str = "PANGOLIN_CONFINEMENT_CHILD";

    /// Re-runs this test binary for the one test below with [`CHILD`] set; the child applies a
    /// confinement to itself (a fresh single-threaded-enough process: no fork of the harness).
    #[test]
    fn apply_confines_the_calling_process() {
        if std::env::var_os(CHILD).is_some() {
            child_body();
            return;
        }
        if !nix::unistd::Uid::effective().is_root() {
            // Lending a capability needs one to lend; the agent runs as root in the guest.
            panic!("this test needs root (the agent's helper is root in the guest)");
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "confinement::tests::apply_confines_the_calling_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .expect("run child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{stderr}"
        );
    }

    fn child_body() {
        // What libcontainer leaves a non-no_new_privs exec with: CHOWN plus the lent SYS_ADMIN.
        let keep: caps::CapsHashSet = [Capability::CAP_CHOWN, Capability::CAP_SYS_ADMIN]
            .into_iter()
            .collect();
        caps::set(None, CapSet::Effective, &keep).expect("effective");
        caps::set(None, CapSet::Permitted, &keep).expect("permitted");
        let c = prepare(&container_with_seccomp(), &mut {
            process(
                r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"capabilities":{
                "effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN"]}}"#,
            )
        })
        .expect("prepare");
        apply(&c).expect("apply");
        // Seccomp and capabilities are per thread; libtest runs this on its own thread.
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        assert!(status.contains("Seccomp:\t2"), "{status}");
        assert!(status.contains("NoNewPrivs:\t0"), "{status}");
        let eff = caps::read(None, CapSet::Effective).expect("read");
        let perm = caps::read(None, CapSet::Permitted).expect("read");
        let chown: caps::CapsHashSet = [Capability::CAP_CHOWN].into_iter().collect();
        assert_eq!(eff, chown, "lent SYS_ADMIN given back");
        assert_eq!(perm, chown);
        let dir = std::env::temp_dir().join(format!("confined-{}", std::process::id()));
        let err = std::fs::create_dir(&dir).expect_err("mkdir is filtered");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
}
