//! `cargo xtask fuzz [--time S] [TARGET...]`: builds the libFuzzer targets of `fuzz/` and runs
//! each (or the named ones) for S seconds, printing per target the executions per second, the
//! total executions, the coverage libFuzzer reports at start (the corpus) and at the end, and
//! whether it crashed. `cargo xtask test` runs every target for [`CI_SECONDS`] the same way.
//!
//! cargo-fuzz needs nightly flags; there is only a stable toolchain here, so it runs with
//! `RUSTC_BOOTSTRAP=1`. Targets are built without a sanitizer (the code under test is safe
//! Rust: a bug shows as a panic, which libFuzzer reports as a crash) but with debug assertions
//! and overflow checks, and 16 codegen units (a build of a few minutes instead of ten).
//!
//! The build lives outside the clone, in `~/.cache/pangolin/fuzz-target` (or
//! `$PANGOLIN_FUZZ_TARGET_DIR`): its ~400 crates take about six minutes to build on two cores,
//! and CI runs in a fresh clone each time, so only the first run on a machine pays for them.
//!
//! Each target's checked-in seeds (`fuzz/corpus/<target>/`) are read, never written: what a run
//! finds goes to `fuzz/target/corpus/<target>/`, which later runs start from too. A crash leaves
//! its input in `fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::{cargo, deps, guest};

/// Seconds per target in `cargo xtask test`.
pub const CI_SECONDS: u64 = 20;
/// Default seconds per target for `cargo xtask fuzz`.
const DEFAULT_SECONDS: u64 = 60;
/// The cargo-fuzz release the build is known to work with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Flags of every `cargo fuzz build`/`run`: see the module comment.
const BUILD_FLAGS: [&str; 4] = ["--sanitizer", "none", "--codegen-units", "16"];

/// What one run of a target reported.
#[derive(Debug, Default)]
struct Report {
    execs: u64,
    execs_per_sec: u64,
    cov_start: Option<u64>,
    cov_end: Option<u64>,
    ft_end: Option<u64>,
    crashed: bool,
    artifact: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    guest::root().join("fuzz")
}

/// The targets: one file each in `fuzz/fuzz_targets/`.
fn all_targets() -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Installs cargo-fuzz when it is missing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if deps::find_program("cargo-fuzz").is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install, about a minute)");
    let status = cargo()
        .args([
            "install",
            "--locked",
            "--quiet",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        ])
        .status()
        .context("cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}

/// Where the fuzz build goes (see the module comment).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PANGOLIN_FUZZ_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".cache/pangolin/fuzz-target"),
        None => fuzz_dir().join("target"),
    }
}

/// `cargo fuzz SUBCOMMAND` with the build flags every build and run shares.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(guest::root())
        .args(["fuzz", subcommand])
        .args(BUILD_FLAGS)
        .arg("--target-dir")
        .arg(target_dir())
        .env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn build() -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    eprintln!(
        "xtask: building the fuzz targets (cargo fuzz build, into {})",
        target_dir().display()
    );
    let status = cargo_fuzz("build")
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed");
    }
    eprintln!("xtask: fuzz targets built in {} s", t.elapsed().as_secs());
    Ok(())
}

/// The number after `key` in a libFuzzer status line (`cov: 123 ft: 456 ...`).
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn parse(log: &str) -> Report {
    let mut r = Report::default();
    for line in log.lines() {
        if line.contains("INITED") {
            r.cov_start = field(line, "cov: ");
        }
        if line.contains(" cov: ") {
            r.cov_end = field(line, "cov: ").or(r.cov_end);
            r.ft_end = field(line, "ft: ").or(r.ft_end);
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            r.execs = n.trim().parse().unwrap_or(0);
        }
        if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
            r.execs_per_sec = n.trim().parse().unwrap_or(0);
        }
        if line.contains("deadly signal")
            || line.contains("ERROR: libFuzzer")
            || line.contains("panicked at")
        {
            r.crashed = true;
        }
        if let Some(at) = line.find("Test unit written to ") {
            r.artifact = Some(
                line[at + "Test unit written to ".len()..]
                    .trim()
                    .to_string(),
            );
        }
    }
    r
}

fn run_one(target: &str, seconds: u64) -> anyhow::Result<Report> {
    let dir = fuzz_dir();
    let work = dir.join("target/corpus").join(target);
    let seeds = dir.join("corpus").join(target);
    let logs = dir.join("target/logs");
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&seeds)?;
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)?;
    let status = cargo_fuzz("run")
        .arg(target)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .context("running cargo fuzz run")?;
    let text = std::fs::read_to_string(&log_path)?;
    let mut report = parse(&text);
    if !status.success() {
        report.crashed = true;
    }
    if report.crashed {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("  | {line}");
        }
        eprintln!("  (full log: {})", rel(&log_path));
    }
    Ok(report)
}

fn rel(p: &Path) -> String {
    p.strip_prefix(guest::root())
        .unwrap_or(p)
        .display()
        .to_string()
}

fn show(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// Builds the targets and runs `targets` (all when empty) for `seconds` each.
///
/// # Errors
/// The build failed or a target crashed (its input is in `fuzz/artifacts/<target>/`).
pub fn run(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let known = all_targets()?;
    for t in targets {
        if !known.contains(t) {
            bail!("unknown fuzz target {t} (targets: {})", known.join(" "));
        }
    }
    let targets = if targets.is_empty() {
        known
    } else {
        targets.to_vec()
    };
    build()?;
    let mut rows = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        eprintln!(
            "xtask: fuzz [{}/{}] {t} for {seconds} s",
            i + 1,
            targets.len()
        );
        let r = run_one(t, seconds)?;
        eprintln!(
            "xtask: fuzz {t}: {} execs/s, {} execs, cov {} -> {} (ft {}){}",
            r.execs_per_sec,
            r.execs,
            show(r.cov_start),
            show(r.cov_end),
            show(r.ft_end),
            if r.crashed {
                ", CRASHED"
            } else {
                ", 0 crashes"
            }
        );
        rows.push((t.clone(), r));
    }
    println!(
        "{:<16} {:>9} {:>12} {:>10} {:>8} {:>8}",
        "fuzz target", "execs/s", "execs", "cov start", "cov end", "crashes"
    );
    for (t, r) in &rows {
        println!(
            "{:<16} {:>9} {:>12} {:>10} {:>8} {:>8}",
            t,
            r.execs_per_sec,
            r.execs,
            show(r.cov_start),
            show(r.cov_end),
            u8::from(r.crashed)
        );
    }
    let total: u64 = rows.iter().map(|(_, r)| r.execs).sum();
    let crashed: Vec<&(String, Report)> = rows.iter().filter(|(_, r)| r.crashed).collect();
    println!(
        "fuzz: {} targets, {total} execs, {} crashed",
        rows.len(),
        crashed.len()
    );
    if !crashed.is_empty() {
        for (t, r) in &crashed {
            eprintln!(
                "xtask: fuzz target {t} crashed; input: {}",
                r.artifact.as_deref().unwrap_or("(see its log)")
            );
        }
        bail!("{} fuzz target(s) crashed", crashed.len());
    }
    Ok(())
}

/// `cargo xtask fuzz [--time S] [TARGET...]`.
///
/// # Errors
/// Bad arguments, a failed build or a crash.
pub fn command(args: &[String]) -> anyhow::Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().context("--time needs a number of seconds")?;
                seconds = v.parse().with_context(|| format!("--time {v}"))?;
            }
            t => targets.push(t.to_string()),
        }
    }
    run(seconds, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_is_parsed() {
        let log = "INFO: Seed: 1\n\
            #2\tINITED cov: 120 ft: 300 corp: 5/1Kb exec/s: 0 rss: 40Mb\n\
            #1000\tNEW    cov: 150 ft: 400 corp: 9/2Kb lim: 4 exec/s: 500 rss: 41Mb\n\
            #9000\tDONE   cov: 155 ft: 420 corp: 9/2Kb lim: 4 exec/s: 4500 rss: 41Mb\n\
            stat::number_of_executed_units: 9000\n\
            stat::average_exec_per_sec:     4500\n";
        let r = parse(log);
        assert_eq!(
            (r.cov_start, r.cov_end, r.ft_end),
            (Some(120), Some(155), Some(420))
        );
        assert_eq!((r.execs, r.execs_per_sec, r.crashed), (9000, 4500, false));
        let crash = parse(
            "thread '<unnamed>' panicked at x.rs:1:1:\n==1== ERROR: libFuzzer: deadly signal\n\
             artifact_prefix='a/'; Test unit written to fuzz/artifacts/t/crash-1\n",
        );
        assert!(crash.crashed);
        assert_eq!(crash.artifact.as_deref(), Some("fuzz/artifacts/t/crash-1"));
    }
}
