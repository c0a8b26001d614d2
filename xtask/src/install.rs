//! `cargo xtask install`: what a user puts on a node: the shim, the CLI, the built-in VMM, the
//! guest kernel and initramfs, and `/etc/pangolin/configuration.toml`, at the paths the
//! configuration's defaults name. containerd's own configuration is left to the user (the
//! snippet is printed): an installer that edits it would surprise whoever owns it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::guest;

/// Where things go, relative to the destination root (`/` unless `--destdir`).
const BIN_DIR: &str = "usr/local/bin";
/// The configuration's default `hypervisor.vmm_path` lives here.
const LIBEXEC_DIR: &str = "usr/libexec/pangolin";
/// The configuration's default `hypervisor.kernel` / `initramfs` live here.
const SHARE_DIR: &str = "usr/share/pangolin";
/// `/etc/pangolin/configuration.toml`, the runtime's default configuration path.
const CONFIG: &str = "etc/pangolin/configuration.toml";

const USAGE: &str = "usage: cargo xtask install [--destdir DIR] [--debug]
  --destdir DIR  install under DIR instead of / (packaging, tests)
  --debug        install the debug build (default: release)";

/// Parses the arguments, builds what is missing, installs.
pub fn install(args: &[String]) -> anyhow::Result<()> {
    let mut destdir = PathBuf::from("/");
    let mut release = true;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--destdir" => destdir = it.next().context(USAGE)?.into(),
            "--debug" => release = false,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    crate::deps::ensure()?;
    guest::build()?;
    let pangolin = crate::build_host(release)?;
    let target = pangolin.parent().context("target dir")?;
    let guest_dir = guest::root().join("target/guest");
    let vsock = crate::deps::find_program("vhost-device-vsock")
        .context("vhost-device-vsock not found on PATH or in ~/.cargo/bin")?;
    let virtiofsd = crate::deps::find_program("virtiofsd")
        .context("virtiofsd not found on PATH or in ~/.cargo/bin")?;
    let items = [
        (target.join("containerd-shim-pangolin-v2"), BIN_DIR, 0o755),
        (target.join("pangolin"), BIN_DIR, 0o755),
        (vsock, BIN_DIR, 0o755),
        (virtiofsd, BIN_DIR, 0o755),
        (target.join("pangolin-vmm"), LIBEXEC_DIR, 0o755),
        (guest_dir.join("vmlinux"), SHARE_DIR, 0o644),
        (guest_dir.join("initramfs.cpio"), SHARE_DIR, 0o644),
    ];
    for (from, dir, mode) in &items {
        let name = from.file_name().context("source has no file name")?;
        let to = destdir.join(dir).join(name);
        copy(from, &to, *mode)?;
        println!("installed {}", to.display());
    }
    install_config(&destdir)?;
    if destdir == Path::new("/") {
        let status = Command::new(destdir.join(BIN_DIR).join("pangolin"))
            .arg("check")
            .status()
            .context("running the installed `pangolin check`")?;
        if !status.success() {
            bail!("the installed `pangolin check` failed");
        }
    }
    println!(
        "\ncontainerd: {}/containerd-shim-pangolin-v2 must be on containerd's PATH (it is for a \
         containerd started with a standard PATH). For CRI, add to /etc/containerd/config.toml \
         (containerd 1.6/1.7, version = 2) and restart containerd:\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.pangolin]\n  \
         runtime_type = \"io.containerd.pangolin.v2\"\n  \
         pod_annotations = [\"io.pangolin.*\"]\n\n\
         then: ctr run --rm --runtime io.containerd.pangolin.v2 <image> t1 uname -r\n\
         (containerd 2.x and the Kubernetes RuntimeClass: see README.md)",
        Path::new("/").join(BIN_DIR).display()
    );
    Ok(())
}

/// The documented default configuration; an existing, different one is kept and the new one
/// written beside it as `.new` (as dpkg does with conffiles).
fn install_config(destdir: &Path) -> anyhow::Result<()> {
    let shipped = guest::root().join("runtime-config/configuration.toml");
    let text =
        fs::read_to_string(&shipped).with_context(|| format!("reading {}", shipped.display()))?;
    let dest = destdir.join(CONFIG);
    match fs::read_to_string(&dest) {
        Ok(existing) if existing == text => println!("{} is current", dest.display()),
        Ok(_) => {
            let new = dest.with_extension("toml.new");
            write(&new, text.as_bytes(), 0o644)?;
            println!(
                "kept your {}; the shipped defaults are in {}",
                dest.display(),
                new.display()
            );
        }
        Err(_) => {
            write(&dest, text.as_bytes(), 0o644)?;
            println!("installed {}", dest.display());
        }
    }
    Ok(())
}

/// Copies through a temporary file and a rename, so a running shim or VMM keeps its old binary
/// (overwriting in place fails with ETXTBSY, or corrupts a running one).
fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &data, mode)
}

fn write(to: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = to.parent().context("destination has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.pangolin-install",
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))
}

const DEPLOY_IMAGE_USAGE: &str = "usage: cargo xtask deploy-image [--out FILE] [--debug]
  --out FILE  where the OCI archive goes (default: target/pangolin-deploy.oci.tar)
  --debug     pack the debug build (default: release)";

/// `cargo xtask deploy-image`: the installer's OCI image (`deploy/kubernetes/`), as an OCI
/// archive for `ctr -n k8s.io images import` on each node or a push to the cluster's registry.
pub fn deploy_image(args: &[String]) -> anyhow::Result<()> {
    let mut out = guest::root().join("target/pangolin-deploy.oci.tar");
    let mut release = true;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = it.next().context(DEPLOY_IMAGE_USAGE)?.into(),
            "--debug" => release = false,
            other => bail!("unknown argument {other:?}\n{DEPLOY_IMAGE_USAGE}"),
        }
    }
    crate::deps::ensure()?;
    guest::build()?;
    println!(
        "building the host binaries ({})",
        if release { "release" } else { "debug" }
    );
    let pangolin = crate::build_host(release)?;
    let target = pangolin.parent().context("target dir")?.to_path_buf();
    let sources = crate::deploy_image::Sources::of_build(&target)?;
    let work = target.join("deploy-image");
    let payload = work.join("payload");
    let _ = fs::remove_dir_all(&work);
    crate::deploy_image::stage_payload(&sources, &payload)?;
    let kubectl = Path::new("/usr/bin/kubectl");
    if !kubectl.exists() {
        println!(
            "no /usr/bin/kubectl here (Debian package kubernetes-client): the image cannot \
             label nodes; run the DaemonSet without --label-node and label them yourself"
        );
    }
    crate::deploy_image::build(
        &payload,
        &target.join("pangolin-deploy"),
        kubectl.exists().then_some(kubectl),
        &work.join("rootfs"),
        &out,
    )?;
    let _ = fs::remove_dir_all(&work);
    let size = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} MiB), image {}\n  on each node: ctr -n k8s.io images import {}\n  then: \
         kubectl apply -f deploy/kubernetes/",
        out.display(),
        size >> 20,
        crate::deploy_image::IMAGE,
        out.display()
    );
    Ok(())
}
