//! OCI runtime specs for containers started by `pangolin run` (the containerd shim gets its
//! spec from the bundle instead). The base is oci-spec's default, which mirrors `runc spec`:
//! the usual namespaces, mounts, masked/readonly paths, default capabilities and rlimits.

use oci_spec::runtime::{
    LinuxBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, Process, ProcessBuilder, RootBuilder,
    Spec,
};

/// A spec could not be built from the given options.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// No command.
    #[error("no command given")]
    NoCommand,
    /// An option value is out of range.
    #[error("{field}: {reason}")]
    Invalid {
        /// The option.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// oci-spec refused a value.
    #[error("building the OCI spec")]
    Build(#[from] oci_spec::OciSpecError),
}

/// What `pangolin run` asks for.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// Command and arguments.
    pub args: Vec<String>,
    /// Allocate a terminal.
    pub terminal: bool,
    /// Extra `KEY=VALUE` environment (after PATH and TERM).
    pub env: Vec<String>,
    /// Working directory (default /).
    pub cwd: Option<String>,
    /// Container hostname.
    pub hostname: Option<String>,
    /// cgroup memory limit in MiB.
    pub memory_limit_mib: Option<u32>,
    /// Mount the root filesystem read-only.
    pub readonly: bool,
}

fn process(
    args: &[String],
    terminal: bool,
    env: &[String],
    cwd: Option<&str>,
) -> Result<Process, SpecError> {
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let base = Process::default();
    let mut all_env = base.env().clone().unwrap_or_default();
    all_env.extend(env.iter().cloned());
    let mut p = ProcessBuilder::default()
        .args(args.to_vec())
        .env(all_env)
        .terminal(terminal)
        .cwd(cwd.unwrap_or("/"))
        .build()?;
    // Keep the default user, capabilities, rlimits and no_new_privileges.
    p.set_user(base.user().clone());
    p.set_capabilities(base.capabilities().clone());
    p.set_rlimits(base.rlimits().clone());
    p.set_no_new_privileges(Some(true));
    Ok(p)
}

/// The spec for `pangolin run`.
pub fn container_spec(run: &RunSpec) -> Result<Spec, SpecError> {
    let mut spec = Spec::default();
    spec.set_process(Some(process(
        &run.args,
        run.terminal,
        &run.env,
        run.cwd.as_deref(),
    )?));
    spec.set_hostname(Some(
        run.hostname.clone().unwrap_or_else(|| "pangolin".into()),
    ));
    // The agent replaces root.path with the guest path of the rootfs.
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(run.readonly)
            .build()?,
    ));
    let mut linux = spec
        .linux()
        .clone()
        .unwrap_or(LinuxBuilder::default().build()?);
    if let Some(mib) = run.memory_limit_mib {
        if mib == 0 {
            return Err(SpecError::Invalid {
                field: "--memory-limit",
                reason: "must be at least 1 MiB",
            });
        }
        let bytes = i64::from(mib) * 1024 * 1024;
        let memory = LinuxMemoryBuilder::default()
            .limit(bytes)
            .swap(bytes)
            .build()?;
        linux.set_resources(Some(
            LinuxResourcesBuilder::default().memory(memory).build()?,
        ));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// The OCI process for an exec into a running container.
pub fn exec_process(args: &[String], terminal: bool, env: &[String]) -> Result<Process, SpecError> {
    process(args, terminal, env, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_spec_sets_command_terminal_and_limit() {
        let run = RunSpec {
            args: vec!["echo".into(), "hi".into()],
            terminal: true,
            env: vec!["A=1".into()],
            memory_limit_mib: Some(32),
            ..Default::default()
        };
        let spec = container_spec(&run).expect("spec");
        let p = spec.process().as_ref().expect("process");
        assert_eq!(p.args().as_ref().expect("args"), &run.args);
        assert_eq!(p.terminal(), Some(true));
        assert!(p.env().as_ref().expect("env").iter().any(|e| e == "A=1"));
        assert!(p
            .env()
            .as_ref()
            .expect("env")
            .iter()
            .any(|e| e.starts_with("PATH=")));
        let limit = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone())
            .and_then(|r| *r.memory())
            .and_then(|m| m.limit());
        assert_eq!(limit, Some(32 * 1024 * 1024));
        assert!(spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .is_some_and(|n| !n.is_empty()));
    }

    #[test]
    fn empty_command_and_zero_limit_are_rejected() {
        assert!(matches!(
            container_spec(&RunSpec::default()),
            Err(SpecError::NoCommand)
        ));
        let run = RunSpec {
            args: vec!["true".into()],
            memory_limit_mib: Some(0),
            ..Default::default()
        };
        let err = container_spec(&run).expect_err("zero");
        assert!(err.to_string().contains("--memory-limit"));
    }

    #[test]
    fn spec_round_trips_as_json() {
        let spec = container_spec(&RunSpec {
            args: vec!["true".into()],
            ..Default::default()
        })
        .expect("spec");
        let json = serde_json::to_string(&spec).expect("json");
        let back: Spec = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.hostname().as_deref(), Some("pangolin"));
    }
}
