//! The node's side effects beyond files: restarting containerd, asking its version, and the
//! node label.
//!
//! In the DaemonSet the installer runs in a container with the host's PID namespace and the
//! node's root at `/host`: node commands (`systemctl`, `containerd --version`) run in the mount
//! namespace of the node's PID 1, entered between fork and exec, so they are the node's own
//! binaries talking to the node's systemd. On the node itself (`--root /`) they run as they are.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// How containerd is restarted once its configuration changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Not at all (the caller restarts it: a test's private containerd, a package script).
    None,
    /// `systemctl restart containerd`, on the node.
    Systemd,
}

/// A node command failed.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// It could not be run.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{command} failed ({status}): {output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
}

/// A command that runs on the node: in PID 1's mount namespace unless the root is `/`.
fn on_node(root: &Path, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if root != Path::new("/") {
        // SAFETY: between fork and exec only async-signal-safe calls are made: open(2) and
        // setns(2) through nix, which allocate nothing (the path is a static C string).
        unsafe {
            cmd.pre_exec(|| {
                let ns = nix::fcntl::open(
                    c"/proc/1/ns/mnt",
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
                Ok(())
            });
        }
    }
    cmd
}

fn run(mut cmd: Command, shown: &str) -> Result<String, RestartError> {
    let out = cmd.output().map_err(|source| RestartError::Spawn {
        command: shown.into(),
        source,
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(RestartError::Failed {
            command: shown.into(),
            status: out.status.to_string(),
            output: text.trim().into(),
        });
    }
    Ok(text)
}

/// Restarts the node's containerd as `how` says.
pub fn containerd(how: Restart, root: &Path) -> Result<(), RestartError> {
    match how {
        Restart::None => Ok(()),
        Restart::Systemd => {
            let cmd = on_node(root, "systemctl", &["restart", "containerd"]);
            run(cmd, "systemctl restart containerd").map(|_| ())
        }
    }
}

/// The node's `containerd --version`.
pub fn containerd_version(root: &Path) -> Result<String, RestartError> {
    run(
        on_node(root, "containerd", &["--version"]),
        "containerd --version",
    )
}

/// The `kubectl label` arguments that set `label` (`(key, value)`) on `node`, or remove the
/// installer's label when `label` is None.
pub fn label_args(node: &str, label: Option<&(String, String)>) -> Vec<String> {
    let mut args = vec!["label".to_string(), "node".into(), node.into()];
    match label {
        Some((key, value)) => {
            args.push(format!("{key}={value}"));
            args.push("--overwrite".into());
        }
        None => args.push(format!("{}-", crate::install::NODE_LABEL.0)),
    }
    args
}

/// Labels `node` (or removes the label) with `kubectl` (the installer image carries it; in a
/// pod it uses the service account's in-cluster credentials).
pub fn label_node(node: &str, label: Option<&(String, String)>) -> Result<(), RestartError> {
    let args = label_args(node, label);
    let shown = format!("kubectl {}", args.join(" "));
    let mut cmd = Command::new("kubectl");
    cmd.args(&args);
    run(cmd, &shown).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_is_set_with_overwrite_and_removed_by_its_key() {
        let label = ("pangolin.io/runtime".to_string(), "true".to_string());
        assert_eq!(
            label_args("node-1", Some(&label)),
            [
                "label",
                "node",
                "node-1",
                "pangolin.io/runtime=true",
                "--overwrite"
            ]
        );
        assert_eq!(
            label_args("node-1", None),
            ["label", "node", "node-1", "pangolin.io/runtime-"]
        );
    }

    #[test]
    fn a_failing_command_is_named_with_its_output() {
        let err = run(
            on_node(Path::new("/"), "sh", &["-c", "echo nope >&2; exit 4"]),
            "sh -c ...",
        )
        .expect_err("fails");
        let msg = err.to_string();
        assert!(msg.contains("sh -c ...") && msg.contains("nope"), "{msg}");
        let missing = run(
            on_node(Path::new("/"), "/nonexistent/systemctl", &[]),
            "systemctl",
        )
        .expect_err("missing");
        assert!(matches!(missing, RestartError::Spawn { .. }), "{missing}");
    }
}
