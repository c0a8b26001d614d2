//! Installs what a fresh machine lacks (Debian packages, cargo tools), so that `cargo xtask demo`
//! and `cargo xtask test` work on a new machine. Needs root for apt-get.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// (file that proves the package is installed, Debian package).
const APT: &[(&str, &str)] = &[
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    // For building virtiofsd (cargo install): it links libcap-ng and libseccomp.
    ("/usr/include/cap-ng.h", "libcap-ng-dev"),
    ("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
    ("/usr/bin/bc", "bc"),
    ("/usr/bin/flex", "flex"),
    ("/usr/bin/bison", "bison"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ("/usr/lib/x86_64-linux-gnu/libseccomp.a", "libseccomp-dev"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/make", "make"),
    ("/usr/bin/xz", "xz-utils"),
    // containerd + ctr for the containerd e2e tests (never started as a service: each test runs
    // a private instance) and runc, the reference runtime those tests compare with.
    ("/usr/bin/containerd", "containerd"),
    ("/usr/sbin/runc", "runc"),
    // protoc for the CRI client the e2e tests build (k8s-cri generates its code at build time),
    // and the CNI plugins CRI pods get their network from (bridge + host-local).
    ("/usr/bin/protoc", "protobuf-compiler"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    // The shim's CRI port-forward rule in each pod namespace (and the CNI bridge's masquerade).
    ("/usr/sbin/iptables", "iptables"),
    // The CRI conformance suite's private registry (image pulls by tag and digest); never
    // started as a service.
    ("/usr/bin/docker-registry", "docker-registry"),
    // The metrics test scrapes `pangolin monitor` with a real Prometheus (never a service).
    ("/usr/bin/prometheus", "prometheus"),
];

/// Cargo-installed daemons, pinned: their command lines are part of our contract.
/// (program, version, what it is for, how long its build takes here)
const CARGO_TOOLS: &[(&str, &str, &str)] = &[
    // vhost-user vsock for the QEMU backend.
    ("vhost-device-vsock", "0.3.0", "about a minute"),
    // virtio-fs for both backends: the Rust virtiofsd filters every thread that serves the
    // guest (Debian QEMU's C virtiofsd left one helper thread unfiltered).
    ("virtiofsd", "1.14.0", "about two minutes"),
];

/// A program on PATH or in ~/.cargo/bin (where [`ensure`] installs cargo tools); shared with
/// the e2e tests through `deploy_image.rs`.
pub use crate::deploy_image::find_program;

/// Installs the missing Debian packages and cargo tools.
pub fn ensure() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(f, _)| !Path::new(f).exists())
        .map(|(_, p)| *p)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        if !nix_is_root() {
            bail!(
                "missing Debian packages ({}) and not root: install them first",
                missing.join(" ")
            );
        }
        let update = Command::new("apt-get")
            .args(["update", "-qq"])
            .status()
            .context("apt-get update")?;
        if !update.success() {
            bail!("apt-get update failed");
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("apt-get install")?;
        if !status.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    for (program, version, takes) in CARGO_TOOLS {
        if has_version(program, version) {
            continue;
        }
        eprintln!("xtask: installing {program} {version} (cargo install, {takes})");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "--locked",
                "--quiet",
                "--force",
                &format!("{program}@{version}"),
            ])
            .status()
            .with_context(|| format!("cargo install {program}"))?;
        if !status.success() {
            bail!("cargo install {program}@{version} failed");
        }
    }
    Ok(())
}

/// Whether `program` is found and says it is `version` (`--version` prints "<name> <version>").
fn has_version(program: &str, version: &str) -> bool {
    let Some(path) = find_program(program) else {
        return false;
    };
    Command::new(path).arg("--version").output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .any(|w| w == version)
    })
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
