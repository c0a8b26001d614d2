//! QEMU `microvm` backend: KVM where the host has hardware virtualisation, TCG elsewhere.
//!
//! Devices, all virtio-mmio (listed on the kernel command line by QEMU, no ACPI/PCI):
//! - vsock: `vhost-user-vsock-device` served by `vhost-device-vsock`, which exposes the guest's
//!   vsock as a hybrid vsock Unix socket (no /dev/vhost-vsock needed);
//! - virtio-fs: `vhost-user-fs-device` to the sandbox's virtiofsd (guest RAM is a shared memfd,
//!   which vhost-user requires, and `force-legacy=false`, which virtiofsd requires);
//! - serial console to a file. The guest reboots to power off (`reboot=t`); `-no-reboot` turns
//!   that into a QEMU exit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use pangolin_runtime_config::{Accel, HypervisorKind};

use super::{Hypervisor, HypervisorError, Vm, VmSpec};
use crate::daemon::{resolve_program, Daemon, ExitWatch};

/// How long the vsock daemon may take to create its socket.
const DAEMON_READY: Duration = Duration::from_secs(10);

/// The QEMU backend's settings.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// qemu-system-x86_64.
    pub qemu_path: PathBuf,
    /// vhost-device-vsock (bare name: looked up on PATH).
    pub vhost_vsock_path: PathBuf,
    /// Resolved accelerator (kvm or tcg).
    pub accel: Accel,
}

/// QEMU's `-sandbox` setting (Kata's choice): QEMU filters its own syscalls.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Command-line arguments for QEMU booting `spec`.
pub fn qemu_args(spec: &VmSpec, accel: Accel, vhost_vsock_socket: &Path) -> Vec<String> {
    let mem = format!("{}M", spec.memory_mib);
    let (accel_arg, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        _ => ("tcg", "max"),
    };
    let mut args: Vec<String> = vec![
        "-M".into(),
        "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem".into(),
        "-accel".into(),
        accel_arg.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        mem.clone(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-nodefaults".into(),
        "-no-user-config".into(),
        // QEMU's own seccomp filter: no obsolete syscalls, no setuid/capset, no fork/exec, no
        // scheduler or resource changes (QEMU needs none of them here).
        "-sandbox".into(),
        SANDBOX.into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", spec.console_log.display()),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initramfs.display().to_string(),
        "-append".into(),
        spec.cmdline.clone(),
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-chardev".into(),
        format!("socket,id=vsock,path={}", vhost_vsock_socket.display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ];
    if let Some((socket, tag)) = &spec.fs {
        args.extend([
            "-chardev".into(),
            format!("socket,id=fs,path={}", socket.display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=fs,tag={tag}"),
        ]);
    }
    if let Some(nic) = &spec.net {
        args.extend([
            "-netdev".into(),
            format!(
                "tap,id=net0,ifname={},script=no,downscript=no,vnet_hdr=on",
                nic.tap
            ),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", nic.mac),
        ]);
    }
    args
}

#[async_trait]
impl Hypervisor for Qemu {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        if !self.qemu_path.is_file() {
            return Err(HypervisorError::Missing {
                what: "QEMU",
                path: self.qemu_path.clone(),
                key: "hypervisor.qemu_path",
            });
        }
        let vsockd_bin =
            resolve_program(&self.vhost_vsock_path).ok_or_else(|| HypervisorError::Missing {
                what: "vhost-device-vsock",
                path: self.vhost_vsock_path.clone(),
                key: "vsock.vhost_device_vsock_path",
            })?;
        let vhost_socket = spec.workdir.join("vhost-vsock.sock");
        let uds = spec.vsock_uds.clone();
        let vsock_args = vec![
            "--guest-cid".to_string(),
            spec.guest_cid.to_string(),
            "--socket".to_string(),
            vhost_socket.display().to_string(),
            "--uds-path".to_string(),
            uds.display().to_string(),
        ];
        let mut vsockd = Daemon::spawn(
            "vhost-device-vsock",
            &vsockd_bin,
            &vsock_args,
            &spec.workdir.join("vsock.log"),
        )?;
        // A helper that cannot be placed is dropped, which kills it.
        spec.place("vhost-device-vsock", vsockd.pid())?;
        vsockd.wait_for_socket(&vhost_socket, DAEMON_READY).await?;

        let args = qemu_args(spec, self.accel, &vhost_socket);
        tracing::debug!(?args, "starting QEMU");
        let qemu = match Daemon::spawn_in(
            "qemu",
            &self.qemu_path,
            &args,
            &spec.workdir.join("qemu.log"),
            spec.net.as_ref().map(|n| n.netns.as_path()),
        ) {
            Ok(q) => q,
            Err(err) => {
                vsockd.stop(Duration::from_millis(500)).await;
                return Err(err.into());
            }
        };
        spec.place("qemu", qemu.pid())?;
        let exit = first_exit(qemu.exit_watch(), vsockd.exit_watch());
        Ok(Box::new(QemuVm {
            qemu,
            vsockd,
            console: spec.console_log.clone(),
            exit,
        }))
    }
}

/// A running QEMU and its vsock daemon.
struct QemuVm {
    qemu: Daemon,
    vsockd: Daemon,
    console: PathBuf,
    exit: ExitWatch,
}

/// A watch that sees whichever of `a` and `b` exits first.
fn first_exit(mut a: ExitWatch, mut b: ExitWatch) -> ExitWatch {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let status = tokio::select! {
            s = a.wait_for(Option::is_some) => s.ok().and_then(|s| *s),
            s = b.wait_for(Option::is_some) => s.ok().and_then(|s| *s),
        };
        tx.send_replace(
            status.or(Some(std::os::unix::process::ExitStatusExt::from_raw(
                255 << 8,
            ))),
        );
    });
    rx
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        self.qemu.pid()
    }

    fn check_alive(&mut self) -> Result<(), HypervisorError> {
        super::check_vmm(&self.qemu, &self.console, "qemu")
    }

    fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }

    async fn shutdown(&mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.qemu.wait()).await.is_err() {
            tracing::debug!("QEMU did not exit after guest power-off; killing it");
            self.qemu.stop(Duration::from_millis(200)).await;
        }
        // The vsock daemon does not exit with QEMU: its owner stops it.
        self.vsockd.stop(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::NicSpec;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio.gz".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 256,
            workdir: "/run/p/s1".into(),
            console_log: "/run/p/s1/console.log".into(),
            fs: Some(("/run/p/s1/fs.sock".into(), "pangolin".into())),
            guest_cid: 3,
            vsock_uds: "/run/p/s1/vm.vsock".into(),
            net: None,
            cgroup: None,
        }
    }

    #[test]
    fn a_nic_is_a_tap_netdev_with_the_pod_mac() {
        let mut s = spec();
        assert!(!qemu_args(&s, Accel::Tcg, Path::new("/v"))
            .join(" ")
            .contains("-netdev"));
        s.net = Some(NicSpec {
            netns: "/var/run/netns/cni-1".into(),
            tap: "tap0_pgn".into(),
            mac: "aa:bb:cc:dd:ee:01".into(),
        });
        let joined = qemu_args(&s, Accel::Tcg, Path::new("/v")).join(" ");
        assert!(
            joined.contains(
                "-netdev tap,id=net0,ifname=tap0_pgn,script=no,downscript=no,vnet_hdr=on"
            ),
            "{joined}"
        );
        assert!(joined.contains("-device virtio-net-device,netdev=net0,mac=aa:bb:cc:dd:ee:01"));
    }

    #[test]
    fn args_use_shared_memfd_ram_and_modern_virtio() {
        let args = qemu_args(&spec(), Accel::Tcg, Path::new("/run/p/s1/vhost-vsock.sock"));
        let joined = args.join(" ");
        assert!(
            joined.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{joined}"
        );
        assert!(joined.contains("virtio-mmio.force-legacy=false"));
        assert!(joined.contains("-accel tcg -cpu max"));
        assert!(joined.contains("vhost-user-fs-device,chardev=fs,tag=pangolin"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-smp 2"));
        assert!(joined.contains(&format!("-sandbox {SANDBOX}")));
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let args = qemu_args(&spec(), Accel::Kvm, Path::new("/s"));
        assert!(args.join(" ").contains("-accel kvm -cpu host"));
    }
}
