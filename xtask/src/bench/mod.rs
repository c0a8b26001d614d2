//! `cargo xtask bench`: cold-start figures of `pangolin run`, printed as median/min/max, and
//! the built-in VMM against QEMU on this host's KVM.

mod ctr;
mod plot;
mod report;
mod tiny_elf;
mod vmm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::{build_host, deps, guest};
pub use ctr::command as ctr_command;
use report::{median, Report};

/// The number `key` of a JSON object line (a `pangolin-timings:` line's payload).
fn field(json: &str, key: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()?
        .get(key)?
        .as_f64()
}

/// The sections of a run, in the order they run; `--only` picks some.
const SECTIONS: [&str; 8] = [
    "run",
    "ctr",
    "cri",
    "fs",
    "vmm",
    "nested",
    "nested-ctr",
    "parallel",
];

/// What the command line asks for.
#[derive(Debug)]
struct Args {
    runs: usize,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    only: Vec<String>,
}

fn parse_args(args: &[String]) -> anyhow::Result<Args> {
    let mut out = Args {
        runs: 10,
        json: None,
        plot: None,
        only: SECTIONS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => out.runs = value()?.parse().context("--runs N")?,
            "--json" => out.json = Some(PathBuf::from(value()?)),
            "--plot" => out.plot = Some(PathBuf::from(value()?)),
            "--only" => {
                out.only = value()?.split(',').map(str::to_string).collect();
                if let Some(bad) = out.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    bail!("--only: unknown section {bad:?} (sections: {})", SECTIONS.join(","));
                }
            }
            other => bail!("unknown argument {other:?} (bench [--runs N] [--json FILE] [--plot DIR] [--only SECTION,...])"),
        }
    }
    if out.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(out)
}

/// Runs the benchmark: `--runs N` repetitions (default 10; fewer where a section is slow),
/// `--json FILE` writes every figure, `--plot DIR` draws the cold-start distributions as SVG,
/// `--only` runs some sections.
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    let args = parse_args(args)?;
    let runs = args.runs;
    let on = |s: &str| args.only.iter().any(|o| o == s);
    deps::ensure()?;
    let g = guest::build()?;
    let pangolin = build_host(true)?;
    let mut report = Report::default();
    if on("run") {
        run_figures(&mut report, runs, &pangolin, &g.rootfs)?;
    }
    if on("ctr") {
        containerd_figures(&mut report, runs, &pangolin, &g.rootfs)?;
    }
    if on("cri") {
        cri_figures(&mut report, runs, &pangolin, &g.rootfs)?;
    }
    if on("fs") {
        fs_figures(&mut report, runs.min(3), &pangolin, &g.rootfs)?;
    }
    if on("vmm") {
        vmm_figures(&mut report, runs, &pangolin)?;
    }
    if on("nested") || on("nested-ctr") || on("parallel") {
        crate::testhost::build()?;
    }
    if on("nested") {
        nested_figures(&mut report, runs.min(3), &pangolin, &g.rootfs)?;
    }
    if on("nested-ctr") {
        nested_ctr_figures(&mut report, runs.min(5), &pangolin, &g.rootfs)?;
    }
    if on("parallel") {
        parallel_template_figures(&mut report, &pangolin, &g.rootfs)?;
    }
    if let Some(file) = &args.json {
        std::fs::write(file, report.to_json())
            .with_context(|| format!("writing {}", file.display()))?;
        println!();
        println!("figures written to {}", file.display());
    }
    if let Some(dir) = &args.plot {
        plots(&report, dir)?;
    }
    Ok(())
}

/// The cold-start SVGs of whatever sections ran.
fn plots(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let plots = [
        (
            "cold-start-nested.svg",
            "ctr run --rm busybox true, nested test host (hardware-virt KVM inside)",
            "nested-ctr",
            &["pangolin-cold", "pangolin-template", "runc"][..],
        ),
        (
            "cold-start-tcg.svg",
            "ctr run --rm busybox true, this machine (pangolin on QEMU/TCG)",
            "ctr",
            &["pangolin", "pangolin-template", "runc"][..],
        ),
        (
            "vm-start-nested.svg",
            "VM start to agent ready, nested test host",
            "nested",
            &["builtin-cold", "builtin-template", "qemu"][..],
        ),
    ];
    for (file, title, section, names) in plots {
        let series: Vec<_> = names
            .iter()
            .filter_map(|n| report.find(section, n))
            .collect();
        if series.is_empty() {
            continue;
        }
        let path = dir.join(file);
        plot::distributions(&path, title, &series)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// `pangolin run --rootfs busybox -- true` with its timings.
fn run_figures(
    report: &mut Report,
    runs: usize,
    pangolin: &Path,
    rootfs: &Path,
) -> anyhow::Result<()> {
    let (mut wall, mut boot, mut guest, mut create, mut teardown) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let t = Instant::now();
        let out = Command::new(pangolin)
            .args(["run", "--timings", "--rootfs"])
            .arg(rootfs)
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
            .find_map(|l| l.strip_prefix("pangolin-timings:"))
            .context("no timings line")?
            .trim();
        wall.push(elapsed);
        boot.push(field(line, "boot_ms").context("boot_ms")?);
        guest.push(field(line, "guest_agent_ready_ms").context("guest_agent_ready_ms")?);
        create.push(field(line, "create_start_ms").context("create_start_ms")?);
        teardown.push(field(line, "teardown_ms").context("teardown_ms")?);
    }
    let host = pangolin_host_summary();
    report.heading(format!(
        "pangolin run --rootfs busybox -- true, {runs} runs, {host}"
    ));
    let s = "run";
    report.series(s, "wall time (process)", "ms", wall);
    report.series(s, "VM start to agent ready", "ms", boot);
    if let Some(m) = report.series(s, "  of which guest clock to agent", "ms", guest) {
        report.single(
            s,
            "guest clock to agent ready (median)",
            "ms",
            m,
            Some(600.0),
        );
    }
    report.series(s, "container create+start", "ms", create);
    report.series(s, "teardown", "ms", teardown);
    Ok(())
}

/// Pods started from one template at once.
const PARALLEL_PODS: usize = 10;

/// The shell script for [`parallel_template_figures`]: builds the template, starts
/// [`PARALLEL_PODS`] `pangolin run`s at once (each container sleeps so that all VMs run
/// together), samples the RSS of every VMM and virtiofsd process once all VMMs run (the test
/// host's kernel has no `smaps_rollup` for PSS), and
/// prints each run's timings.
fn parallel_script(pangolin: &Path, rootfs: &Path) -> String {
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

/// Runs `script` in the nested test host; its stdout, and the host's exit status if not 0.
fn in_test_host(script: &str, timeout_secs: u32) -> anyhow::Result<(String, Option<String>)> {
    let xtask = std::env::current_exe().context("xtask path")?;
    let out = Command::new(xtask)
        .args([
            "testhost",
            "--timeout",
            &timeout_secs.to_string(),
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .context("running the test host")?;
    let failed = (!out.status.success()).then(|| out.status.to_string());
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), failed))
}

/// [`PARALLEL_PODS`] pods started at once from one template in the nested test host: time
/// until all are ready (each run's VM start to agent ready; they start together) and host
/// memory per VM (RSS of its VMM, the guest RAM it holds included, and of its virtiofsd).
fn parallel_template_figures(
    report: &mut Report,
    pangolin: &Path,
    rootfs: &Path,
) -> anyhow::Result<()> {
    let (text, failed) = in_test_host(&parallel_script(pangolin, rootfs), 600)?;
    report.heading(format!(
        "Nested test host: {PARALLEL_PODS} pods started at once from one template"
    ));
    let boot: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("par "))
        .filter_map(|l| field(l, "boot_ms"))
        .collect();
    if boot.len() != PARALLEL_PODS {
        println!(
            "{} of {PARALLEL_PODS} runs reported (test host: {})",
            boot.len(),
            failed.as_deref().unwrap_or("exit 0")
        );
        if boot.is_empty() {
            return Ok(());
        }
    }
    let s = "parallel";
    let all_ready = boot.iter().copied().fold(0.0, f64::max);
    report.series(s, "each: VM start to agent", "ms", boot);
    report.single(s, "all ready (slowest)", "ms", all_ready, None);
    for (kind, label) in [
        ("rss-vmm", "VMM RSS per VM"),
        ("rss-fsd", "virtiofsd RSS per VM"),
    ] {
        let kib: f64 = text
            .lines()
            .filter_map(|l| l.strip_prefix(kind))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum();
        report.single(s, label, "MiB", kib / 1024.0 / PARALLEL_PODS as f64, None);
    }
    Ok(())
}

/// Boot to agent ready for both backends on the nested test host's hardware-virt KVM.
fn nested_figures(
    report: &mut Report,
    runs: usize,
    pangolin: &Path,
    rootfs: &Path,
) -> anyhow::Result<()> {
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
    let (text, failed) = in_test_host(&script, 600)?;
    report.heading(format!("Nested test host (TCG + emulated SVM, hardware-virt KVM inside), VM start to agent ready, {runs} runs each, alternating"));
    let s = "nested";
    let mut medians = Vec::new();
    for (kind, _) in kinds {
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{kind} ")).map(str::trim))
            .filter(|l| l.starts_with('{'))
            .collect();
        if lines.is_empty() {
            println!(
                "{kind:<36} no result (test host: {})",
                failed.as_deref().unwrap_or("exit 0")
            );
            continue;
        }
        let boot: Vec<f64> = lines.iter().filter_map(|l| field(l, "boot_ms")).collect();
        let guest: Vec<f64> = lines
            .iter()
            .filter_map(|l| field(l, "guest_agent_ready_ms"))
            .collect();
        if let Some(m) = report.series(s, kind, "ms", boot) {
            medians.push((kind, m));
        }
        report.series(s, &format!("{kind} guest clock"), "ms", guest);
    }
    let of = |k: &str| medians.iter().find(|(m, _)| *m == k).map(|(_, v)| *v);
    if let (Some(cold), Some(tpl)) = (of("builtin-cold"), of("builtin-template")) {
        report.ratio(s, "builtin template / cold", tpl / cold, Some(0.15));
    }
    Ok(())
}

/// `ctr run --rm busybox true` inside the nested test host: pangolin from a template, pangolin
/// booting its kernel, runc, alternating (the hidden `bench-ctr` command runs there).
fn nested_ctr_figures(
    report: &mut Report,
    runs: usize,
    pangolin: &Path,
    rootfs: &Path,
) -> anyhow::Result<()> {
    let xtask = std::env::current_exe().context("xtask path")?;
    let shim_dir = pangolin.parent().context("target dir")?;
    let script = format!(
        "{} bench-ctr --runs {runs} --shim-dir {} --rootfs {} --cold",
        xtask.display(),
        shim_dir.display(),
        rootfs.display()
    );
    let (text, failed) = in_test_host(&script, 900)?;
    report.heading(format!(
        "Nested test host: ctr run --rm busybox true through a private containerd, {runs} runs each, alternating"
    ));
    let s = "nested-ctr";
    let parsed = ctr::parse(&text);
    if parsed.is_empty() {
        println!(
            "no result (test host: {})",
            failed.as_deref().unwrap_or("exit 0")
        );
        return Ok(());
    }
    let mut medians = Vec::new();
    for (label, samples) in parsed {
        let n = samples.ms.len();
        if let Some(m) = report.series(s, &label, "ms", samples.ms) {
            medians.push((label.clone(), m));
        }
        if label.starts_with("pangolin") {
            let note = format!(
                "{label}: {} of {n} pods started from a template",
                samples.from_template
            );
            println!("{note}");
            report.notes.push(note);
        }
    }
    let of = |k: &str| medians.iter().find(|(m, _)| m == k).map(|(_, v)| *v);
    if let (Some(tpl), Some(runc)) = (of("pangolin-template"), of("runc")) {
        report.ratio(s, "pangolin (template) / runc", tpl / runc, Some(2.0));
    }
    if let (Some(cold), Some(runc)) = (of("pangolin-cold"), of("runc")) {
        report.ratio(s, "pangolin (cold) / runc", cold / runc, None);
    }
    Ok(())
}

/// CRI figures through `cri_bench` (pangolin handler vs runc in one private containerd,
/// alternating): pod start, a TCP stream, P6 ExecSync `echo` latency, P4 `PARALLEL` pods at
/// once (time until all are ready) and P3 host memory per pod; each with its ratio. The CRI
/// client lives in the e2e crate's binary: its code is generated with protoc.
fn cri_figures(
    report: &mut Report,
    runs: usize,
    pangolin: &std::path::Path,
    rootfs: &std::path::Path,
) -> anyhow::Result<()> {
    const PARALLEL: usize = 8;
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
    let out = std::env::temp_dir().join(format!("pangolin-cri-bench-{}.json", std::process::id()));
    let c = "cri";
    report.heading(format!(
        "CRI through a private containerd, bridge CNI network, pangolin handler vs runc \
         alternating ({runs} runs; {} of the stream and of {PARALLEL} pods at once)",
        runs.min(3)
    ));
    let status = Command::new(shim_dir.join("cri_bench"))
        .arg("--runs")
        .arg(runs.to_string())
        .arg("--parallel")
        .arg(PARALLEL.to_string())
        .arg("--shim-dir")
        .arg(shim_dir)
        .arg("--busybox")
        .arg(rootfs)
        .arg("--out")
        .arg(&out)
        .status()
        .context("running cri_bench")?;
    if !status.success() {
        bail!("cri_bench failed ({status})");
    }
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    let series: Vec<serde_json::Value> =
        serde_json::from_str(&text).context("cri_bench's figures")?;
    let mut medians = std::collections::HashMap::new();
    for s in &series {
        let name = s["name"].as_str().unwrap_or_default();
        let unit = match s["unit"].as_str() {
            Some("MiB/s") => "MiB/s",
            Some("MiB") => "MiB",
            _ => "ms",
        };
        let values: Vec<f64> = s["values"]
            .as_array()
            .map(|v| v.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        if let Some(m) = report.series(c, name, unit, values) {
            medians.insert(name.to_string(), m);
        }
    }
    let (ready, memory) = (
        format!("{PARALLEL} pods at once, all ready"),
        format!("host memory per pod, {PARALLEL} at once"),
    );
    let ratios = [
        ("pod start", "pod start pangolin / runc"),
        ("TCP stream", "TCP stream pangolin / runc"),
        ("ExecSync echo", "P6 ExecSync echo pangolin / runc"),
        (ready.as_str(), "P4 all ready pangolin / runc"),
        (memory.as_str(), "P3 memory per pod pangolin / runc"),
    ];
    for (what, label) in ratios {
        let pg = medians.get(&format!("pangolin {what}"));
        let rc = medians.get(&format!("runc {what}"));
        if let (Some(pg), Some(rc)) = (pg, rc) {
            report.ratio(c, label, pg / rc, None);
        }
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
    report: &mut Report,
    runs: usize,
    pangolin: &Path,
    rootfs: &Path,
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
    report.heading(format!("P7 virtio-fs sequential throughput, 64 MiB busybox dd bs=1M (write with fsync; the read file is fresh to the guest), {runs} runs"));
    let f = "fs";
    let gw = report.series(f, "write, guest", "MiB/s", gw);
    let hw = report.series(f, "write, host", "MiB/s", hw);
    let gr = report.series(f, "read, guest", "MiB/s", gr);
    let hr = report.series(f, "read, host", "MiB/s", hr);
    if let (Some(g), Some(h)) = (gw, hw) {
        report.ratio(f, "write guest / host", g / h, None);
    }
    if let (Some(g), Some(h)) = (gr, hr) {
        report.ratio(f, "read guest / host", g / h, None);
    }
    Ok(())
}

/// Built-in VMM vs QEMU microvm on the local KVM, alternating.
fn vmm_figures(report: &mut Report, runs: usize, pangolin: &Path) -> anyhow::Result<()> {
    if !Path::new("/dev/kvm").exists() {
        println!("VMM comparison: not run (no /dev/kvm on this host)");
        return Ok(());
    }
    let vmm_bin = pangolin.with_file_name("pangolin-vmm");
    let dir = vmm::scratch()?;
    let kernel = dir.join("tiny-pvh.elf");
    std::fs::write(&kernel, tiny_elf::image())?;
    let (mut b_first, mut q_first, mut b_pss, mut q_pss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let b = vmm::builtin(&vmm_bin, &kernel, &dir)?;
        let q = vmm::qemu(&kernel, &dir)?;
        b_first.push(b.first_output_ms);
        q_first.push(q.first_output_ms);
        b_pss.push(b.pss_kib as f64 / 1024.0);
        q_pss.push(q.pss_kib as f64 / 1024.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    report.heading(format!(
        "VMM exec to first guest instruction (a PVH stub's first OUT to COM1), this host's KVM ({}), {} runs each, alternating",
        if Path::new("/sys/module/kvm_pvm").exists() { "PVM" } else { "hardware" },
        b_first.len()
    ));
    let v = "vmm";
    let bf = report.series(v, "builtin (pangolin-vmm)", "ms", b_first);
    let qf = report.series(v, "QEMU microvm", "ms", q_first);
    if let (Some(b), Some(q)) = (bf, qf) {
        report.ratio(v, "builtin / QEMU", b / q, Some(0.2));
    }
    report.single(
        v,
        "builtin VMM PSS without guest RAM",
        "MiB",
        median(&b_pss),
        Some(5.0),
    );
    report.single(v, "QEMU PSS without guest RAM", "MiB", median(&q_pss), None);
    Ok(())
}

fn pangolin_host_summary() -> String {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        "QEMU TCG (this host's KVM is PVM)".into()
    } else {
        "backend auto".into()
    }
}

/// P1: `ctr run --rm busybox true` with the pangolin runtime and with runc, alternating, on
/// this machine.
fn containerd_figures(
    report: &mut Report,
    runs: usize,
    pangolin: &Path,
    rootfs: &Path,
) -> anyhow::Result<()> {
    use ctr::Kind;
    let shim_dir = pangolin.parent().context("target dir")?;
    // Where pods may start from a template here (hardware KVM), the template is built first.
    let templates = Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists();
    let samples = ctr::rounds(
        runs,
        shim_dir,
        rootfs,
        &[Kind::Pangolin, Kind::Runc],
        templates,
    )?;
    report.heading(format!(
        "ctr run --rm busybox true through a private containerd, {runs} runs each, alternating, {}",
        pangolin_host_summary()
    ));
    let c = "ctr";
    let mut medians = vec![];
    for (kind, samples) in samples {
        medians.push(report.series(c, kind.label(templates), "ms", samples.ms));
    }
    if let [Some(pg), Some(rc)] = medians[..] {
        report.ratio(c, "pangolin / runc", pg / rc, Some(6.0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    fn args(line: &str) -> anyhow::Result<super::Args> {
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        super::parse_args(&words)
    }

    #[test]
    fn arguments_name_files_and_sections_and_bad_ones_are_refused_by_name() {
        let a = args("--runs 3 --json /tmp/b.json --plot /tmp/plots --only nested,nested-ctr")
            .expect("args");
        assert_eq!(a.runs, 3);
        assert_eq!(a.json.as_deref(), Some(std::path::Path::new("/tmp/b.json")));
        assert_eq!(a.plot.as_deref(), Some(std::path::Path::new("/tmp/plots")));
        assert_eq!(a.only, ["nested", "nested-ctr"]);
        assert_eq!(
            args("").expect("defaults").only.len(),
            super::SECTIONS.len()
        );
        for (bad, says) in [
            ("--only nested,bogus", "\"bogus\""),
            ("--runs 0", "at least 1"),
            ("--json", "--json needs a value"),
            ("--frobnicate", "--frobnicate"),
        ] {
            let err = args(bad).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_timings_line_gives_its_numbers() {
        let line = r#"{"started_from":"template","boot_ms":1065.1,"guest_agent_ready_ms":1747.6}"#;
        assert_eq!(super::field(line, "boot_ms"), Some(1065.1));
        assert_eq!(super::field(line, "started_from"), None);
        assert_eq!(super::field("not json", "boot_ms"), None);
    }

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
