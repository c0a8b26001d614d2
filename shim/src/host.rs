//! What this host offers a microVM: the kind of KVM, device nodes, and helper binaries.
//!
//! KVM kinds matter: a PVM (shadow-paging) `/dev/kvm` opens and runs vCPUs but emulates guest
//! kernel code ~2000x slower, so a Linux guest cannot boot on it in usable time. Told apart by
//! `/sys/module/kvm_pvm`, the loaded vendor module, and the CPU's vmx/svm flag.

use std::fs;
use std::path::Path;

/// The host's KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kvm {
    /// No usable /dev/kvm.
    #[default]
    Absent,
    /// /dev/kvm is a PVM (paravirtualised, shadow paging): usable, but too slow to boot Linux.
    Pvm,
    /// /dev/kvm backed by VT-x or AMD-V.
    HardwareVirt,
}

impl Kvm {
    /// True for hardware-virtualisation KVM, the only kind that boots Linux fast.
    pub fn hardware_virt(self) -> bool {
        self == Kvm::HardwareVirt
    }

    /// True when /dev/kvm can be used at all.
    pub fn usable(self) -> bool {
        self != Kvm::Absent
    }

    /// A short description for `pangolin check`.
    pub fn describe(self) -> &'static str {
        match self {
            Kvm::Absent => "absent (no usable /dev/kvm)",
            Kvm::Pvm => "PVM (paravirtual, guest kernel code emulated: too slow to boot Linux)",
            Kvm::HardwareVirt => "hardware virtualisation (VT-x/AMD-V)",
        }
    }
}

/// Facts about the host.
#[derive(Debug, Clone, Default)]
pub struct HostInfo {
    /// The KVM kind.
    pub kvm: Kvm,
    /// /dev/vhost-vsock exists (kernel vsock backend; not needed with hybrid vsock).
    pub vhost_vsock: bool,
    /// /dev/net/tun exists (pod networking).
    pub tun: bool,
}

impl HostInfo {
    /// Probes the running host.
    pub fn probe() -> HostInfo {
        HostInfo {
            kvm: probe_kvm(Path::new("/")),
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
            tun: Path::new("/dev/net/tun").exists(),
        }
    }
}

/// Classifies the KVM of the system rooted at `root` (a test can point at a fake tree).
pub fn probe_kvm(root: &Path) -> Kvm {
    let dev = root.join("dev/kvm");
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .is_err()
    {
        return Kvm::Absent;
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return Kvm::Pvm;
    }
    let vendor_module =
        root.join("sys/module/kvm_intel").exists() || root.join("sys/module/kvm_amd").exists();
    let cpu_flag = fs::read_to_string(root.join("proc/cpuinfo"))
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    if vendor_module || cpu_flag {
        Kvm::HardwareVirt
    } else {
        // Opens, but neither a vendor module nor vmx/svm: treat like PVM (emulated).
        Kvm::Pvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str) -> std::path::PathBuf {
        let root =
            std::env::temp_dir().join(format!("pangolin-host-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("dev")).expect("mkdir");
        fs::create_dir_all(root.join("proc")).expect("mkdir");
        fs::create_dir_all(root.join("sys/module")).expect("mkdir");
        root
    }

    #[test]
    fn kvm_kinds_are_told_apart() {
        let root = fake_root("kinds");
        assert_eq!(probe_kvm(&root), Kvm::Absent);
        // A regular file stands in for the device node: it opens read-write.
        fs::write(root.join("dev/kvm"), "").expect("kvm");
        fs::write(root.join("proc/cpuinfo"), "flags\t\t: fpu sse2\n").expect("cpuinfo");
        assert_eq!(probe_kvm(&root), Kvm::Pvm);
        fs::write(root.join("proc/cpuinfo"), "flags\t\t: fpu svm sse2\n").expect("cpuinfo");
        assert_eq!(probe_kvm(&root), Kvm::HardwareVirt);
        fs::create_dir_all(root.join("sys/module/kvm_pvm")).expect("pvm");
        assert_eq!(probe_kvm(&root), Kvm::Pvm);
        fs::remove_dir_all(&root).expect("cleanup");
    }
}
