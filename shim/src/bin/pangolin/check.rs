//! `pangolin check`: what this host offers a microVM, and whether Pangolin can run here.

use std::path::Path;

use pangolin_runtime_config::HypervisorKind;
use pangolin_shim::daemon::resolve_program;
use pangolin_shim::host::HostInfo;
use pangolin_shim::hypervisor;

fn line(ok: bool, what: &str, detail: &str) -> bool {
    println!("{:<5} {what:<22} {detail}", if ok { "ok" } else { "MISS" });
    ok
}

fn file(path: &Path) -> (bool, String) {
    (path.is_file(), path.display().to_string())
}

/// Prints the report; exit status 0 when a sandbox can be started.
pub async fn check(config_file: Option<&Path>) -> anyhow::Result<u8> {
    let loaded = pangolin_shim::artifacts::load(config_file)?;
    let config = &loaded.config;
    let host = HostInfo::probe();
    println!(
        "config: {}",
        loaded
            .file
            .as_ref()
            .map_or("built-in defaults".into(), |f| f.display().to_string())
    );
    if let Some(dir) = &loaded.checkout_guest {
        println!("guest artifacts: checkout build in {}", dir.display());
    }
    line(host.kvm.usable(), "KVM", host.kvm.describe());
    line(
        host.tun,
        "/dev/net/tun",
        if host.tun {
            "present"
        } else {
            "absent (no pod networking)"
        },
    );
    line(
        true,
        "vsock",
        if host.vhost_vsock {
            "/dev/vhost-vsock present; hybrid vsock used"
        } else {
            "hybrid vsock over a Unix socket (no /dev/vhost-vsock needed)"
        },
    );
    let (k_ok, k) = file(&config.hypervisor.kernel);
    let (i_ok, i) = file(&config.hypervisor.initramfs);
    let mut ok = line(k_ok, "guest kernel", &k) & line(i_ok, "guest initramfs", &i);
    let backend = hypervisor::resolve(config.hypervisor.kind, &host);
    match &backend {
        Ok(kind) => {
            let accel = hypervisor::qemu_accel(config.hypervisor.accel, &host);
            let detail = match (&accel, kind) {
                (Ok(a), HypervisorKind::Qemu) => {
                    format!("{} picks {kind} (accel {a})", config.hypervisor.kind)
                }
                (Err(e), _) => e.to_string(),
                (Ok(_), _) => format!("{} picks {kind}", config.hypervisor.kind),
            };
            ok &= line(accel.is_ok(), "hypervisor", &detail);
        }
        Err(err) => ok &= line(false, "hypervisor", &err.to_string()),
    }
    if matches!(backend, Ok(HypervisorKind::Builtin)) {
        let (v_ok, v) = file(&config.hypervisor.vmm_path);
        ok &= line(v_ok, "pangolin-vmm", &v);
    }
    if matches!(backend, Ok(HypervisorKind::Qemu)) {
        let (q_ok, q) = file(&config.hypervisor.qemu_path);
        ok &= line(q_ok, "QEMU", &q);
        let vsockd = resolve_program(&config.vsock.vhost_device_vsock_path);
        ok &= line(
            vsockd.is_some(),
            "vhost-device-vsock",
            &vsockd.map_or_else(
                || {
                    format!(
                        "{} not found",
                        config.vsock.vhost_device_vsock_path.display()
                    )
                },
                |p| p.display().to_string(),
            ),
        );
    }
    let fsd = resolve_program(&config.virtiofs.virtiofsd_path);
    ok &= line(
        fsd.is_some(),
        "virtiofsd",
        &fsd.map_or_else(
            || format!("{} not found", config.virtiofs.virtiofsd_path.display()),
            |p| p.display().to_string(),
        ),
    );
    println!(
        "{}",
        if ok {
            "Pangolin can run here."
        } else {
            "Pangolin cannot run here: see MISS lines."
        }
    );
    Ok(if ok { 0 } else { 1 })
}
