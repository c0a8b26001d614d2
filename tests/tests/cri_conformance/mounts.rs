//! Volumes and mount propagation. Directory and file volumes share files with the host both
//! ways, read-only ones refuse writes. HostToContainer (`rslave`): a mount the host makes below the
//! volume's source after the container started shows up in the container, on runc and through
//! Pangolin's virtio-fs share alike. Bidirectional (`rshared`): runc propagates the container's
//! mounts back to the host; nothing mounted in a microVM can reach the host through virtio-fs,
//! so Pangolin refuses such a container at CreateContainer, saying why (README, "CRI
//! conformance").

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{Mount, MountPropagation};

use crate::support::{Case, Handler};

/// A host directory made a shared mount point (what kubelet's volume directories are, and what
/// containerd requires of a propagating volume's source); detached with everything below it
/// when dropped (lazily: the case's containers may still hold copies).
struct SharedSource(PathBuf);

impl SharedSource {
    fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let source = SharedSource(dir.to_path_buf());
        mount(&["--bind", path(dir)?, path(dir)?])?;
        mount(&["--make-shared", path(dir)?])?;
        Ok(source)
    }
}

impl Drop for SharedSource {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.0)
            .status();
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn mount(args: &[&str]) -> Result<()> {
    let out = Command::new("mount").args(args).output()?;
    ensure!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn volume(host: &Path, propagation: MountPropagation) -> Mount {
    Mount {
        container_path: "/vol".into(),
        host_path: host.display().to_string(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

pub async fn a_host_to_container_volume_sees_host_mounts_made_after_the_start(
    c: &mut Case,
) -> Result<()> {
    let source = SharedSource::new(&c.dir.join("h2c"))?;
    let (pod, pod_config) = c.pod("h2c").await?;
    let mut config = c.container_config("h2c", &["sleep", "3600"]);
    config.mounts.push(volume(
        &source.0,
        MountPropagation::PropagationHostToContainer,
    ));
    let id = c.run(&pod, &pod_config, config).await?;
    let sub = source.0.join("later");
    std::fs::create_dir_all(&sub)?;
    mount(&["-t", "tmpfs", "tmpfs", path(&sub)?])?;
    std::fs::write(sub.join("file"), "mounted-on-the-host\n")?;
    let seen = c.exec_ok(&id, &["cat", "/vol/later/file"]).await?;
    ensure!(
        seen == "mounted-on-the-host\n",
        "the host's later mount is not in the container: {seen:?}"
    );
    Ok(())
}

pub async fn a_bidirectional_volume_is_mounted_or_refused_saying_why(c: &mut Case) -> Result<()> {
    let source = SharedSource::new(&c.dir.join("bidi"))?;
    let (pod, pod_config) = c.pod("bidi").await?;
    let mut config = c.container_config("bidi", &["sleep", "3600"]);
    config.mounts.push(volume(
        &source.0,
        MountPropagation::PropagationBidirectional,
    ));
    let created = c.run(&pod, &pod_config, config).await;
    match (c.handler, created) {
        (Handler::Runc, Ok(id)) => {
            std::fs::write(source.0.join("file"), "from-the-host\n")?;
            let seen = c.exec_ok(&id, &["cat", "/vol/file"]).await?;
            ensure!(
                seen == "from-the-host\n",
                "the volume is not the host's: {seen:?}"
            );
        }
        (Handler::Runc, Err(e)) => bail!("runc refused a Bidirectional volume: {e:#}"),
        (Handler::Pangolin, Ok(id)) => {
            bail!("container {id} with a Bidirectional volume was accepted")
        }
        (Handler::Pangolin, Err(e)) => {
            let said = format!("{e:#}");
            ensure!(
                said.contains("Bidirectional"),
                "CreateContainer failed without saying why: {said}"
            );
        }
    }
    Ok(())
}

/// Volumes share files with the host both ways: a directory volume shows the host's file and
/// the host sees what the container writes; a read-only volume refuses writes (and the host's
/// directory stays as it was); a file volume shows the host file's content.
pub async fn volumes_share_files_with_the_host_and_a_read_only_one_refuses_writes(
    c: &mut Case,
) -> Result<()> {
    let rw = c.dir.join("vol-rw");
    let ro = c.dir.join("vol-ro");
    for dir in [&rw, &ro] {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("host.txt"), "from-host\n")?;
    }
    let file = c.dir.join("note.txt");
    std::fs::write(&file, "a-file-volume\n")?;
    let (pod, pod_config) = c.pod("volumes").await?;
    let mut config = c.container_config("volumes", &["sleep", "3600"]);
    config.mounts = vec![
        Mount {
            container_path: "/rw".into(),
            host_path: path(&rw)?.into(),
            ..Default::default()
        },
        Mount {
            container_path: "/ro".into(),
            host_path: path(&ro)?.into(),
            readonly: true,
            ..Default::default()
        },
        Mount {
            container_path: "/etc/pangolin-note".into(),
            host_path: path(&file)?.into(),
            readonly: true,
            ..Default::default()
        },
    ];
    let id = c.run(&pod, &pod_config, config).await?;
    let seen = c
        .exec_ok(
            &id,
            &["cat", "/rw/host.txt", "/ro/host.txt", "/etc/pangolin-note"],
        )
        .await?;
    ensure!(
        seen == "from-host\nfrom-host\na-file-volume\n",
        "container read {seen:?}"
    );
    c.exec_ok(&id, &["sh", "-c", "echo from-container > /rw/written.txt"])
        .await?;
    let written = std::fs::read_to_string(rw.join("written.txt")).unwrap_or_default();
    ensure!(
        written == "from-container\n",
        "host read {written:?} from the container's write"
    );
    let refused = c
        .exec(&id, &["sh", "-c", "echo no > /ro/written.txt"])
        .await?;
    ensure!(
        refused.code != 0 && refused.stderr.contains("Read-only file system"),
        "write to the read-only volume: {refused:?}"
    );
    ensure!(
        !ro.join("written.txt").exists(),
        "the read-only volume's host directory was written"
    );
    Ok(())
}
