//! Bind mounts made read-only *before* they are attached below the pod's share.
//!
//! The share is a shared mount: every mount made below it propagates into virtiofsd's mount
//! namespace as a new mount instance, with the flags the mount had when it was attached. A
//! classic `mount --bind` followed by `remount,bind,ro` leaves the propagated instance — the one
//! virtiofsd serves the guest from — read-write, so read-only would be enforced by the guest
//! kernel alone. Here the bind is cloned detached (`open_tree(OPEN_TREE_CLONE)`), made
//! read-only on the detached tree (`mount_setattr` with `AT_RECURSIVE`), and only
//! then attached (`move_mount`): every instance, ours and virtiofsd's, is read-only from its
//! first moment. (libcontainer does the same inside the guest.)
//!
//! Read-only is always the whole tree: the guest sees a volume's host submounts as part of one
//! virtio-fs filesystem, not as mounts of their own, so a read-only volume is read-only below
//! its top in the guest whether it was `ro` or `rro`; the host refuses exactly what the guest
//! refuses.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn check(ret: libc::c_long) -> std::io::Result<libc::c_long> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Binds `source` at `target` (with its submounts when `recursive`), read-only on every mount of
/// the tree when `readonly`, the flags set before the mount is visible anywhere.
pub fn bind(source: &Path, target: &Path, recursive: bool, readonly: bool) -> std::io::Result<()> {
    let (src, dst) = (cstr(source)?, cstr(target)?);
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `src` is a valid NUL-terminated path for the duration of the call; open_tree(2)
    // returns a new fd (checked) that we own from here on.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags) })?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("open_tree returned a bad fd"))?;
    // SAFETY: `fd` was just returned by open_tree and is owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    if readonly {
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let at = libc::AT_EMPTY_PATH | libc::AT_RECURSIVE;
        let empty = c"";
        // SAFETY: `tree` is a live detached mount fd, `empty` a valid C string, and `attr` a
        // mount_attr whose size we pass; the kernel only reads it.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                at,
                std::ptr::from_ref(&attr),
                std::mem::size_of::<libc::mount_attr>(),
            )
        })?;
    }
    let empty = c"";
    // SAFETY: `tree` is a live detached mount fd and both paths are valid C strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use nix::mount::{mount, umount2, MntFlags, MsFlags};

    use super::*;

    /// A shared mount at `dir/share` and a process in a mount namespace of its own whose copy
    /// is a slave of it: where virtiofsd serves the guest from.
    struct Fixture {
        dir: std::path::PathBuf,
        observer: Child,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir =
                std::env::temp_dir().join(format!("pangolin-bind-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let share = dir.join("share");
            std::fs::create_dir_all(&share).expect("mkdir");
            mount(
                Some(&share),
                &share,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind");
            mount(
                None::<&str>,
                &share,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
            .expect("shared");
            let observer = Command::new("unshare")
                .args(["-m", "--propagation", "slave", "sleep", "60"])
                .spawn()
                .expect("unshare");
            // The observer's namespace exists once unshare has exec'd sleep.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::fs::read_link(format!("/proc/{}/exe", observer.id()))
                .map_or(true, |e| !e.to_string_lossy().contains("sleep"))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "unshare did not start"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Fixture { dir, observer }
        }

        /// The mount options of `path` as the observer (virtiofsd) sees it.
        fn observed(&self, path: &Path) -> String {
            let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.observer.id()))
                .expect("mountinfo");
            info.lines()
                .find(|l| l.split(' ').nth(4) == Some(&*path.to_string_lossy()))
                .and_then(|l| l.split(' ').nth(5))
                .unwrap_or("<absent>")
                .to_string()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = self.observer.kill();
            let _ = self.observer.wait();
            for m in crate::shimv2::rootfs::mounts_below(&self.dir).iter().rev() {
                let _ = mount(
                    None::<&str>,
                    m,
                    None::<&str>,
                    MsFlags::MS_PRIVATE,
                    None::<&str>,
                );
                let _ = umount2(m, MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A source directory with a tmpfs mounted inside it at `sub`.
    fn source_with_submount(f: &Fixture) -> std::path::PathBuf {
        let src = f.dir.join("src");
        std::fs::create_dir_all(src.join("sub")).expect("mkdir");
        mount(
            Some("tmpfs"),
            &src.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("tmpfs");
        src
    }

    #[test]
    fn read_only_is_read_only_in_the_virtiofsd_namespace_too_top_and_submounts() {
        let f = Fixture::new("rro");
        let src = source_with_submount(&f);
        let target = f.dir.join("share/vol");
        std::fs::create_dir(&target).expect("mkdir");
        bind(&src, &target, true, true).expect("bind");
        let top = f.observed(&target);
        let sub = f.observed(&target.join("sub"));
        assert!(
            top.split(',').any(|o| o == "ro"),
            "top seen by virtiofsd: {top}"
        );
        assert!(
            sub.split(',').any(|o| o == "ro"),
            "submount seen by virtiofsd: {sub}"
        );
        let err = std::fs::write(target.join("sub/f"), "x").expect_err("read-only here too");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        std::fs::write(src.join("sub/f"), "x").expect("the host's own mount stays writable");
    }

    #[test]
    fn a_writable_bind_stays_writable() {
        let f = Fixture::new("rw");
        let src = source_with_submount(&f);
        let rw = f.dir.join("share/rw");
        std::fs::create_dir(&rw).expect("mkdir");
        bind(&src, &rw, true, false).expect("bind");
        assert!(
            f.observed(&rw).split(',').any(|o| o == "rw"),
            "{}",
            f.observed(&rw)
        );
        assert!(f.observed(&rw.join("sub")).split(',').any(|o| o == "rw"));
        std::fs::write(rw.join("sub/f"), "x").expect("writable");
    }
}
