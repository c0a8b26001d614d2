//! What a VM snapshot was taken from: the [`Fingerprint`] a state file carries in its payload.
//! The host side computes it (digests of the kernel, initramfs and VMM binary, the host's CPU
//! model and kernel, and the VM's size and command line), hands it to the template's VMM to
//! stamp and to a restoring VMM to expect; the restoring VMM refuses a state file whose
//! fingerprint differs in any field, and its configuration validation refuses an expected
//! fingerprint that does not describe the VM it configures (vCPUs, memory, command line,
//! initramfs or not). So restoring a guest on another kernel, initramfs, VMM build, size,
//! command line, host CPU model or host kernel is refused, as Firecracker only supports resuming
//! on the same CPU model and host kernel, as long as the host computes the fingerprint as
//! [`Fingerprint`]'s helpers do. Hence it lives here: the host side links no KVM.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A snapshot on the host: the state file (header, fingerprint, vCPU/VM/device state) and the
/// sparse guest-memory file, with the fingerprint the VM is (a template's VMM writes it into the
/// state file; a restoring VMM refuses a state file that carries another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFiles {
    /// The state file.
    pub state: std::path::PathBuf,
    /// The guest-memory file.
    pub memory: std::path::PathBuf,
    /// What the VM is made of.
    pub fingerprint: Fingerprint,
}

/// Everything a snapshot depends on; digests are lowercase hex SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// The guest kernel (ELF vmlinux).
    pub kernel_sha256: String,
    /// The initramfs, if the VM had one.
    pub initramfs_sha256: Option<String>,
    /// The VMM binary that took the snapshot.
    pub vmm_sha256: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// The kernel command line as configured (before the VMM appends its device entries).
    pub cmdline: String,
    /// The host CPU's model name (`/proc/cpuinfo`), see [`Fingerprint::host_cpu`].
    pub host_cpu: String,
    /// The host kernel's release (`uname -r`), see [`Fingerprint::host_kernel`].
    pub host_kernel: String,
}

impl Fingerprint {
    /// The name of the first field where `self` differs from `expected`, or `None` when they
    /// are the same.
    pub fn mismatch(&self, expected: &Fingerprint) -> Option<&'static str> {
        // Destructured so that a new field cannot be left out of the comparison.
        let Fingerprint {
            kernel_sha256,
            initramfs_sha256,
            vmm_sha256,
            vcpus,
            memory_mib,
            cmdline,
            host_cpu,
            host_kernel,
        } = self;
        [
            ("kernel_sha256", *kernel_sha256 == expected.kernel_sha256),
            (
                "initramfs_sha256",
                *initramfs_sha256 == expected.initramfs_sha256,
            ),
            ("vmm_sha256", *vmm_sha256 == expected.vmm_sha256),
            ("vcpus", *vcpus == expected.vcpus),
            ("memory_mib", *memory_mib == expected.memory_mib),
            ("cmdline", *cmdline == expected.cmdline),
            ("host_cpu", *host_cpu == expected.host_cpu),
            ("host_kernel", *host_kernel == expected.host_kernel),
        ]
        .into_iter()
        .find_map(|(field, same)| (!same).then_some(field))
    }

    /// This host's CPU model: the first `model name` in `/proc/cpuinfo`.
    ///
    /// # Errors
    /// Reading `/proc/cpuinfo` failed, or it has no `model name` line
    /// ([`io::ErrorKind::NotFound`]).
    pub fn host_cpu() -> io::Result<String> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
        model_name(&cpuinfo).map(str::to_owned).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no model name in /proc/cpuinfo")
        })
    }

    /// This host's kernel release, as `uname -r` prints it.
    ///
    /// # Errors
    /// `uname` failed.
    pub fn host_kernel() -> io::Result<String> {
        let uts = nix::sys::utsname::uname().map_err(io::Error::from)?;
        Ok(uts.release().to_string_lossy().into_owned())
    }
}

/// The value of the first `model name` line of a `/proc/cpuinfo` text.
fn model_name(cpuinfo: &str) -> Option<&str> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim())
    })
}

/// The SHA-256 of a file's contents, lowercase hex.
///
/// # Errors
/// Opening or reading the file failed.
pub fn sha256_file(path: impl AsRef<Path>) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Fingerprint {
        Fingerprint {
            kernel_sha256: "aa".repeat(32),
            initramfs_sha256: Some("bb".repeat(32)),
            vmm_sha256: "cc".repeat(32),
            vcpus: 2,
            memory_mib: 512,
            cmdline: "console=ttyS0".into(),
            host_cpu: "AMD EPYC 7B13".into(),
            host_kernel: "6.1.0-18-amd64".into(),
        }
    }

    #[test]
    fn same_fingerprints_have_no_mismatch() {
        assert_eq!(sample().mismatch(&sample()), None);
    }

    /// A field's name and a change to it.
    type Change = (&'static str, fn(&mut Fingerprint));

    #[test]
    fn mismatch_names_each_field() {
        let base = sample();
        let changes: [Change; 8] = [
            ("kernel_sha256", |f| f.kernel_sha256 = "00".repeat(32)),
            ("initramfs_sha256", |f| f.initramfs_sha256 = None),
            ("vmm_sha256", |f| f.vmm_sha256.clear()),
            ("vcpus", |f| f.vcpus = 3),
            ("memory_mib", |f| f.memory_mib = 1024),
            ("cmdline", |f| f.cmdline.push_str(" quiet")),
            ("host_cpu", |f| f.host_cpu = "Intel Xeon".into()),
            ("host_kernel", |f| f.host_kernel = "6.6.0".into()),
        ];
        for (field, change) in changes {
            let mut other = base.clone();
            change(&mut other);
            assert_eq!(other.mismatch(&base), Some(field));
            assert_eq!(base.mismatch(&other), Some(field));
        }
    }

    #[test]
    fn mismatch_names_the_first_differing_field() {
        let base = sample();
        let mut other = base.clone();
        other.host_kernel = "7.0".into();
        other.vcpus = 1;
        assert_eq!(other.mismatch(&base), Some("vcpus"));
    }

    #[test]
    fn fingerprint_round_trips_through_json_and_refuses_unknown_fields() {
        let json = serde_json::to_string(&sample()).expect("serialise");
        let back: Fingerprint = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, sample());
        let extra = json.replacen('{', r#"{"extra":1,"#, 1);
        assert!(serde_json::from_str::<Fingerprint>(&extra).is_err());
    }

    #[test]
    fn sha256_of_known_contents() {
        let path = std::env::temp_dir().join(format!("pg-sha256-{}", std::process::id()));
        std::fs::write(&path, b"abc").expect("write");
        let digest = sha256_file(&path);
        std::fs::write(&path, b"").expect("write");
        let empty = sha256_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            digest.expect("digest"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            empty.expect("digest"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(sha256_file("/nonexistent/pangolin").is_err());
    }

    #[test]
    fn sha256_of_a_file_longer_than_the_buffer() {
        let path = std::env::temp_dir().join(format!("pg-sha256-big-{}", std::process::id()));
        let data: Vec<u8> = (0..200_000u32).map(|i| i.to_le_bytes()[0]).collect();
        std::fs::write(&path, &data).expect("write");
        let digest = sha256_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(digest.expect("digest"), hex(&Sha256::digest(&data)));
    }

    #[test]
    fn model_name_is_the_first_one() {
        let cpuinfo = concat!(
            "processor\t: 0\nvendor_id\t: AuthenticAMD\n",
            "model name\t: AMD EPYC 7B13 64-Core Processor\n\n",
            "processor\t: 1\nmodel name\t: other\n",
        );
        assert_eq!(model_name(cpuinfo), Some("AMD EPYC 7B13 64-Core Processor"));
        assert_eq!(model_name("processor\t: 0\n"), None);
    }

    #[test]
    fn host_values_are_read() {
        let kernel = Fingerprint::host_kernel().expect("uname");
        assert!(!kernel.is_empty());
        // Every x86 Linux host names its CPU model; other architectures may not.
        if cfg!(target_arch = "x86_64") {
            assert!(!Fingerprint::host_cpu().expect("cpuinfo").is_empty());
        }
    }
}
