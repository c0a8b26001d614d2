//! VMM figures on this host's own KVM: exec to the guest's first instruction (a stub kernel whose
//! first instruction writes to COM1) and the VMM's memory (PSS without guest RAM), built-in VMM
//! against QEMU microvm, alternating in one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Guest command line that keeps an emulated (PVM) guest off the instructions PVM lacks.
pub const PVM_SAFE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial noxsave nosmap nosmep \
    clearcpuid=popcnt,cx16,smap,smep,xsave,avx,avx2 int3_selftest=off reboot=t panic=-1";

/// One VMM's figures for one run.
pub struct Sample {
    /// Exec to the first byte on the serial console.
    pub first_output_ms: f64,
    /// PSS of the VMM process excluding the guest RAM mapping, in KiB.
    pub pss_kib: u64,
}

fn wait_first_output(child: &mut Child, console: &Path, started: Instant) -> anyhow::Result<f64> {
    let deadline = started + Duration::from_secs(60);
    loop {
        if std::fs::metadata(console)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        if let Some(status) = child.try_wait()? {
            bail!("VMM exited before any console output ({status})");
        }
        if Instant::now() > deadline {
            bail!("no console output within 60 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// PSS of `pid` in KiB, leaving out mappings whose name contains `skip` (the guest RAM memfd).
pub fn pss_without(pid: u32, skip: &str) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut skipping = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            skipping = line.contains(skip);
        } else if first == "Pss:" && !skipping {
            total += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

fn finish(mut child: Child, console: &Path, started: Instant, ram: &str) -> anyhow::Result<Sample> {
    let first = wait_first_output(&mut child, console, started);
    // Let the guest run on a little so the VMM reaches its steady state before measuring.
    std::thread::sleep(Duration::from_millis(1500));
    let pss = pss_without(child.id(), ram);
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sample {
        first_output_ms: first?,
        pss_kib: pss?,
    })
}

/// Boots `kernel` once with the built-in VMM.
pub fn builtin(vmm: &Path, kernel: &Path, dir: &Path) -> anyhow::Result<Sample> {
    let console = dir.join("builtin-console.log");
    let _ = std::fs::remove_file(&console);
    let config = format!(
        "{{\"kernel\":\"{}\",\"cmdline\":\"{PVM_SAFE_CMDLINE}\",\"vcpus\":1,\"memory_mib\":256,\"console_log\":\"{}\"}}",
        kernel.display(),
        console.display()
    );
    let started = Instant::now();
    let child = Command::new(vmm)
        .args(["--config-json", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning pangolin-vmm")?;
    finish(child, &console, started, "pangolin-guest-ram")
}

/// Boots `kernel` once with QEMU microvm on KVM, configured like Pangolin's QEMU backend.
pub fn qemu(kernel: &Path, dir: &Path) -> anyhow::Result<Sample> {
    let console = dir.join("qemu-console.log");
    let _ = std::fs::remove_file(&console);
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem",
        ])
        // `host` without IA32_ARCH_CAPABILITIES: this project's PVM hosts refuse the value
        // QEMU writes there (QEMU asserts: "failed to set MSR 0x10a"); the stub never reads it.
        .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-smp", "1", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", PVM_SAFE_CMDLINE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning qemu-system-x86_64")?;
    // QEMU's memfd is named after the backend id.
    finish(child, &console, started, "memfd:mem")
}

/// Where scratch files go.
pub fn scratch() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pangolin-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
