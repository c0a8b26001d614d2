//! What a running sandbox says about itself in its directory, for the node's tools
//! (`pangolin list`, `pangolin console`): `sandbox.json`, written once the VM is ready, and
//! `pod.json`, the containerd shim's view (the CRI pod's name, the containers), rewritten at
//! every container create and delete. Both go with the directory.
//!
//! The debug console's shell reaches the guest through the share: `.debug/busybox` (no
//! container id starts with a dot).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The sandbox's own facts.
pub const INFO_FILE: &str = "sandbox.json";
/// The containerd shim's facts.
pub const POD_FILE: &str = "pod.json";

/// Where the debug console's busybox goes in the share, and so in the guest.
const CONSOLE_SHELL: &str = ".debug/busybox";

/// A ready sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// `builtin` or `qemu`.
    pub hypervisor: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub memory_mib: u32,
    /// When it became ready (milliseconds since the Unix epoch).
    pub ready_unix_ms: u64,
    /// `boot` or `template`.
    pub started_from: String,
    /// The VMM's host pid.
    pub vmm_pid: Option<u32>,
    /// virtiofsd's host pid.
    #[serde(default)]
    pub virtiofsd_pid: Option<u32>,
    /// The host process that owns the sandbox (the containerd shim, or `pangolin run`).
    #[serde(default)]
    pub owner_pid: u32,
    /// Sandbox start to agent ready, in milliseconds.
    #[serde(default)]
    pub boot_ms: u64,
    /// Whether the agent serves the debug console.
    pub debug_console: bool,
}

/// The containerd shim's view of the pod in the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// The CRI pod, `namespace/name`, when the sandbox is a CRI pod's.
    pub pod: Option<String>,
    /// Its containers' ids.
    pub containers: Vec<String>,
}

fn write_json(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let tmp = path.with_extension("json.new");
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(value).map_err(io::Error::other)?,
    )?;
    fs::rename(tmp, path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    // Written by the shim, but bounded like anything read back.
    if bytes.len() > 1 << 20 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Writes `info` into the sandbox directory `workdir`.
pub fn write_info(workdir: &Path, info: &SandboxInfo) -> io::Result<()> {
    write_json(&workdir.join(INFO_FILE), info)
}

/// Writes the shim's `pod` facts into `workdir`.
pub fn write_pod(workdir: &Path, pod: &PodInfo) -> io::Result<()> {
    write_json(&workdir.join(POD_FILE), pod)
}

/// A sandbox directory's facts, if it holds a ready sandbox.
pub fn read(workdir: &Path) -> Option<(SandboxInfo, PodInfo)> {
    let info = read_json(&workdir.join(INFO_FILE))?;
    let pod = read_json(&workdir.join(POD_FILE)).unwrap_or_default();
    Some((info, pod))
}

/// Every ready sandbox under `state_dir`, by id.
pub fn list(state_dir: &Path) -> Vec<(PathBuf, SandboxInfo, PodInfo)> {
    let mut found: Vec<(PathBuf, SandboxInfo, PodInfo)> = fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| read(&e.path()).map(|(i, p)| (e.path(), i, p)))
        .collect();
    found.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    found
}

/// The sandbox directory of `id` (or of the one sandbox whose id starts with it), under
/// `state_dir`.
pub fn find(state_dir: &Path, id: &str) -> Option<(PathBuf, SandboxInfo)> {
    let all = list(state_dir);
    if let Some((dir, info, _)) = all.iter().find(|(_, i, _)| i.id == id) {
        return Some((dir.clone(), info.clone()));
    }
    let mut prefixed = all.into_iter().filter(|(_, i, _)| i.id.starts_with(id));
    match (prefixed.next(), prefixed.next()) {
        (Some((dir, info, _)), None) => Some((dir, info)),
        _ => None,
    }
}

/// The hybrid vsock socket of the sandbox in `workdir` (`CONNECT <port>`).
pub fn vsock_socket(workdir: &Path) -> PathBuf {
    workdir.join(super::boot::VSOCK_UDS)
}

/// Copies the console's `shell` into `share`; its path in the guest.
pub fn install_console_shell(shell: &Path, share: &Path) -> io::Result<String> {
    let dest = share.join(CONSOLE_SHELL);
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(shell, &dest)?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o555))?;
    Ok(format!(
        "{}/{CONSOLE_SHELL}",
        pangolin_protocols::GUEST_SHARED_DIR
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandboxes_are_listed_and_found_by_id_or_a_unique_prefix() {
        let dir = crate::test_dir::TestDir::new("info");
        for id in ["abc123", "abd456"] {
            let w = dir.path.join(id);
            fs::create_dir_all(&w).expect("mkdir");
            let info = SandboxInfo {
                id: id.into(),
                hypervisor: "qemu".into(),
                vcpus: 1,
                memory_mib: 256,
                ready_unix_ms: 1,
                started_from: "boot".into(),
                vmm_pid: Some(7),
                virtiofsd_pid: Some(9),
                owner_pid: 8,
                boot_ms: 500,
                debug_console: false,
            };
            write_info(&w, &info).expect("info");
        }
        write_pod(
            &dir.path.join("abc123"),
            &PodInfo {
                pod: Some("default/web".into()),
                containers: vec!["abc123".into(), "c2".into()],
            },
        )
        .expect("pod");
        fs::create_dir_all(dir.path.join("not-a-sandbox")).expect("mkdir");
        let all = list(&dir.path);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].2.containers.len(), 2);
        assert_eq!(all[1].2, PodInfo::default(), "no pod.json: nothing known");
        assert_eq!(
            find(&dir.path, "abd").map(|f| f.1.id),
            Some("abd456".into())
        );
        assert_eq!(find(&dir.path, "ab"), None, "ambiguous");
        assert_eq!(find(&dir.path, "zz"), None);
    }
}
