//! A private temporary directory for unit tests, removed on drop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// `pangolin-<name>-<pid>-<n>` under the temp dir, created empty.
pub struct TestDir {
    /// Its path.
    pub path: PathBuf,
}

impl TestDir {
    /// A fresh directory whose name starts with `name`.
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pangolin-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("mkdir");
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
