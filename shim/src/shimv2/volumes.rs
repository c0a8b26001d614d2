//! A container's host bind mounts (CRI volumes, `ctr run --mount`, the sandbox's hosts,
//! resolv.conf, hostname and shm files) shared with the guest: each source is bind-mounted at
//! `<shared>/<container>/mounts/<n>`, read-only there too (with its submounts) when the spec
//! says `ro` or `rro`, and read-only before it is attached, so virtiofsd's copy is too
//! ([`super::bind`]); the guest
//! spec's mount source becomes that path under the guest's virtio-fs mount. The guest's
//! libcontainer then makes the container's bind mount (with its options and propagation), so
//! writes to a read-write volume land in the host directory.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use super::bind::bind;

/// A volume could not be shared.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The mount has no source, or it is relative.
    #[error("mount {destination}: bind source {host:?} must be an absolute host path")]
    BadSource {
        /// The mount's destination in the container.
        destination: PathBuf,
        /// Its source.
        host: Option<PathBuf>,
    },
    /// The host path does not exist (or cannot be read).
    #[error("mount {destination}: host path {host} does not exist")]
    Missing {
        /// The mount's destination in the container.
        destination: PathBuf,
        /// The missing host path.
        host: PathBuf,
    },
    /// Creating the mount point or the bind mount failed.
    #[error("mount {destination}: sharing host path {host} with the guest")]
    Share {
        /// The mount's destination in the container.
        destination: PathBuf,
        /// The host path.
        host: PathBuf,
        /// Why it failed.
        #[source]
        cause: std::io::Error,
    },
}

/// Whether a spec mount is a bind mount of a host path.
pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Whether the share's bind of `m` is read-only: `ro` or `rro` (containerd passes `rro` for
/// Kubernetes' `recursiveReadOnly: Enabled`). Either way the whole tree: see [`super::bind`].
pub fn readonly_of(m: &Mount) -> bool {
    has_option(m, "ro") || has_option(m, "rro")
}

fn has_option(m: &Mount, name: &str) -> bool {
    m.options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == name))
}

/// Shares every bind mount of `spec` through `<shared>/<id>/mounts/` and rewrites its source to
/// the path under `guest_shared` (the guest's view of `shared`). Mounts made before an error
/// stay below `<shared>/<id>`, which the caller's cleanup unmounts.
pub fn share(
    shared: &Path,
    guest_shared: &Path,
    id: &str,
    spec: &mut Spec,
) -> Result<(), VolumeError> {
    let Some(mounts) = spec.mounts_mut().as_mut() else {
        return Ok(());
    };
    let host_dir = shared.join(id).join("mounts");
    let guest_dir = guest_shared.join(id).join("mounts");
    for (n, m) in mounts.iter_mut().filter(|m| is_bind(m)).enumerate() {
        let destination = m.destination().clone();
        let source = match m.source() {
            Some(s) if s.is_absolute() => s.clone(),
            other => {
                return Err(VolumeError::BadSource {
                    destination,
                    host: other.clone(),
                })
            }
        };
        let meta = std::fs::metadata(&source).map_err(|_| VolumeError::Missing {
            destination: destination.clone(),
            host: source.clone(),
        })?;
        let share_err = |cause: std::io::Error| VolumeError::Share {
            destination: destination.clone(),
            host: source.clone(),
            cause,
        };
        let target = host_dir.join(n.to_string());
        std::fs::create_dir_all(&host_dir).map_err(share_err)?;
        if meta.is_dir() {
            std::fs::create_dir(&target).map_err(share_err)?;
        } else {
            std::fs::File::create(&target).map_err(share_err)?;
        }
        bind(&source, &target, has_option(m, "rbind"), readonly_of(m)).map_err(share_err)?;
        tracing::debug!(destination = %destination.display(), source = %source.display(), "volume shared");
        m.set_source(Some(guest_dir.join(n.to_string())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: &str) -> Spec {
        serde_json::from_str(&format!(r#"{{"ociVersion":"1.0.2","mounts":{mounts}}}"#))
            .expect("spec")
    }

    #[test]
    fn bind_mounts_are_recognised_by_type_or_option() {
        let s = spec(
            r#"[{"destination":"/a","type":"bind","source":"/x"},
                {"destination":"/b","source":"/y","options":["rbind","ro"]},
                {"destination":"/proc","type":"proc","source":"proc"}]"#,
        );
        let binds: Vec<bool> = s
            .mounts()
            .as_ref()
            .expect("mounts")
            .iter()
            .map(is_bind)
            .collect();
        assert_eq!(binds, [true, true, false]);
    }

    #[test]
    fn bad_and_missing_sources_name_the_mount() {
        let dir = std::env::temp_dir().join(format!("pangolin-vol-{}", std::process::id()));
        let mut s = spec(r#"[{"destination":"/data","type":"bind","source":"rel/path"}]"#);
        let err = share(&dir, Path::new("/g"), "c1", &mut s).expect_err("relative");
        assert!(err.to_string().contains("/data"), "{err}");
        let mut s =
            spec(r#"[{"destination":"/data","type":"bind","source":"/nonexistent/pangolin-vol"}]"#);
        let err = share(&dir, Path::new("/g"), "c1", &mut s).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "mount /data: host path /nonexistent/pangolin-vol does not exist"
        );
        let mut s = spec(r#"[{"destination":"/proc","type":"proc","source":"proc"}]"#);
        share(&dir, Path::new("/g"), "c1", &mut s).expect("no binds: nothing to do");
        assert!(!dir.exists(), "nothing created without binds");
    }
}
