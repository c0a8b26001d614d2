//! Images: PullImage by tag and by digest from a registry (the suite's own, plain HTTP on
//! `localhost`), ImageStatus and ListImages show what was pulled, a pulled image runs on the
//! handler, RemoveImage removes every name of it; a pull of what the registry lacks fails
//! naming the image; ImageFsInfo reports the image filesystem.
//!
//! Each case pushes an image of its own (busybox with a command naming the case, so its id is
//! its own too): CRI removes an image by id, with every name it has.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    Image, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest, PullImageRequest,
    RemoveImageRequest, UInt64Value,
};
use pangolin_e2e::busybox;
use pangolin_e2e::containerd::CRI_NAMESPACE;

use crate::support::Case;

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

/// Pushes a busybox image unique to the case to the suite's registry; its name there
/// (`localhost:<port>/c<case>/busybox:v1`).
async fn publish(c: &Case) -> Result<String> {
    let fixture = c.fixture.clone();
    let number = c.number();
    tokio::task::spawn_blocking(move || {
        let registry = fixture.registry()?;
        let local = format!("pangolin.test/c{number}/local:v1");
        let marker = format!("case-{number}");
        fixture
            .ctrd
            .import_image(CRI_NAMESPACE, &busybox(), &local, &["echo", &marker])?;
        let remote = format!("{}/c{number}/busybox:v1", registry.host);
        registry.push(&fixture.ctrd, CRI_NAMESPACE, &local, &remote)?;
        fixture
            .ctrd
            .ctr_in_output(CRI_NAMESPACE, ["images", "rm", &local])?;
        anyhow::Ok(remote)
    })
    .await?
}

async fn pull(c: &mut Case, image: &str) -> Result<String> {
    Ok(c.cri
        .images
        .pull_image(PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await
        .with_context(|| format!("PullImage {image}"))?
        .into_inner()
        .image_ref)
}

async fn image_status(c: &mut Case, image: &str) -> Result<Option<Image>> {
    Ok(c.cri
        .images
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .with_context(|| format!("ImageStatus {image}"))?
        .into_inner()
        .image)
}

async fn listed_ids(c: &mut Case) -> Result<Vec<String>> {
    Ok(c.cri
        .images
        .list_images(ListImagesRequest { filter: None })
        .await
        .context("ListImages")?
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.id)
        .collect())
}

/// An image pulled by tag and again by digest is one image with both names, listed, runs a
/// container on the handler, and is gone by every name once removed.
pub async fn an_image_pulled_by_tag_and_by_digest_runs_and_is_removed_by_every_name(
    c: &mut Case,
) -> Result<()> {
    let tag = publish(c).await?;
    let repo = tag
        .rsplit_once(':')
        .map_or(&tag[..], |(r, _)| r)
        .to_string();
    let id = pull(c, &tag).await?;
    let image = image_status(c, &tag)
        .await?
        .with_context(|| format!("ImageStatus {tag}: no image after the pull"))?;
    ensure!(image.id == id, "ImageStatus id {} != pulled {id}", image.id);
    ensure!(image.repo_tags.contains(&tag), "tags {:?}", image.repo_tags);
    ensure!(image.size > 0, "size {}", image.size);
    let digest_ref = image
        .repo_digests
        .iter()
        .find(|d| d.starts_with(&format!("{repo}@sha256:")))
        .cloned()
        .with_context(|| format!("no digest of {repo}: {:?}", image.repo_digests))?;
    let by_digest = pull(c, &digest_ref).await?;
    ensure!(by_digest == id, "by digest {by_digest}, by tag {id}");
    ensure!(listed_ids(c).await?.contains(&id), "{id} not listed");

    let (pod, pod_config) = c.pod("pulled").await?;
    let mut config = c.container_config("pulled", &["sleep", "3600"]);
    config.image = spec(&tag);
    let container = c.run(&pod, &pod_config, config).await?;
    let out = c.exec_ok(&container, &["echo", "from-the-pull"]).await?;
    ensure!(out == "from-the-pull\n", "exec said {out:?}");
    c.cri.remove_pod(&pod).await?;
    c.forget_pod(&pod);

    c.cri
        .images
        .remove_image(RemoveImageRequest { image: spec(&tag) })
        .await
        .context("RemoveImage")?;
    for name in [&tag, &digest_ref] {
        if let Some(left) = image_status(c, name).await? {
            bail!("{name} still there after RemoveImage: {left:?}");
        }
    }
    ensure!(
        !listed_ids(c).await?.contains(&id),
        "{id} still listed after RemoveImage"
    );
    Ok(())
}

/// A pull of an image the registry does not have fails, naming the image.
pub async fn a_pull_of_an_image_the_registry_lacks_fails_naming_it(c: &mut Case) -> Result<()> {
    let host = {
        let fixture = c.fixture.clone();
        tokio::task::spawn_blocking(move || fixture.registry().map(|r| r.host.clone())).await??
    };
    let absent = format!("{host}/c{}/absent:v1", c.number());
    let err = match pull(c, &absent).await {
        Ok(id) => bail!("pulled {absent} as {id}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains(&absent) && err.contains("not found"),
        "error does not name the image as not found: {err}"
    );
    ensure!(
        image_status(c, &absent).await?.is_none(),
        "a failed pull left an image"
    );
    Ok(())
}

/// How often containerd 1.6 refreshes the snapshot usage ImageFsInfo reports (10 s), and a
/// margin.
const FS_INFO_REFRESH: Duration = Duration::from_secs(25);

/// ImageFsInfo reports the filesystem images are stored on (the snapshotter's directory under
/// containerd's root) and what its snapshots use, once containerd has counted them.
pub async fn image_fs_info_reports_the_image_filesystem_and_its_use(c: &mut Case) -> Result<()> {
    let deadline = Instant::now() + FS_INFO_REFRESH;
    loop {
        let info = c
            .cri
            .images
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .context("ImageFsInfo")?
            .into_inner();
        let fs = info
            .image_filesystems
            .first()
            .context("ImageFsInfo lists no filesystem")?;
        let mountpoint = fs.fs_id.as_ref().map_or("", |f| &f.mountpoint);
        ensure!(
            Path::new(mountpoint).starts_with(&c.fixture.ctrd.dir),
            "mountpoint {mountpoint:?} is not under containerd's directory"
        );
        ensure!(fs.timestamp > 0, "no timestamp: {fs:?}");
        let used = |u: &Option<UInt64Value>| u.as_ref().map_or(0, |u| u.value);
        if used(&fs.used_bytes) > 0 && used(&fs.inodes_used) > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no bytes or inodes used on {mountpoint} within {FS_INFO_REFRESH:?}: {fs:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
