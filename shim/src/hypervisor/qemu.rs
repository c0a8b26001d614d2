//! QEMU `microvm` backend: KVM where the host has hardware virtualisation, TCG elsewhere.
//!
//! Devices, all virtio-mmio (listed on the kernel command line by QEMU, no ACPI/PCI):
//! - vsock: `vhost-user-vsock-device` served by `vhost-device-vsock`, which exposes the guest's
//!   vsock as a hybrid vsock Unix socket (no /dev/vhost-vsock needed);
//! - virtio-fs: `vhost-user-fs-device` to the sandbox's virtiofsd (guest RAM is a shared memfd,
//!   which vhost-user requires, and `force-legacy=false`, which virtiofsd requires);
//! - serial console to a file. The guest reboots to power off (`reboot=t`); `-no-reboot` turns
//!   that into a QEMU exit.
//!
//! Confinement (configuration.toml's `[jail]`): QEMU filters its own syscalls (`-sandbox`),
//! and with the jail enabled QEMU and vhost-device-vsock run as the jail's uid/gid with no
//! capability and no_new_privs from their first instruction, inside the pod's network
//! namespace. An unprivileged QEMU cannot open the host's files by path, so the shim opens
//! them and QEMU inherits the descriptors: the kernel and initramfs as `/proc/self/fd/N`,
//! the console log as an fd set (`-add-fd`, `file:/dev/fdset/1`), the tap as `fd=N` (its
//! vnet header is probed from the descriptor). With KVM, QEMU opens `/dev/kvm` itself: it
//! gets /dev/kvm's group when that group may read and write it; a /dev/kvm only root can
//! open leaves QEMU as root (logged as a warning each boot; vhost-device-vsock still drops).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use pangolin_runtime_config::{Accel, HypervisorKind};

use super::jail::JailIds;
use super::{Hypervisor, HypervisorError, Vm, VmSpec};
use crate::daemon::{first_exit, resolve_program, Daemon, ExitWatch, SpawnOptions, Unprivileged};

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
    /// Who QEMU and vhost-device-vsock run as (None: `jail.enabled = false`, both as root).
    pub jail: Option<JailIds>,
    /// The host's TSC rate in kHz, told to TCG guests (`crate::host_tsc`); None: they
    /// calibrate it themselves.
    pub tsc_khz: Option<u64>,
}

/// How QEMU reaches the host files it reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFiles {
    /// By path: QEMU runs as root and opens them itself.
    Paths,
    /// Through descriptors the shim opened and QEMU inherits at these numbers.
    Inherited {
        /// The guest kernel (read-only).
        kernel: RawFd,
        /// The initramfs (read-only).
        initramfs: RawFd,
        /// The console log (write, append).
        console: RawFd,
        /// The pod's tap queue, when it has a NIC.
        tap: Option<RawFd>,
    },
}

/// The fd set `-add-fd` puts the console log in.
const CONSOLE_FDSET: u32 = 1;

/// QEMU's `-sandbox` setting (Kata's choice): QEMU filters its own syscalls.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's emulated local APIC timer counts in its virtual clock's nanoseconds: 1 GHz.
const TCG_APIC_TIMER_KHZ: u32 = 1_000_000;

/// The guest kernel's command line under `accel`. A TCG guest has no TSC-deadline timer, so
/// Linux would calibrate its APIC timer against the PIT (two 100 ms waits); it is told the
/// frequency instead (`lapic_timer_khz`, guest kernel patch 0003). Under KVM the timer is
/// KVM's, with the TSC-deadline mode that needs no calibration. A TCG guest also skips the
/// IO-APIC timer check (`no_timer_check`, as Kata's guests do): with 50 TCG guests booting at
/// once on two cores (`cargo xtask stress --parallel 50`) a guest's timer ticks arrived too
/// late for the check's busy wait and its kernel panicked ("IO-APIC + timer doesn't work!").
/// And a TCG guest reads the host's TSC: given `tsc_khz`, it is told the rate
/// (`tsc_early_khz`) rather than polling the PIT for it, which under emulation fails in about
/// a third of boots and leaves the guest on a delay loop and jiffies (`crate::host_tsc`).
fn cmdline(base: &str, accel: Accel, tsc_khz: Option<u64>) -> String {
    if accel == Accel::Kvm {
        return base.to_string();
    }
    let tcg = format!("{base} lapic_timer_khz={TCG_APIC_TIMER_KHZ} no_timer_check");
    match tsc_khz {
        Some(khz) => format!("{tcg} tsc_early_khz={khz}"),
        None => tcg,
    }
}

/// Command-line arguments for QEMU booting `spec`, reaching the host's files as `files` says.
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    tsc_khz: Option<u64>,
    vhost_vsock_socket: &Path,
    files: HostFiles,
) -> Vec<String> {
    let mem = format!("{}M", spec.memory_mib);
    // The CMOS clock: without one, a guest that has no kvmclock (TCG) reads 0xff from its
    // ports, takes the "update in progress" bit as set and retries for 1 s before it gives up
    // (`mc146818_avoid_UIP`): a second of every boot. Under KVM the wall clock comes from
    // kvmclock, so the device stays out.
    let (accel_arg, cpu, rtc) = match accel {
        Accel::Kvm => ("kvm", "host", "off"),
        _ => ("tcg", "max", "on"),
    };
    let mut args: Vec<String> = vec![
        "-M".into(),
        format!("microvm,acpi=off,x-option-roms=off,rtc={rtc},memory-backend=mem"),
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
    ];
    let (kernel, initramfs, console) = match files {
        HostFiles::Paths => (
            spec.kernel.display().to_string(),
            spec.initramfs.display().to_string(),
            format!("file:{}", spec.console_log.display()),
        ),
        HostFiles::Inherited {
            kernel,
            initramfs,
            console,
            ..
        } => {
            args.extend([
                "-add-fd".into(),
                format!("fd={console},set={CONSOLE_FDSET},opaque=console"),
            ]);
            (
                format!("/proc/self/fd/{kernel}"),
                format!("/proc/self/fd/{initramfs}"),
                format!("file:/dev/fdset/{CONSOLE_FDSET}"),
            )
        }
    };
    args.extend([
        "-serial".into(),
        console,
        "-kernel".into(),
        kernel,
        "-initrd".into(),
        initramfs,
        "-append".into(),
        cmdline(&spec.cmdline, accel, tsc_khz),
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-chardev".into(),
        format!("socket,id=vsock,path={}", vhost_vsock_socket.display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ]);
    if let Some((socket, tag)) = &spec.fs {
        args.extend([
            "-chardev".into(),
            format!("socket,id=fs,path={}", socket.display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=fs,tag={tag}"),
        ]);
    }
    if let Some(nic) = &spec.net {
        let tap = match files {
            HostFiles::Inherited { tap: Some(fd), .. } => format!("tap,id=net0,fd={fd}"),
            _ => format!(
                "tap,id=net0,ifname={},script=no,downscript=no,vnet_hdr=on",
                nic.tap
            ),
        };
        args.extend([
            "-netdev".into(),
            tap,
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
        if spec.snapshot.is_some() || spec.restore.is_some() {
            return Err(HypervisorError::Unsupported {
                kind: HypervisorKind::Qemu,
                reason: "VM templates need the built-in VMM".into(),
            });
        }
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
        let helper = match self.jail {
            Some(ids) => {
                // Both create or connect to sockets in the sandbox directory.
                super::jail::hand_over(&spec.workdir, ids)?;
                Some(unprivileged(ids, Vec::new()))
            }
            None => {
                tracing::warn!(
                    "jail.enabled = false: QEMU and vhost-device-vsock run as root with every capability"
                );
                None
            }
        };
        let qemu_user = match (&helper, self.accel) {
            (Some(user), Accel::Kvm) => kvm_user(user),
            (user, _) => user.clone(),
        };
        let vsock_options = SpawnOptions {
            user: helper,
            ..SpawnOptions::default()
        };
        let mut vsockd = Daemon::spawn_with(
            "vhost-device-vsock",
            &vsockd_bin,
            &vsock_args,
            &spec.workdir.join("vsock.log"),
            vsock_options,
        )?;
        // A helper that cannot be placed is dropped, which kills it.
        spec.place("vhost-device-vsock", vsockd.pid())?;
        vsockd.wait_for_socket(&vhost_socket, DAEMON_READY).await?;

        let (files, inherit) = match &qemu_user {
            Some(_) => open_host_files(spec).await?,
            None => (HostFiles::Paths, Vec::new()),
        };
        let args = qemu_args(spec, self.accel, self.tsc_khz, &vhost_socket, files);
        tracing::debug!(?args, user = ?qemu_user, "starting QEMU");
        let options = SpawnOptions {
            netns: spec.net.as_ref().map(|n| n.netns.as_path()),
            user: qemu_user,
            inherit,
            ..SpawnOptions::default()
        };
        let qemu = match Daemon::spawn_with(
            "qemu",
            &self.qemu_path,
            &args,
            &spec.workdir.join("qemu.log"),
            options,
        ) {
            Ok(q) => q,
            Err(err) => {
                vsockd.stop(Duration::from_millis(500)).await;
                return Err(err.into());
            }
        };
        spec.place("qemu", qemu.pid())?;
        let exit = first_exit(vec![
            ("qemu", qemu.exit_watch()),
            ("vhost-device-vsock", vsockd.exit_watch()),
        ]);
        Ok(Box::new(QemuVm {
            qemu,
            vsockd,
            console: spec.console_log.clone(),
            exit,
        }))
    }
}

/// The jail's ids as a helper's identity, with `groups` as its supplementary groups.
fn unprivileged(ids: JailIds, groups: Vec<u32>) -> Unprivileged {
    Unprivileged {
        uid: ids.uid,
        gid: ids.gid,
        groups,
        max_open_files: ids.max_open_files,
    }
}

/// QEMU with KVM opens `/dev/kvm` by path: the helper identity plus /dev/kvm's group when that
/// group may read and write it, else None (QEMU stays root; logged).
fn kvm_user(user: &Unprivileged) -> Option<Unprivileged> {
    match std::fs::metadata("/dev/kvm") {
        Ok(m) if m.mode() & 0o060 == 0o060 && m.gid() != 0 => Some(Unprivileged {
            groups: vec![m.gid()],
            ..user.clone()
        }),
        Ok(m) => {
            tracing::warn!(
                mode = format!("{:o}", m.mode() & 0o777),
                uid = m.uid(),
                gid = m.gid(),
                "QEMU runs as root: only root can open /dev/kvm here; give /dev/kvm a group with \
                 read and write (e.g. kvm, mode 0660) so QEMU runs as jail.uid"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "QEMU runs as root: /dev/kvm cannot be inspected");
            None
        }
    }
}

/// Opens what an unprivileged QEMU reads and writes on the host; returns how the command line
/// names each descriptor, and the descriptors QEMU inherits.
async fn open_host_files(spec: &VmSpec) -> Result<(HostFiles, Vec<OwnedFd>), HypervisorError> {
    let io = |what: &'static str| move |e| HypervisorError::Io(what, e);
    let kernel: OwnedFd = File::open(&spec.kernel)
        .map_err(io("opening the guest kernel for QEMU"))?
        .into();
    let initramfs: OwnedFd = File::open(&spec.initramfs)
        .map_err(io("opening the guest initramfs for QEMU"))?
        .into();
    let console: OwnedFd = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.console_log)
        .map_err(io("opening the console log for QEMU"))?
        .into();
    let tap = match &spec.net {
        Some(nic) => Some(
            crate::network::open_tap(&nic.netns, &nic.tap)
                .await
                .map_err(|e| {
                    HypervisorError::Io("opening the pod's tap for QEMU", std::io::Error::other(e))
                })?,
        ),
        None => None,
    };
    let files = HostFiles::Inherited {
        kernel: kernel.as_raw_fd(),
        initramfs: initramfs.as_raw_fd(),
        console: console.as_raw_fd(),
        tap: tap.as_ref().map(AsRawFd::as_raw_fd),
    };
    let mut fds = vec![kernel, initramfs, console];
    fds.extend(tap);
    Ok((files, fds))
}

/// A running QEMU and its vsock daemon.
struct QemuVm {
    qemu: Daemon,
    vsockd: Daemon,
    console: PathBuf,
    exit: ExitWatch,
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
            initramfs: "/k/initramfs.cpio".into(),
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
            snapshot: None,
            restore: None,
        }
    }

    #[test]
    fn a_nic_is_a_tap_netdev_with_the_pod_mac() {
        let mut s = spec();
        assert!(
            !qemu_args(&s, Accel::Tcg, None, Path::new("/v"), HostFiles::Paths)
                .join(" ")
                .contains("-netdev")
        );
        s.net = Some(NicSpec {
            netns: "/var/run/netns/cni-1".into(),
            tap: "tap0_pgn".into(),
            mac: "aa:bb:cc:dd:ee:01".into(),
        });
        let joined = qemu_args(&s, Accel::Tcg, None, Path::new("/v"), HostFiles::Paths).join(" ");
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
        let args = qemu_args(
            &spec(),
            Accel::Tcg,
            None,
            Path::new("/run/p/s1/vhost-vsock.sock"),
            HostFiles::Paths,
        );
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
    fn an_unprivileged_qemu_reaches_host_files_through_inherited_descriptors() {
        let mut s = spec();
        s.net = Some(NicSpec {
            netns: "/var/run/netns/cni-1".into(),
            tap: "tap0_pgn".into(),
            mac: "aa:bb:cc:dd:ee:01".into(),
        });
        let files = HostFiles::Inherited {
            kernel: 7,
            initramfs: 8,
            console: 9,
            tap: Some(10),
        };
        let joined = qemu_args(&s, Accel::Tcg, None, Path::new("/v"), files).join(" ");
        assert!(
            joined.contains("-kernel /proc/self/fd/7 -initrd /proc/self/fd/8"),
            "{joined}"
        );
        assert!(
            joined.contains("-add-fd fd=9,set=1,opaque=console"),
            "{joined}"
        );
        assert!(joined.contains("-serial file:/dev/fdset/1"), "{joined}");
        assert!(joined.contains("-netdev tap,id=net0,fd=10 "), "{joined}");
        // No host path QEMU would have to open itself.
        for path in ["/k/vmlinux", "/k/initramfs", "console.log", "ifname="] {
            assert!(!joined.contains(path), "{path} in {joined}");
        }
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let args = qemu_args(&spec(), Accel::Kvm, None, Path::new("/s"), HostFiles::Paths);
        assert!(args.join(" ").contains("-accel kvm -cpu host"));
    }

    #[test]
    fn only_a_tcg_guest_gets_a_cmos_clock() {
        let machine = |accel| {
            qemu_args(&spec(), accel, None, Path::new("/s"), HostFiles::Paths)
                .into_iter()
                .find(|a| a.starts_with("microvm,"))
                .expect("-M microvm")
        };
        assert!(machine(Accel::Tcg).contains(",rtc=on,"));
        assert!(machine(Accel::Kvm).contains(",rtc=off,"));
    }

    #[test]
    fn only_a_tcg_guest_is_told_its_apic_timer_frequency() {
        let append = |accel| {
            let args = qemu_args(&spec(), accel, None, Path::new("/s"), HostFiles::Paths);
            let at = args.iter().position(|a| a == "-append").expect("-append");
            args[at + 1].clone()
        };
        assert_eq!(
            append(Accel::Tcg),
            "console=ttyS0 lapic_timer_khz=1000000 no_timer_check"
        );
        assert_eq!(append(Accel::Kvm), "console=ttyS0");
    }

    #[test]
    fn only_a_tcg_guest_is_told_the_hosts_tsc_rate() {
        let tcg = cmdline("console=ttyS0", Accel::Tcg, Some(2_596_094));
        assert!(
            tcg.ends_with(" no_timer_check tsc_early_khz=2596094"),
            "{tcg}"
        );
        let kvm = cmdline("console=ttyS0", Accel::Kvm, Some(2_596_094));
        assert_eq!(kvm, "console=ttyS0");
    }
}
