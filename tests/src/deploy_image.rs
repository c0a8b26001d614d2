//! The installer's OCI image: `pangolin-deploy` and its payload under `/opt/pangolin`, the
//! shared libraries the installer links (it is the only program that runs inside the image; the
//! payload's binaries run on the node), and `kubectl` for the node label when the build host
//! has one. `cargo xtask deploy-image` writes it as an OCI archive (`ctr images import`, or a
//! push to the cluster's registry); the deploy e2e test builds the same image and runs it.
//!
//! Self-contained (std, anyhow and `super::containerd`) so xtask can include it as a module.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The image's name (no registry: it is imported into each node's containerd, or pushed).
pub const IMAGE: &str = "pangolin.local/pangolin-deploy:latest";

/// Where the installer and its payload live in the image.
pub const PREFIX: &str = "opt/pangolin";

/// The shared libraries `binary` loads (absolute paths `ldd` prints, the loader included).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        // "not a dynamic executable": nothing to carry.
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// Where the payload's files come from: a build's binaries, the guest, the configuration,
/// and the two daemons `cargo xtask` installs.
pub struct Sources {
    /// `target/<profile>`: the shim, the CLI, the VMM.
    pub target: PathBuf,
    /// `target/guest`: vmlinux, initramfs.cpio.
    pub guest: PathBuf,
    /// `runtime-config/configuration.toml`.
    pub config: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
    /// vhost-device-vsock.
    pub vhost_device_vsock: PathBuf,
}

/// A program on PATH or in ~/.cargo/bin (where `cargo xtask` installs the cargo-built
/// daemons).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

impl Sources {
    /// The sources of a build in `target` (`<checkout>/target/<profile>`): the checkout's guest
    /// and configuration, the daemons found by [`find_program`].
    pub fn of_build(target: &Path) -> Result<Sources> {
        let target_root = target.parent().context("target/<profile> has no parent")?;
        let checkout = target_root.parent().context("target has no parent")?;
        let daemon = |name: &str| {
            find_program(name)
                .with_context(|| format!("{name} not found on PATH or in ~/.cargo/bin"))
        };
        Ok(Sources {
            target: target.to_path_buf(),
            guest: target_root.join("guest"),
            config: checkout.join("runtime-config/configuration.toml"),
            virtiofsd: daemon("virtiofsd")?,
            vhost_device_vsock: daemon("vhost-device-vsock")?,
        })
    }
}

/// Lays out the payload `pangolin-deploy --from` reads in `dir`.
pub fn stage_payload(s: &Sources, dir: &Path) -> Result<()> {
    let files = [
        (s.target.join("containerd-shim-pangolin-v2"), "bin", 0o755),
        (s.target.join("pangolin"), "bin", 0o755),
        (s.virtiofsd.clone(), "bin", 0o755),
        (s.vhost_device_vsock.clone(), "bin", 0o755),
        (s.target.join("pangolin-vmm"), "libexec", 0o755),
        (s.guest.join("vmlinux"), "share", 0o644),
        (s.guest.join("initramfs.cpio"), "share", 0o644),
    ];
    for (from, sub, mode) in files {
        let name = from.file_name().context("no file name")?;
        copy_into(dir, &from, &Path::new("/").join(sub).join(name), mode)?;
    }
    copy_into(dir, &s.config, Path::new("/etc/configuration.toml"), 0o644)
}

fn copy_into(root: &Path, from: &Path, to: &Path, mode: u32) -> Result<()> {
    let dest = root.join(to.strip_prefix("/").unwrap_or(to));
    fs::create_dir_all(dest.parent().context("no parent")?)?;
    fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Stages the image's root in `stage` (emptied first) from `payload` (the layout
/// `pangolin-deploy --from` reads), the `pangolin-deploy` binary and, if given, `kubectl`; then
/// writes the OCI archive `out`.
pub fn build(
    payload: &Path,
    deploy: &Path,
    kubectl: Option<&Path>,
    stage: &Path,
    out: &Path,
) -> Result<()> {
    let _ = fs::remove_dir_all(stage);
    fs::create_dir_all(stage)?;
    let prefix = stage.join(PREFIX);
    for sub in ["bin", "libexec", "share", "etc"] {
        let from = payload.join(sub);
        if !from.is_dir() {
            bail!("the payload {} has no {sub}/", payload.display());
        }
        fs::create_dir_all(prefix.join(sub))?;
        for entry in fs::read_dir(&from)? {
            let entry = entry?;
            let mode = entry.metadata()?.permissions().mode() & 0o777;
            fs::copy(entry.path(), prefix.join(sub).join(entry.file_name()))?;
            fs::set_permissions(
                prefix.join(sub).join(entry.file_name()),
                fs::Permissions::from_mode(mode),
            )?;
        }
    }
    copy_into(
        stage,
        deploy,
        &Path::new("/").join(PREFIX).join("bin/pangolin-deploy"),
        0o755,
    )?;
    for lib in shared_libraries(deploy)? {
        copy_into(stage, &lib, &lib, 0o755)?;
    }
    if let Some(kubectl) = kubectl {
        copy_into(stage, kubectl, Path::new("/usr/bin/kubectl"), 0o755)?;
        for lib in shared_libraries(kubectl)? {
            copy_into(stage, &lib, &lib, 0o755)?;
        }
    }
    for dir in ["tmp", "host", "proc", "sys", "dev", "etc"] {
        fs::create_dir_all(stage.join(dir))?;
    }
    let entry = format!("/{PREFIX}/bin/pangolin-deploy");
    super::containerd::write_oci_archive(stage, IMAGE, &[entry.as_str(), "--help"], out)
}
