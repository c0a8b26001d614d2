//! The fingerprint of the VM a template would be, from the configuration and this host.
//!
//! Digesting the kernel, initramfs and VMM binary (tens of MB) on every pod start would cost
//! more than a restore saves, so a template remembers each input's digest with the file's
//! identity (device, inode, size, modification and change times): an input whose identity is
//! unchanged keeps its digest, any write or replacement gives it another identity and a fresh
//! digest. The comparison that decides is still the full [`Fingerprint`], which the restoring
//! VMM checks again against the state file.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use pangolin_vmm_config::{sha256_file, Fingerprint};
use serde::{Deserialize, Serialize};

/// What a file is on disk: any write, truncation or replacement changes one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileId {
    /// The identity of `path` now.
    ///
    /// # Errors
    /// `stat` failed.
    pub fn of(path: &Path) -> io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ctime_ns: m
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.ctime_nsec()),
        })
    }
}

/// An input file's digest, valid while the file keeps its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// The file.
    pub path: PathBuf,
    /// Its identity when digested.
    pub id: FileId,
    /// Lowercase hex SHA-256 of its contents.
    pub sha256: String,
}

/// What the template VM is made of, as configured.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// Guest kernel.
    pub kernel: &'a Path,
    /// Guest initramfs.
    pub initramfs: &'a Path,
    /// The VMM binary.
    pub vmm: &'a Path,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// The kernel command line.
    pub cmdline: &'a str,
}

/// The digest of `path`, reusing a `known` one while the file's identity is unchanged.
fn digest(path: &Path, known: &[Digest]) -> io::Result<Digest> {
    let id = FileId::of(path)?;
    if let Some(d) = known.iter().find(|d| d.path == path && d.id == id) {
        return Ok(d.clone());
    }
    let sha256 = sha256_file(path)?;
    // A file rewritten while it was read has another identity now: its digest is worthless.
    if FileId::of(path)? != id {
        return Err(io::Error::other(format!(
            "{} changed while it was digested",
            path.display()
        )));
    }
    Ok(Digest {
        path: path.to_path_buf(),
        id,
        sha256,
    })
}

/// The fingerprint of `inputs` on this host, with the input digests it used (kept with the
/// template for the next computation).
///
/// # Errors
/// An input cannot be read, or this host's CPU model or kernel release cannot be told.
pub fn compute(inputs: &Inputs<'_>, known: &[Digest]) -> io::Result<(Fingerprint, Vec<Digest>)> {
    let kernel = digest(inputs.kernel, known)?;
    let initramfs = digest(inputs.initramfs, known)?;
    let vmm = digest(inputs.vmm, known)?;
    let fingerprint = Fingerprint {
        kernel_sha256: kernel.sha256.clone(),
        initramfs_sha256: Some(initramfs.sha256.clone()),
        vmm_sha256: vmm.sha256.clone(),
        vcpus: inputs.vcpus,
        memory_mib: inputs.memory_mib,
        cmdline: inputs.cmdline.to_string(),
        host_cpu: Fingerprint::host_cpu()?,
        host_kernel: Fingerprint::host_kernel()?,
    };
    Ok((fingerprint, vec![kernel, initramfs, vmm]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn an_unchanged_file_keeps_its_known_digest_and_a_rewritten_one_is_digested_again() {
        let d = TestDir::new("fp-reuse");
        let f = d.path.join("vmlinux");
        std::fs::write(&f, b"kernel one").expect("write");
        let first = digest(&f, &[]).expect("digest");
        // A known digest with the same identity is taken as it is (not recomputed).
        let planted = Digest {
            sha256: "planted".into(),
            ..first.clone()
        };
        assert_eq!(digest(&f, &[planted]).expect("digest").sha256, "planted");
        // Rewritten: another size and change time, so another identity, so a real digest.
        std::fs::write(&f, b"kernel two, longer").expect("rewrite");
        let second = digest(&f, std::slice::from_ref(&first)).expect("digest");
        assert_ne!(second.id, first.id);
        assert_ne!(second.sha256, first.sha256);
        assert_eq!(second.sha256, sha256_file(&f).expect("sha"));
    }

    #[test]
    fn the_fingerprint_names_every_input() {
        let d = TestDir::new("fp-inputs");
        for name in ["k", "i", "v"] {
            std::fs::write(d.path.join(name), name).expect("write");
        }
        let (k, i, v) = (d.path.join("k"), d.path.join("i"), d.path.join("v"));
        let inputs = Inputs {
            kernel: &k,
            initramfs: &i,
            vmm: &v,
            vcpus: 2,
            memory_mib: 512,
            cmdline: "console=ttyS0",
        };
        let (fp, digests) = compute(&inputs, &[]).expect("fingerprint");
        assert_eq!(digests.len(), 3);
        assert_eq!(fp.kernel_sha256, sha256_file(&k).expect("sha"));
        assert_eq!(fp.initramfs_sha256, Some(sha256_file(&i).expect("sha")));
        assert_eq!(fp.vmm_sha256, sha256_file(&v).expect("sha"));
        assert_eq!((fp.vcpus, fp.memory_mib), (2, 512));
        assert_eq!(fp.cmdline, "console=ttyS0");
        assert!(!fp.host_cpu.is_empty() && !fp.host_kernel.is_empty());
        let missing = Inputs {
            kernel: Path::new("/nonexistent/vmlinux"),
            ..inputs
        };
        assert!(compute(&missing, &[]).is_err());
    }
}
