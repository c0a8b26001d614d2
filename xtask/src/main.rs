//! `cargo xtask <command>`: guest | test | demo | bench. See README.md.

mod bench;
mod cpio;
mod deps;
mod guest;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;

const USAGE: &str = "usage: cargo xtask <guest|test|demo|bench> [args]
  guest   build target/guest/{vmlinux,initramfs.cpio.gz} and target/rootfs/busybox
  test    install what is missing, build the guest, run every test (real VMs)
  demo    run a container in a microVM and show what happened and how long it took
  bench   time `pangolin run -- true` over repeated runs (median/min/max)";

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the host binaries and returns target/debug/pangolin.
fn build_host(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(guest::root()).args(["build", "--quiet", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    guest::run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(guest::root().join("target").join(profile).join("pangolin"))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    deps::ensure()?;
    guest::build()?;
    build_host(false)?;
    guest::run(cargo().current_dir(guest::root()).args(["test", "--workspace"]).args(args))
}

fn demo() -> anyhow::Result<()> {
    deps::ensure()?;
    let g = guest::build()?;
    let pangolin = build_host(true)?;
    let script = "echo \"hello from a container in a Pangolin microVM\"; \
                  echo \"guest kernel: $(uname -r)  (host: $HOST_KERNEL)\"; \
                  echo \"cpus: $(nproc)  memory: $(free -m | awk '/Mem:/{print $2}') MiB  pid 1 in the container: $(cat /proc/1/comm)\"";
    let host_kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim().to_string();
    println!("$ pangolin run --rootfs {} -- sh -c '...'", g.rootfs.display());
    let status = Command::new(&pangolin)
        .args(["run", "--timings", "--rootfs"])
        .arg(&g.rootfs)
        .args(["-e", &format!("HOST_KERNEL={host_kernel}"), "--", "sh", "-c", script])
        .status()
        .context("running pangolin")?;
    println!("(exit status {})", status.code().unwrap_or(-1));
    println!("boot_ms: VMM start to guest agent ready; create_start_ms: container create + start; teardown_ms: VM shutdown and cleanup");
    if !status.success() {
        anyhow::bail!("the demo container failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("guest") => deps::ensure().and_then(|()| guest::build().map(|_| ())),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(),
        Some("bench") => bench::bench(&args[1..]),
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
