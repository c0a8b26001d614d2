//! Test helpers: a temporary directory and a recording [`FdRegistry`].

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use event_manager::EventSet;

use super::event_handler::{FdRegistry, RegistryError};

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory under the system temp dir (short: Unix socket paths are limited).
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pvs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("mkdir");
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Records what the device registers, as the event loop would see it.
#[derive(Debug, Default)]
pub struct TestRegistry {
    /// Watched fds and their current event sets.
    pub fds: HashMap<RawFd, EventSet>,
}

impl TestRegistry {
    /// The set `fd` is armed with, if watched.
    pub fn armed(&self, fd: RawFd) -> Option<EventSet> {
        self.fds.get(&fd).copied()
    }

    /// An event is delivered on `fd`: a one-shot fd is disarmed until modified.
    pub fn fire(&mut self, fd: RawFd) {
        if let Some(set) = self.fds.get_mut(&fd) {
            if set.contains(EventSet::ONE_SHOT) {
                *set = EventSet::empty();
            }
        }
    }
}

impl FdRegistry for TestRegistry {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), RegistryError> {
        assert!(self.fds.insert(fd, set).is_none(), "fd {fd} added twice");
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), RegistryError> {
        let slot = self.fds.get_mut(&fd).expect("modify of an unwatched fd");
        *slot = set;
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) {
        self.fds.remove(&fd);
    }
}
