//! `cargo xtask <command>`: guest | test | fuzz | demo | bench | install | deploy-image | ctr |
//! testhost. See README.md.

mod bench;
/// The e2e tests' private containerd, shared as source (xtask does not depend on the e2e crate).
#[path = "../../tests/src/containerd.rs"]
#[allow(dead_code)]
mod containerd;
mod cpio;
/// The installer's OCI image, shared as source with the deploy e2e test.
#[path = "../../tests/src/deploy_image.rs"]
mod deploy_image;
mod deps;
mod fuzz;
mod guest;
mod install;
mod testhost;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;

const USAGE: &str =
    "usage: cargo xtask <guest|test|fuzz|demo|bench|stress|install|deploy-image|ctr|testhost> [args]
  guest   build target/guest/{vmlinux,initramfs.cpio}, the test host's kernel and initramfs,
          and target/rootfs/busybox
  test    install what is missing, build the guest, run every test (real VMs), then every fuzz
          target for 20 s
  fuzz [--time S] [TARGET...]
          run every fuzz target of fuzz/ (or the named ones) for S seconds each (default 60):
          execs/s, execs, coverage at start and end, crashes
  demo    run a container in a microVM and show what happened and how long it took
  bench [--runs N] [--json FILE] [--plot DIR] [--only SECTION,...]
          cold-start, throughput and memory figures (median/min/max, ratios against runc and
          their targets) here and in the nested test host; --json writes every figure, --plot
          draws the cold-start distributions as SVG; sections: run, ctr, cri, fs, vmm, nested,
          nested-ctr, parallel
  stress [--cycles N] [--parallel N] [--soak MINUTES] [--workers N] [--handlers pangolin,runc]
          pods through CRI in a private containerd (release build): N sequential cycles (p50/p99
          of each call, drift of containerd's memory and fds), N pods at once per handler (time
          to all ready, host memory per pod), a soak; the leak audit after every step fails the
          run with what was left
  install [--destdir DIR] [--debug]
          install the shim, CLI, VMM, guest kernel/initramfs and /etc/pangolin/configuration.toml
  deploy-image [--out FILE] [--debug]
          the installer's OCI image (pangolin-deploy and its payload) as an OCI archive, for
          deploy/kubernetes/ (no registry needed: import it on each node)
  ctr ARGS...
          build the host binaries, start a private containerd (containerd-shim-pangolin-v2 from
          target/debug on its PATH), import busybox as pangolin.local/busybox:latest, run
          `ctr ARGS` against it, stop it; e.g. `cargo xtask ctr run --rm --runtime
          io.containerd.pangolin.v2 pangolin.local/busybox:latest c1 echo hello`
  testhost [--timeout SECS] [--memory MIB] -- CMD...
          run CMD as root in a nested test host (TCG VM with emulated SVM: real KVM inside)";

/// `cargo xtask stress ARGS`: builds the guest and the release binaries, then runs
/// `target/release/stress ARGS` (the pangolin-e2e binary: the CRI client lives there).
fn stress(args: &[String]) -> anyhow::Result<()> {
    deps::ensure()?;
    guest::build()?;
    let pangolin = build_host(true)?;
    println!("building the stress driver (release)...");
    let mut build = cargo();
    build.current_dir(guest::root()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "pangolin-e2e",
        "--bin",
        "stress",
    ]);
    guest::run(&mut build)?;
    let dir = pangolin.parent().context("target dir")?;
    let status = Command::new(dir.join("stress"))
        .args(args)
        .status()
        .context("running the stress driver")?;
    if !status.success() {
        anyhow::bail!("stress failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the host binaries and returns target/debug/pangolin.
fn build_host(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(guest::root())
        .args(["build", "--quiet", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    guest::run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(guest::root().join("target").join(profile).join("pangolin"))
}

/// The guest and the test host artifacts.
fn build_guests() -> anyhow::Result<guest::Guest> {
    let g = guest::build()?;
    testhost::build()?;
    Ok(g)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    deps::ensure()?;
    build_guests()?;
    build_host(false)?;
    // No doc-tests: there are none, and their empty summary would be the run's last line.
    let mut cmd = cargo();
    cmd.current_dir(guest::root())
        // Every test binary runs even after one failed, so a run shows all its failures.
        .args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--lib",
            "--bins",
            "--tests",
        ])
        .args(args)
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count(rest, " passed");
                failed += count(rest, " failed");
                ignored += count(rest, " ignored");
            }
        }
    }
    let status = child.wait()?;
    // The guest-facing parsers' fuzz targets, briefly: a crash fails the run like a test.
    let fuzzed = fuzz::run(fuzz::CI_SECONDS, &[]);
    if let Err(e) = &fuzzed {
        eprintln!("xtask: fuzzing: {e:#}");
    }
    // Last, so the run's closing line is the test summary.
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        anyhow::bail!("tests failed");
    }
    fuzzed
}

/// The number before `label` in a cargo test summary ("ok. 14 passed; 0 failed; ...").
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn demo() -> anyhow::Result<()> {
    deps::ensure()?;
    let g = guest::build()?;
    let pangolin = build_host(true)?;
    let script = "echo \"hello from a container in a Pangolin microVM\"; \
                  echo \"guest kernel: $(uname -r)  (host: $HOST_KERNEL)\"; \
                  echo \"cpus: $(nproc)  memory: $(free -m | awk '/Mem:/{print $2}') MiB  pid 1 in the container: $(cat /proc/1/comm)\"";
    let host_kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout)
        .trim()
        .to_string();
    println!(
        "$ pangolin run --rootfs {} -- sh -c '...'",
        g.rootfs.display()
    );
    let status = Command::new(&pangolin)
        .args(["run", "--timings", "--rootfs"])
        .arg(&g.rootfs)
        .args([
            "-e",
            &format!("HOST_KERNEL={host_kernel}"),
            "--",
            "sh",
            "-c",
            script,
        ])
        .status()
        .context("running pangolin")?;
    println!("(exit status {})", status.code().unwrap_or(-1));
    println!("boot_ms: VMM start to guest agent ready; create_start_ms: container create + start; teardown_ms: VM shutdown and cleanup");
    if !status.success() {
        anyhow::bail!("the demo container failed");
    }
    demo_containerd(&pangolin, &g.rootfs)
}

/// The same through containerd: a private containerd, a local busybox image, `ctr run`.
fn demo_containerd(pangolin: &std::path::Path, rootfs: &std::path::Path) -> anyhow::Result<()> {
    let shim_dir = pangolin.parent().context("target dir")?;
    let dir = std::env::temp_dir().join(format!("pangolin-demo-containerd-{}", std::process::id()));
    println!();
    let t = std::time::Instant::now();
    let ctrd = containerd::PrivateContainerd::start(&dir, shim_dir)?;
    println!(
        "private containerd {} up in {} ms (its own root/state/socket; {} on its PATH)",
        ctrd.socket.display(),
        t.elapsed().as_millis(),
        shim_dir.join("containerd-shim-pangolin-v2").display()
    );
    let t = std::time::Instant::now();
    ctrd.import_busybox(rootfs, containerd::BUSYBOX_IMAGE)?;
    println!(
        "imported {} in {} ms",
        containerd::BUSYBOX_IMAGE,
        t.elapsed().as_millis()
    );
    let args = [
        "run",
        "--rm",
        "--runtime",
        containerd::PANGOLIN_RUNTIME,
        containerd::BUSYBOX_IMAGE,
        "demo",
        "sh",
        "-c",
        "echo \"hello from containerd, in a Pangolin microVM\"; echo \"guest kernel: $(uname -r)\"",
    ];
    println!(
        "$ ctr run --rm --runtime {} {} demo sh -c '...'",
        containerd::PANGOLIN_RUNTIME,
        containerd::BUSYBOX_IMAGE
    );
    let t = std::time::Instant::now();
    let status = ctrd.ctr(args).status().context("running ctr")?;
    println!(
        "(exit status {}; ctr run --rm wall time {} ms: shim start, VM boot, container, teardown)",
        status.code().unwrap_or(-1),
        t.elapsed().as_millis()
    );
    ctrd.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    println!("stopped containerd; nothing left running");
    if !status.success() {
        anyhow::bail!("the containerd demo failed");
    }
    Ok(())
}

/// `cargo xtask ctr ARGS`: one `ctr` command against a private containerd with busybox imported.
fn ctr(args: &[String]) -> anyhow::Result<ExitCode> {
    if args.is_empty() {
        anyhow::bail!("usage: cargo xtask ctr ARGS... (e.g. `image ls`)");
    }
    deps::ensure()?;
    let rootfs = guest::busybox_rootfs(&guest::root().join("target/rootfs/busybox"))?;
    let pangolin = build_host(false)?;
    let shim_dir = pangolin.parent().context("target dir")?;
    let dir =
        std::env::temp_dir().join(format!("pangolin-xtask-containerd-{}", std::process::id()));
    let ctrd = containerd::PrivateContainerd::start(&dir, shim_dir)?;
    ctrd.import_busybox(&rootfs, containerd::BUSYBOX_IMAGE)?;
    eprintln!(
        "xtask: private containerd {} (namespace {}, log {})",
        ctrd.socket.display(),
        containerd::NAMESPACE,
        ctrd.log.display()
    );
    let status = ctrd
        .ctr(args)
        .stdin(std::process::Stdio::inherit())
        .status()
        .context("running ctr")?;
    ctrd.stop()?;
    std::fs::remove_dir_all(&dir)?;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("guest") => deps::ensure().and_then(|()| build_guests().map(|_| ())),
        Some("test") => test(&args[1..]),
        Some("fuzz") => fuzz::command(&args[1..]),
        Some("demo") => demo(),
        Some("install") => install::install(&args[1..]),
        Some("deploy-image") => install::deploy_image(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("stress") => stress(&args[1..]),
        // Run by `bench` inside the nested test host; not in USAGE.
        Some("bench-ctr") => bench::ctr_command(&args[1..]),
        Some("ctr") => {
            return ctr(&args[1..]).unwrap_or_else(|err| {
                eprintln!("xtask: {err:#}");
                ExitCode::FAILURE
            });
        }
        Some("testhost") => {
            return match deps::ensure().and_then(|()| testhost::run(&args[1..])) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
                Err(err) => {
                    eprintln!("xtask: {err:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
