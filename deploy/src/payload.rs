//! What the installer carries and where each piece goes on the node: the same paths
//! `cargo xtask install` uses, which are the configuration's defaults.
//!
//! Payload layout (the installer image's `/opt/pangolin`, or any directory given with
//! `--from`): `bin/` the shim, the CLI, virtiofsd and vhost-device-vsock; `libexec/pangolin-vmm`;
//! `share/` the guest kernel and initramfs; `etc/configuration.toml`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One file of the payload.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    /// Its path in the payload.
    pub from: &'static str,
    /// Its path on the node, relative to the root.
    pub to: &'static str,
    /// Its mode.
    pub mode: u32,
    /// The configuration: an existing one (the operator's) is kept, the new one goes beside it
    /// as `.new`.
    pub config: bool,
}

const fn item(from: &'static str, to: &'static str, mode: u32) -> Item {
    Item {
        from,
        to,
        mode,
        config: false,
    }
}

/// Every file the installer puts on a node.
pub const ITEMS: &[Item] = &[
    item(
        "bin/containerd-shim-pangolin-v2",
        "usr/local/bin/containerd-shim-pangolin-v2",
        0o755,
    ),
    item("bin/pangolin", "usr/local/bin/pangolin", 0o755),
    item("bin/virtiofsd", "usr/local/bin/virtiofsd", 0o755),
    item(
        "bin/vhost-device-vsock",
        "usr/local/bin/vhost-device-vsock",
        0o755,
    ),
    item(
        "libexec/pangolin-vmm",
        "usr/libexec/pangolin/pangolin-vmm",
        0o755,
    ),
    item("share/vmlinux", "usr/share/pangolin/vmlinux", 0o644),
    item(
        "share/initramfs.cpio",
        "usr/share/pangolin/initramfs.cpio",
        0o644,
    ),
    Item {
        from: "etc/configuration.toml",
        to: "etc/pangolin/configuration.toml",
        mode: 0o644,
        config: true,
    },
];

/// A file operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct FileError {
    /// What was being done.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why it failed.
    pub source: std::io::Error,
}

impl FileError {
    /// A closure that wraps an `io::Error` for `what` on `path`.
    pub fn on(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| FileError { what, path, source }
    }
}

/// The payload's missing files, if any.
pub fn missing(from: &Path) -> Vec<PathBuf> {
    ITEMS
        .iter()
        .map(|i| from.join(i.from))
        .filter(|p| !p.is_file())
        .collect()
}

/// The SHA-256 of a file, hex.
pub fn digest(path: &Path) -> Result<String, FileError> {
    let mut f = fs::File::open(path).map_err(FileError::on("reading", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(FileError::on("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Copies `from` to `to` with `mode`, atomically (a temporary file beside `to`, then a rename:
/// a running shim or VMM keeps the file it has open, a new one gets the new file).
pub fn copy(from: &Path, to: &Path, mode: u32) -> Result<(), FileError> {
    let dir = to.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(FileError::on("creating", dir))?;
    let name = to
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.pangolin-deploy"));
    fs::copy(from, &tmp).map_err(FileError::on("copying to", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(FileError::on("setting the mode of", &tmp))?;
    fs::rename(&tmp, to).map_err(FileError::on("renaming into", to))
}
