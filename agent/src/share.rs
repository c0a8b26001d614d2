//! The pod's virtio-fs share, mounted at [`GUEST_SHARED_DIR`] on the host's first call
//! (GetGuestDetails), not at boot: a VM template is snapshotted before that call, so it has
//! never spoken FUSE, and each of its clones mounts the share its own virtiofsd serves.

use std::sync::Mutex;

use nix::mount::{mount, MsFlags};
use pangolin_protocols::GUEST_SHARED_DIR;

/// The longest virtio-fs tag (the device's config field is 36 bytes).
pub const MAX_TAG_LEN: usize = 36;

/// Mounting the share failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A tag no virtio-fs device can have.
    #[error("share_tag {0:?}: must be 1 to 36 bytes of [A-Za-z0-9_.-]")]
    BadTag(String),
    /// Another tag is already mounted there.
    #[error("share_tag {asked:?}: the share {mounted:?} is already mounted")]
    Other {
        /// The tag asked for.
        asked: String,
        /// The tag mounted.
        mounted: String,
    },
    /// The mount point could not be made.
    #[error("creating {GUEST_SHARED_DIR}")]
    Mkdir(#[source] std::io::Error),
    /// The kernel refused the mount (no such tag, or the device failed).
    #[error("mounting virtio-fs tag {0:?} on {GUEST_SHARED_DIR}")]
    Mount(String, #[source] nix::Error),
}

/// The share's state: which tag is mounted, if any. Calls are serialised, so a repeated first
/// call (the host retrying) mounts once.
#[derive(Debug, Default)]
pub struct Share {
    mounted: Mutex<Option<String>>,
}

impl Share {
    /// Mounts virtio-fs `tag` at [`GUEST_SHARED_DIR`] unless it already is; an empty tag asks
    /// for nothing.
    ///
    /// # Errors
    /// [`ShareError`] for a malformed tag, another tag already mounted, or the kernel's refusal.
    pub fn mount(&self, tag: &str) -> Result<(), ShareError> {
        if tag.is_empty() {
            return Ok(());
        }
        check_tag(tag)?;
        let mut mounted = self
            .mounted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match mounted.as_deref() {
            Some(m) if m == tag => return Ok(()),
            Some(m) => {
                return Err(ShareError::Other {
                    asked: tag.into(),
                    mounted: m.into(),
                })
            }
            None => {}
        }
        std::fs::create_dir_all(GUEST_SHARED_DIR).map_err(ShareError::Mkdir)?;
        mount(
            Some(tag),
            GUEST_SHARED_DIR,
            Some("virtiofs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| ShareError::Mount(tag.into(), e))?;
        tracing::info!(tag, dir = GUEST_SHARED_DIR, "share mounted");
        *mounted = Some(tag.into());
        Ok(())
    }
}

fn check_tag(tag: &str) -> Result<(), ShareError> {
    let ok = tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ShareError::BadTag(tag.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_tag_mounts_nothing() {
        let share = Share::default();
        assert!(share.mount("").is_ok());
        assert!(share.mounted.lock().map(|m| m.is_none()).unwrap_or(false));
    }

    #[test]
    fn hostile_tags_are_refused_before_any_mount() {
        let share = Share::default();
        for tag in ["../etc", "a b", "x\0y", &"t".repeat(37), "/run"] {
            let err = share.mount(tag).expect_err(tag);
            assert!(matches!(err, ShareError::BadTag(_)), "{tag}: {err}");
            assert!(err.to_string().contains("share_tag"), "{err}");
        }
    }

    #[test]
    fn a_second_tag_is_refused_once_one_is_mounted() {
        let share = Share {
            mounted: Mutex::new(Some("pangolin".into())),
        };
        assert!(
            share.mount("pangolin").is_ok(),
            "the same tag again is a no-op"
        );
        let err = share.mount("other").expect_err("other tag");
        assert!(matches!(err, ShareError::Other { .. }), "{err}");
    }
}
