//! What the host side does for a jailed built-in VMM: it opens every resource the VMM needs
//! (`/dev/kvm`, the boot images, the console log, the control and vsock listeners, the pod's
//! tap queue) and sends them in one `SCM_RIGHTS` message on the VMM's stdin; it hands the
//! sandbox directory (the only directory the jail keeps) and the sockets the VMM connects to
//! (virtiofsd's, the agent's readiness listener) to the jail's uid/gid; and it tells the VMM
//! where the jail's root goes. The VMM then jails itself before building the VM (see
//! `vmm/src/jail.rs`).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use pangolin_vmm_config::{InheritedFds, JailConfig, VmConfig};

use super::{HypervisorError, VmSpec};

/// Who a jailed VMM runs as, and its limits (from configuration.toml's `[jail]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    /// The VMM's uid.
    pub uid: u32,
    /// The VMM's gid.
    pub gid: u32,
    /// Its RLIMIT_NOFILE.
    pub max_open_files: u64,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> HypervisorError {
    move |e| HypervisorError::Io(what, e)
}

/// Opens the VMM's resources for `config` (which it completes with `fds` and `jail`), prepares
/// the sandbox directory for the jail's ids, and returns the descriptors in the order `fds`
/// names them.
///
/// # Errors
/// [`HypervisorError`] naming what could not be opened or prepared.
pub async fn prepare(
    spec: &VmSpec,
    config: &mut VmConfig,
    ids: JailIds,
) -> Result<Vec<OwnedFd>, HypervisorError> {
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut push = |fd: OwnedFd| -> i32 {
        fds.push(fd);
        i32::try_from(fds.len() - 1).unwrap_or(i32::MAX)
    };
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(io("opening /dev/kvm for the VMM"))?;
    let kvm = push(kvm.into());
    let kernel = push(
        File::open(&spec.kernel)
            .map_err(io("opening the guest kernel"))?
            .into(),
    );
    let initramfs = push(
        File::open(&spec.initramfs)
            .map_err(io("opening the guest initramfs"))?
            .into(),
    );
    let console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.console_log)
        .map_err(io("opening the console log"))?;
    let console = push(console.into());
    let api = match &config.api_socket {
        Some(p) => Some(push(
            UnixListener::bind(p)
                .map_err(io("binding the control socket"))?
                .into(),
        )),
        None => None,
    };
    let vsock = match &config.vsock {
        Some(v) => Some(push(
            UnixListener::bind(&v.uds_path)
                .map_err(io("binding the vsock socket"))?
                .into(),
        )),
        None => None,
    };
    let mut taps = Vec::new();
    if let Some(nic) = &spec.net {
        let fd = crate::network::open_tap(&nic.netns, &nic.tap)
            .await
            .map_err(|e| HypervisorError::Io("opening the pod's tap", std::io::Error::other(e)))?;
        taps.push(push(fd));
    }
    // A template's files, created for it to write; a clone's, read-only. Both live outside
    // the jail, which only ever sees these descriptors.
    let snapshot = match &config.snapshot {
        Some(files) => {
            let open = |path: &Path| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(path)
                    .map_err(io("creating the template's snapshot files"))
            };
            let state = push(open(&files.state)?.into());
            let memory = push(open(&files.memory)?.into());
            Some([state, memory])
        }
        None => None,
    };
    let restore = match &config.restore {
        Some(files) => {
            let open = |path: &Path| File::open(path).map_err(io("opening the template"));
            let state = push(open(&files.state)?.into());
            let memory = push(open(&files.memory)?.into());
            Some([state, memory])
        }
        None => None,
    };
    config.fds = Some(InheritedFds {
        kvm,
        kernel,
        initramfs: Some(initramfs),
        console,
        api,
        vsock,
        taps,
        snapshot,
        restore,
        disks: Vec::new(),
    });
    let root = spec.workdir.join("jail");
    std::fs::create_dir_all(&root).map_err(io("creating the jail's root"))?;
    hand_over(&spec.workdir, ids)?;
    config.jail = Some(JailConfig {
        root,
        bind: vec![spec.workdir.clone()],
        uid: ids.uid,
        gid: ids.gid,
        max_open_files: ids.max_open_files,
    });
    Ok(fds)
}

/// Gives the sandbox directory (mode 0700) and every socket in it to the jail's ids: the VMM
/// binds nothing, but connects to virtiofsd's socket and to the host's vsock listeners there
/// (so do QEMU and vhost-device-vsock, which also create their own sockets there).
///
/// # Errors
/// [`HypervisorError::Io`] when a chown or chmod fails.
pub fn hand_over(workdir: &Path, ids: JailIds) -> Result<(), HypervisorError> {
    let chown = |path: &Path| {
        std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
            .map_err(io("handing the sandbox directory to the jail's uid"))
    };
    chown(workdir)?;
    std::fs::set_permissions(workdir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("handing the sandbox directory to the jail's uid"))?;
    for entry in std::fs::read_dir(workdir).map_err(io("reading the sandbox directory"))? {
        let entry = entry.map_err(io("reading the sandbox directory"))?;
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            chown(&entry.path())?;
        }
    }
    Ok(())
}

/// Sends `fds` to the VMM in one `SCM_RIGHTS` message on `sock` (its stdin's other end).
///
/// # Errors
/// The kernel's error for `sendmsg`.
pub fn send(sock: &UnixStream, fds: &[OwnedFd]) -> std::io::Result<()> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    pangolin_vmm_config::handoff::send(sock.as_fd(), &borrowed)
}
