//! Everything the VMM opens on the host, opened by path (an unjailed VMM) or adopted from the
//! descriptors the host side sent in one `SCM_RIGHTS` message on the VMM's stdin (a jailed one:
//! [`pangolin_vmm_config::InheritedFds`] gives each one's position). Building the VM then uses
//! these and opens nothing else but the sockets it connects to.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

use crate::config::{InheritedFds, VmConfig};

/// A resource could not be opened or adopted.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// A file the configuration names could not be opened.
    #[error("{what} {path}")]
    Open {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host's descriptors could not be received on stdin.
    #[error("receiving the host's descriptors on stdin")]
    Receive(#[source] std::io::Error),
    /// The host sent another number of descriptors than the configuration names.
    #[error("the host sent {got} descriptors, the configuration names {want}")]
    Count {
        /// Received.
        got: usize,
        /// Named by `fds`.
        want: usize,
    },
    /// A position names no received descriptor (the configuration was validated: not reached).
    #[error("{what}: no descriptor at position {position}")]
    Missing {
        /// Which resource.
        what: &'static str,
        /// The position.
        position: i32,
    },
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
}

/// The host resources of one VM.
#[derive(Debug)]
pub struct Resources {
    /// `/dev/kvm`.
    pub kvm: Kvm,
    /// The kernel image.
    pub kernel: File,
    /// The initramfs.
    pub initramfs: Option<File>,
    /// The console log.
    pub console: File,
    /// The control socket's listener.
    pub api: Option<UnixListener>,
    /// The vsock device's host listener.
    pub vsock: Option<UnixListener>,
    /// One tap queue per `net` entry (None: open the tap by name).
    pub taps: Vec<Option<OwnedFd>>,
    /// One disk image per `blk` entry.
    pub disks: Vec<File>,
    /// A template's snapshot files to write (state, memory).
    pub snapshot: Option<(File, File)>,
    /// The snapshot files to restore from (state, memory).
    pub restore: Option<(File, File)>,
}

fn open_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ResourceError {
    let path = path.to_path_buf();
    move |source| ResourceError::Open { what, path, source }
}

impl Resources {
    /// The resources of `config`: received on stdin and adopted when `config.fds` is present,
    /// else opened by path.
    ///
    /// # Errors
    /// [`ResourceError`] naming what could not be opened, received or adopted.
    pub fn of(config: &VmConfig) -> Result<Resources, ResourceError> {
        match &config.fds {
            Some(fds) => {
                let want = fds.all().len();
                let received = receive(std::io::stdin().as_raw_fd(), want)?;
                Self::adopt(fds, received)
            }
            None => Self::open(config),
        }
    }

    fn open(config: &VmConfig) -> Result<Resources, ResourceError> {
        let kernel = File::open(&config.kernel).map_err(open_err("kernel", &config.kernel))?;
        let initramfs = match &config.initramfs {
            Some(p) => Some(File::open(p).map_err(open_err("initramfs", p))?),
            None => None,
        };
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.console_log)
            .map_err(open_err("console log", &config.console_log))?;
        let api = match &config.api_socket {
            Some(p) => Some(UnixListener::bind(p).map_err(open_err("control socket", p))?),
            None => None,
        };
        let vsock = match &config.vsock {
            Some(v) => Some(
                UnixListener::bind(&v.uds_path).map_err(open_err("vsock socket", &v.uds_path))?,
            ),
            None => None,
        };
        let mut disks = Vec::with_capacity(config.blk.len());
        for b in &config.blk {
            let file = OpenOptions::new()
                .read(true)
                .write(!b.read_only)
                .open(&b.path)
                .map_err(open_err("disk image", &b.path))?;
            disks.push(file);
        }
        let writable = |what: &'static str, p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(open_err(what, p))
        };
        let snapshot = match &config.snapshot {
            Some(f) => Some((
                writable("snapshot state", &f.state)?,
                writable("snapshot memory", &f.memory)?,
            )),
            None => None,
        };
        let restore = match &config.restore {
            Some(f) => Some((
                File::open(&f.state).map_err(open_err("snapshot state", &f.state))?,
                File::open(&f.memory).map_err(open_err("snapshot memory", &f.memory))?,
            )),
            None => None,
        };
        Ok(Resources {
            kvm: Kvm::new().map_err(ResourceError::Kvm)?,
            kernel,
            initramfs,
            console,
            api,
            vsock,
            taps: config.net.iter().map(|_| None).collect(),
            disks,
            snapshot,
            restore,
        })
    }

    /// Takes `received` apart as `fds` says.
    fn adopt(fds: &InheritedFds, received: Vec<OwnedFd>) -> Result<Resources, ResourceError> {
        let mut slots: Vec<Option<OwnedFd>> = received.into_iter().map(Some).collect();
        let mut take = |what: &'static str, position: i32| {
            usize::try_from(position)
                .ok()
                .and_then(|i| slots.get_mut(i))
                .and_then(Option::take)
                .ok_or(ResourceError::Missing { what, position })
        };
        let kvm_fd = take("kvm", fds.kvm)?;
        // SAFETY: `kvm_fd` is an open descriptor we own (it came out of the host's message),
        // opened by the host on /dev/kvm; Kvm takes ownership of it.
        let kvm = unsafe { Kvm::from_raw_fd(kvm_fd.into_raw_fd()) };
        let kernel = File::from(take("kernel", fds.kernel)?);
        let initramfs = match fds.initramfs {
            Some(p) => Some(File::from(take("initramfs", p)?)),
            None => None,
        };
        let console = File::from(take("console log", fds.console)?);
        let api = match fds.api {
            Some(p) => Some(UnixListener::from(take("control socket", p)?)),
            None => None,
        };
        let vsock = match fds.vsock {
            Some(p) => Some(UnixListener::from(take("vsock socket", p)?)),
            None => None,
        };
        let mut taps = Vec::with_capacity(fds.taps.len());
        for p in &fds.taps {
            taps.push(Some(take("tap", *p)?));
        }
        let mut pair = |what: &'static str, at: Option<[i32; 2]>| match at {
            Some([state, memory]) => Ok::<_, ResourceError>(Some((
                File::from(take(what, state)?),
                File::from(take(what, memory)?),
            ))),
            None => Ok(None),
        };
        let snapshot = pair("snapshot files", fds.snapshot)?;
        let restore = pair("restore files", fds.restore)?;
        let mut disks = Vec::with_capacity(fds.disks.len());
        for p in &fds.disks {
            disks.push(File::from(take("disk image", *p)?));
        }
        Ok(Resources {
            kvm,
            kernel,
            initramfs,
            console,
            api,
            vsock,
            taps,
            disks,
            snapshot,
            restore,
        })
    }
}

/// Receives exactly `want` descriptors in one handoff message on the Unix socket `fd`
/// (marked close-on-exec: the VMM never executes anything, and nothing would leak if it did).
fn receive(fd: RawFd, want: usize) -> Result<Vec<OwnedFd>, ResourceError> {
    // SAFETY: `fd` is the VMM's stdin, open for the whole call.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    let out = pangolin_vmm_config::handoff::receive(sock).map_err(ResourceError::Receive)?;
    if out.len() != want {
        return Err(ResourceError::Count {
            got: out.len(),
            want,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn send(sock: &UnixStream, files: &[&File]) {
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        pangolin_vmm_config::handoff::send(sock.as_fd(), &fds).expect("sendmsg");
    }

    #[test]
    fn descriptors_arrive_in_one_message_close_on_exec_and_the_count_is_checked() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let a = File::open("/dev/null").expect("null");
        let b = File::open("/dev/zero").expect("zero");
        send(&ours, &[&a, &b]);
        let got = receive(theirs.as_raw_fd(), 2).expect("receive");
        assert_eq!(got.len(), 2);
        // SAFETY: F_GETFD only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(got[0].as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        send(&ours, &[&a]);
        let err = receive(theirs.as_raw_fd(), 2).expect_err("one short");
        assert_eq!(
            err.to_string(),
            "the host sent 1 descriptors, the configuration names 2"
        );
    }
}
