//! `cargo xtask bench`: cold-start figures of `pangolin run`, printed as median/min/max, and
//! the built-in VMM against QEMU on this host's KVM.

mod tiny_elf;
mod vmm;

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::{build_host, deps, guest};

/// The median (sorts `values`).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn stats(name: &str, values: &mut [f64]) {
    let median = median(values);
    println!(
        "{name:<28} median {median:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms",
        values[0],
        values[values.len() - 1]
    );
}

fn field(json: &str, key: &str) -> Option<f64> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[start..];
    let end = rest.find([',', '}'])?;
    rest[..end].parse().ok()
}

/// Runs the benchmark; `--runs N` sets the repetitions (default 10).
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    let runs: usize = match args.iter().position(|a| a == "--runs") {
        Some(i) => args
            .get(i + 1)
            .context("--runs N")?
            .parse()
            .context("--runs N")?,
        None => 10,
    };
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    deps::ensure()?;
    let g = guest::build()?;
    let pangolin = build_host(true)?;
    let (mut wall, mut boot, mut guest, mut create, mut teardown) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let t = Instant::now();
        let out = Command::new(&pangolin)
            .args(["run", "--timings", "--rootfs"])
            .arg(&g.rootfs)
            .args(["--", "true"])
            .output()
            .context("running pangolin")?;
        let elapsed = t.elapsed().as_secs_f64() * 1000.0;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("run {i} failed: {stderr}");
        }
        let line = stderr
            .lines()
            .find(|l| l.starts_with("pangolin-timings:"))
            .context("no timings line")?;
        wall.push(elapsed);
        boot.push(field(line, "boot_ms").context("boot_ms")?);
        guest.push(field(line, "guest_agent_ready_ms").context("guest_agent_ready_ms")?);
        create.push(field(line, "create_start_ms").context("create_start_ms")?);
        teardown.push(field(line, "teardown_ms").context("teardown_ms")?);
    }
    let host = pangolin_host_summary();
    println!("pangolin run --rootfs busybox -- true, {runs} runs, {host}");
    stats("wall time (process)", &mut wall);
    stats("VM start to agent ready", &mut boot);
    stats("  of which guest boot (guest clock)", &mut guest);
    stats("container create+start", &mut create);
    stats("teardown", &mut teardown);
    containerd_figures(runs, &pangolin, &g.rootfs)?;
    cri_figures(runs, &pangolin, &g.rootfs)?;
    fs_figures(runs.min(3), &pangolin, &g.rootfs)?;
    vmm_figures(runs, &pangolin)?;
    nested_figures(runs.min(3), &pangolin, &g.rootfs)?;
    parallel_template_figures(&pangolin, &g.rootfs)
}

/// Pods started from one template at once.
const PARALLEL_PODS: usize = 10;

/// The shell script for [`parallel_template_figures`]: builds the template, starts
/// [`PARALLEL_PODS`] `pangolin run`s at once (each container sleeps so that all VMs run
/// together), samples the RSS of every VMM and virtiofsd process once all VMMs run (the test
/// host's kernel has no `smaps_rollup` for PSS), and
/// prints each run's timings.
fn parallel_script(pangolin: &std::path::Path, rootfs: &std::path::Path) -> String {
    let (p, r) = (pangolin.display(), rootfs.display());
    let n = PARALLEL_PODS;
    format!(
        "{p} template build >/dev/null; \
         for i in $(seq {n}); do ({p} run --timings --rootfs {r} -- sleep 20 2>&1 | sed -n 's/^pangolin-timings: /par /p') & done; \
         t=0; while [ \"$(pgrep -cf '[p]angolin-vmm --config')\" -lt {n} ] && [ $t -lt 600 ]; do sleep 0.1; t=$((t+1)); done; sleep 8; \
         for x in $(pgrep -f '[p]angolin-vmm --config'); do awk '/^VmRSS:/{{print \"rss-vmm\", $2}}' /proc/$x/status; done; \
         for x in $(pgrep -f '[v]irtiofsd --socket-path'); do awk '/^VmRSS:/{{print \"rss-fsd\", $2}}' /proc/$x/status; done; \
         wait"
    )
}

/// [`PARALLEL_PODS`] pods started at once from one template in the nested test host: time
/// until all are ready (each run's VM start to agent ready; they start together) and host
/// memory per VM (RSS of its VMM, the guest RAM it holds included, and of its virtiofsd).
fn parallel_template_figures(
    pangolin: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    let xtask = std::env::current_exe().context("xtask path")?;
    let out = Command::new(xtask)
        .args(["testhost", "--timeout", "600", "--", "sh", "-c"])
        .arg(parallel_script(pangolin, rootfs))
        .output()
        .context("running the test host")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!();
    println!("Nested test host: {PARALLEL_PODS} pods started at once from one template");
    let mut boot: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("par "))
        .filter_map(|l| field(l, "boot_ms"))
        .collect();
    if boot.len() != PARALLEL_PODS {
        println!(
            "{} of {PARALLEL_PODS} runs reported (test host: {})",
            boot.len(),
            out.status
        );
        if boot.is_empty() {
            return Ok(());
        }
    }
    let all_ready = boot.iter().copied().fold(0.0, f64::max);
    stats("each: VM start to agent", &mut boot);
    println!("{:<28} {all_ready:>8.1} ms", "all ready (slowest)");
    for (kind, label) in [
        ("rss-vmm", "VMM RSS per VM"),
        ("rss-fsd", "virtiofsd RSS per VM"),
    ] {
        let kib: f64 = text
            .lines()
            .filter_map(|l| l.strip_prefix(kind))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum();
        println!(
            "{label:<28} {:>8.1} MiB",
            kib / 1024.0 / PARALLEL_PODS as f64
        );
    }
    Ok(())
}

/// Boot to agent ready for both backends on the nested test host's hardware-virt KVM.
fn nested_figures(
    runs: usize,
    pangolin: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    crate::testhost::build()?;
    // (label, `pangolin run` options): the built-in VMM booting its kernel, the same restored
    // from a template (built before the first run), and QEMU.
    let kinds = [
        ("builtin-cold", "--hypervisor builtin --no-template"),
        ("builtin-template", "--hypervisor builtin"),
        ("qemu", "--hypervisor qemu"),
    ];
    let one = |label: &str, opts: &str| {
        format!(
            "{} run {opts} --timings --rootfs {} -- true 2>&1 | sed -n 's/^pangolin-timings: /{label} /p'",
            pangolin.display(),
            rootfs.display()
        )
    };
    let mut script = format!("{} template build >/dev/null; ", pangolin.display());
    for _ in 0..runs {
        for (label, opts) in kinds {
            script.push_str(&one(label, opts));
            script.push_str("; ");
        }
    }
    script.push_str("true");
    let xtask = std::env::current_exe().context("xtask path")?;
    let out = Command::new(xtask)
        .args(["testhost", "--timeout", "600", "--", "sh", "-c", &script])
        .output()
        .context("running the test host")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!();
    println!("Nested test host (TCG + emulated SVM, hardware-virt KVM inside), {runs} runs each, alternating");
    let mut medians = Vec::new();
    for (kind, _) in kinds {
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{kind} ")).map(str::trim))
            .filter(|l| l.starts_with('{'))
            .collect();
        if lines.is_empty() {
            println!("{kind:<28} no result (test host: {})", out.status);
            continue;
        }
        let mut boot: Vec<f64> = lines.iter().filter_map(|l| field(l, "boot_ms")).collect();
        let mut guest: Vec<f64> = lines
            .iter()
            .filter_map(|l| field(l, "guest_agent_ready_ms"))
            .collect();
        stats(&format!("{kind}: VM start to agent"), &mut boot);
        stats(&format!("{kind}:   guest clock"), &mut guest);
        medians.push((kind, median(&mut boot)));
    }
    let of = |k: &str| medians.iter().find(|(m, _)| *m == k).map(|(_, v)| *v);
    if let (Some(cold), Some(tpl)) = (of("builtin-cold"), of("builtin-template")) {
        println!(
            "builtin template / cold: {:.2}x (target <= 0.15x), medians of VM start to agent ready",
            tpl / cold
        );
    }
    Ok(())
}

/// P1 through CRI: RunPodSandbox + CreateContainer + StartContainer, pangolin vs runc. The CRI
/// client lives in the e2e crate's `cri_bench` binary (its code is generated with protoc).
fn cri_figures(
    runs: usize,
    pangolin: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    let mut build = crate::cargo();
    build.current_dir(guest::root()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "pangolin-e2e",
        "--bin",
        "cri_bench",
    ]);
    guest::run(&mut build)?;
    let shim_dir = pangolin.parent().context("target dir")?;
    println!();
    let status = Command::new(shim_dir.join("cri_bench"))
        .arg("--runs")
        .arg(runs.to_string())
        .arg("--shim-dir")
        .arg(shim_dir)
        .arg("--busybox")
        .arg(rootfs)
        .status()
        .context("running cri_bench")?;
    if !status.success() {
        bail!("cri_bench failed ({status})");
    }
    Ok(())
}

/// Seconds from busybox `time`'s "real\t0m 0.35s" line.
fn real_secs(out: &str) -> Option<f64> {
    let rest = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("real"))?
        .trim();
    let (min, sec) = rest.split_once('m')?;
    let min: f64 = min.trim().parse().ok()?;
    let sec: f64 = sec.trim().trim_end_matches('s').parse().ok()?;
    Some(min * 60.0 + sec)
}

/// P7: sequential write (with fsync) and read of 64 MiB through virtio-fs in the guest, and the
/// same busybox dd on the host directory behind it (guest: busybox `time`, 10 ms resolution).
fn fs_figures(
    runs: usize,
    pangolin: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    const MIB: f64 = 64.0;
    let busybox = rootfs.join("bin/busybox");
    let seed = rootfs.join("p7-read.bin");
    let write = "time dd if=/dev/zero of=/p7-write.bin bs=1M count=64 conv=fsync 2>&1";
    let read = "time dd if=/p7-read.bin of=/dev/null bs=1M 2>&1";
    let rate = |out: &str, what: &str| -> anyhow::Result<f64> {
        let secs =
            real_secs(out).with_context(|| format!("{what}: no `time` figure in {out:?}"))?;
        Ok(MIB / secs.max(0.01))
    };
    let (mut gw, mut gr, mut hw, mut hr) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        std::fs::write(&seed, vec![0x5a_u8; 64 << 20])?;
        let out = Command::new(pangolin)
            .args(["run", "--rootfs"])
            .arg(rootfs)
            .args([
                "--",
                "sh",
                "-c",
                &format!("{write}; echo ==; {read}; rm -f /p7-write.bin"),
            ])
            .output()
            .context("running pangolin")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (w, r) = text.split_once("==").unwrap_or((&text, ""));
        let guest = (rate(w, "guest write"), rate(r, "guest read"));
        // On the host the clock is ours (busybox `time`'s 10 ms would cap a cached read).
        let host = |cmd: &str, what: &str| -> anyhow::Result<f64> {
            let cmd = cmd
                .trim_start_matches("time ")
                .replace("/p7-", &format!("{}/p7-", rootfs.display()));
            let t = Instant::now();
            let out = Command::new(&busybox).args(["sh", "-c", &cmd]).output()?;
            if !out.status.success() {
                bail!("{what}: {}", out.status);
            }
            Ok(MIB / t.elapsed().as_secs_f64())
        };
        let hosts = (host(write, "host write"), host(read, "host read"));
        let _ = std::fs::remove_file(rootfs.join("p7-write.bin"));
        let _ = std::fs::remove_file(&seed);
        gw.push(guest.0?);
        gr.push(guest.1?);
        hw.push(hosts.0?);
        hr.push(hosts.1?);
    }
    println!();
    println!("P7 virtio-fs sequential throughput, 64 MiB busybox dd bs=1M (write with fsync; the read file is fresh to the guest), {runs} runs");
    let (gw, gr, hw, hr) = (
        median(&mut gw),
        median(&mut gr),
        median(&mut hw),
        median(&mut hr),
    );
    println!(
        "{:<28} guest {gw:>8.1} MiB/s   host {hw:>8.1} MiB/s   {:.2}x",
        "write",
        gw / hw
    );
    println!(
        "{:<28} guest {gr:>8.1} MiB/s   host {hr:>8.1} MiB/s   {:.2}x",
        "read",
        gr / hr
    );
    Ok(())
}

/// Built-in VMM vs QEMU microvm on the local KVM, alternating.
fn vmm_figures(runs: usize, pangolin: &std::path::Path) -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("VMM comparison: not run (no /dev/kvm on this host)");
        return Ok(());
    }
    let vmm_bin = pangolin.with_file_name("pangolin-vmm");
    let dir = vmm::scratch()?;
    let kernel = dir.join("tiny-pvh.elf");
    std::fs::write(&kernel, tiny_elf::image())?;
    let (mut b_first, mut q_first, mut b_pss, mut q_pss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs.min(5) {
        let b = vmm::builtin(&vmm_bin, &kernel, &dir)?;
        let q = vmm::qemu(&kernel, &dir)?;
        b_first.push(b.first_output_ms);
        q_first.push(q.first_output_ms);
        b_pss.push(b.pss_kib as f64 / 1024.0);
        q_pss.push(q.pss_kib as f64 / 1024.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!(
        "VMM exec to first guest instruction (a PVH stub's first OUT to COM1), this host's KVM ({}), {} runs each, alternating",
        if std::path::Path::new("/sys/module/kvm_pvm").exists() { "PVM" } else { "hardware" },
        b_first.len()
    );
    stats("builtin (pangolin-vmm)", &mut b_first.clone());
    stats("QEMU microvm", &mut q_first.clone());
    let (bf, qf) = (median(&mut b_first), median(&mut q_first));
    println!(
        "{:<28} {:.2}x (target <= 0.2x)",
        "ratio builtin/QEMU",
        bf / qf
    );
    let (bp, qp) = (median(&mut b_pss), median(&mut q_pss));
    println!(
        "{:<28} builtin {bp:.1} MiB, QEMU {qp:.1} MiB (target builtin <= 5 MiB)",
        "VMM PSS without guest RAM"
    );
    Ok(())
}

fn pangolin_host_summary() -> String {
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        "QEMU TCG (this host's KVM is PVM)".into()
    } else {
        "backend auto".into()
    }
}

/// P1: `ctr run --rm busybox true` with the pangolin runtime and with runc, alternating.
fn containerd_figures(
    runs: usize,
    pangolin: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    use crate::containerd::{PrivateContainerd, BUSYBOX_IMAGE, PANGOLIN_RUNTIME};
    let shim_dir = pangolin.parent().context("target dir")?;
    let dir =
        std::env::temp_dir().join(format!("pangolin-bench-containerd-{}", std::process::id()));
    let ctrd = PrivateContainerd::start(&dir, shim_dir)?;
    ctrd.import_busybox(rootfs, BUSYBOX_IMAGE)?;
    let (mut pg, mut rc) = (vec![], vec![]);
    for i in 0..runs {
        for (runtime, out) in [
            (PANGOLIN_RUNTIME, &mut pg),
            ("io.containerd.runc.v2", &mut rc),
        ] {
            let id = format!(
                "bench-{i}-{}",
                if runtime == PANGOLIN_RUNTIME {
                    "pg"
                } else {
                    "runc"
                }
            );
            let t = Instant::now();
            let status = ctrd
                .ctr([
                    "run",
                    "--rm",
                    "--runtime",
                    runtime,
                    BUSYBOX_IMAGE,
                    &id,
                    "true",
                ])
                .status()
                .context("ctr run")?;
            if !status.success() {
                bail!(
                    "ctr run --runtime {runtime} failed ({status}); log: {}",
                    ctrd.log_tail(20)
                );
            }
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    ctrd.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!(
        "ctr run --rm busybox true through a private containerd, {runs} runs each, alternating"
    );
    stats("pangolin (io.containerd.pangolin.v2)", &mut pg);
    stats("runc (io.containerd.runc.v2)", &mut rc);
    println!(
        "{:<28} {:.1}x",
        "ratio pangolin/runc",
        median(&mut pg) / median(&mut rc)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn busybox_time_output_parses() {
        assert_eq!(
            super::real_secs("64+0 records out\nreal\t0m 0.35s\nuser\t0m 0.00s"),
            Some(0.35)
        );
        assert_eq!(super::real_secs("real\t1m 2.50s"), Some(62.5));
        assert_eq!(super::real_secs("nothing"), None);
    }

    #[test]
    fn the_parallel_script_is_shell_that_runs_ten_pods_and_samples_their_memory() {
        let script = super::parallel_script(
            std::path::Path::new("/usr/bin/pangolin"),
            std::path::Path::new("/rootfs"),
        );
        let checked = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .expect("sh");
        assert!(checked.success(), "sh -n: {script}");
        assert!(script.contains("$(seq 10)"), "{script}");
        // A pattern that does not match its own shell's command line.
        assert!(
            script.contains("pgrep -cf '[p]angolin-vmm --config'"),
            "{script}"
        );
    }
}
