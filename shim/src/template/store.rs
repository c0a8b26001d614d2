//! Templates on disk: one directory per size class under `[template] dir`, each holding the
//! snapshot (`state`, `memory`) and `template.json` (its fingerprint, the input digests and
//! when and how fast it was built), and a lock file per class beside it.
//!
//! The lock serialises everything that decides about or writes a class (so many pods starting
//! at once build its template once); restores read the files without it. A build writes
//! `state.new`/`memory.new` and renames them into place before `template.json`, which is
//! written last and atomically: a template is complete exactly when its `template.json` names
//! its fingerprint. A restoring VMM that opened the previous files keeps reading them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use pangolin_vmm_config::{Fingerprint, SnapshotFiles};
use serde::{Deserialize, Serialize};

use super::fingerprint::Digest;

/// What `template.json` says of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// What the template VM is made of.
    pub fingerprint: Fingerprint,
    /// The input digests it was computed from, with the files' identities.
    pub digests: Vec<Digest>,
    /// The guest's vsock context id (its clones keep it: the guest read it at boot).
    pub guest_cid: u32,
    /// When it was built (seconds since the Unix epoch).
    pub built_unix_s: u64,
    /// How long the build took, boot to snapshot written.
    pub build_ms: u64,
}

/// A template of one size class, complete on disk.
#[derive(Debug, Clone)]
pub struct Template {
    /// The size class, e.g. `1vcpu-256mib`.
    pub class: String,
    /// Its snapshot files and fingerprint.
    pub files: SnapshotFiles,
    /// Its description.
    pub meta: Meta,
}

/// A listed template: its class, its description (None: incomplete or unreadable) and the
/// bytes its files take on disk.
#[derive(Debug)]
pub struct Listed {
    /// The size class.
    pub class: String,
    /// `template.json`, when it is there and readable.
    pub meta: Option<Meta>,
    /// Disk blocks in use (the memory file is sparse).
    pub disk_bytes: u64,
}

/// The template directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The size class of a VM: templates are per (vCPUs, memory, NIC or not).
pub fn class(vcpus: u8, memory_mib: u32, nic: bool) -> String {
    let nic = if nic { "-nic" } else { "" };
    format!("{vcpus}vcpu-{memory_mib}mib{nic}")
}

impl Store {
    /// The templates under `dir`.
    pub fn new(dir: PathBuf) -> Store {
        Store { dir }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn class_dir(&self, class: &str) -> PathBuf {
        self.dir.join(class)
    }

    /// Creates the directory (mode 0700: templates hold a guest's memory).
    ///
    /// # Errors
    /// It cannot be created or its mode set.
    pub fn create(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
    }

    /// Takes `class`'s lock, waiting for another holder (a build) to finish. Blocking: call it
    /// off the async runtime's workers.
    ///
    /// # Errors
    /// The lock file cannot be opened or locked.
    pub fn lock(&self, class: &str) -> io::Result<Flock<File>> {
        self.create()?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.dir.join(format!("{class}.lock")))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))
    }

    /// The snapshot files of `class` (final names), with `fingerprint`.
    pub fn files(&self, class: &str, fingerprint: Fingerprint) -> SnapshotFiles {
        let d = self.class_dir(class);
        SnapshotFiles {
            state: d.join("state"),
            memory: d.join("memory"),
            fingerprint,
        }
    }

    /// Where a build of `class` writes, before [`Store::commit`] moves the files into place.
    ///
    /// # Errors
    /// The class directory cannot be created.
    pub fn staging(&self, class: &str, fingerprint: Fingerprint) -> io::Result<SnapshotFiles> {
        let d = self.class_dir(class);
        std::fs::create_dir_all(&d)?;
        for name in ["state.new", "memory.new"] {
            remove_file(&d.join(name))?;
        }
        Ok(SnapshotFiles {
            state: d.join("state.new"),
            memory: d.join("memory.new"),
            fingerprint,
        })
    }

    /// `class`'s description, if it has a readable one.
    pub fn meta(&self, class: &str) -> Option<Meta> {
        let text = std::fs::read(self.class_dir(class).join("template.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// `class`'s template when it is complete and its fingerprint is `fingerprint`; the name
    /// of the first field that differs otherwise (or why there is none).
    pub fn find(&self, class: &str, fingerprint: &Fingerprint) -> Result<Template, String> {
        let Some(meta) = self.meta(class) else {
            return Err("none built yet".into());
        };
        if let Some(field) = meta.fingerprint.mismatch(fingerprint) {
            return Err(format!("the template's {field} differs"));
        }
        let files = self.files(class, meta.fingerprint.clone());
        if !files.state.is_file() || !files.memory.is_file() {
            return Err("its snapshot files are missing".into());
        }
        Ok(Template {
            class: class.into(),
            files,
            meta,
        })
    }

    /// Moves a finished build's files into place and then writes `meta`: from here on the
    /// template is complete.
    ///
    /// # Errors
    /// A rename or the write failed (the class is then left without a `template.json`).
    pub fn commit(&self, class: &str, staged: &SnapshotFiles, meta: &Meta) -> io::Result<Template> {
        let d = self.class_dir(class);
        remove_file(&d.join("template.json"))?;
        let files = self.files(class, meta.fingerprint.clone());
        std::fs::rename(&staged.memory, &files.memory)?;
        std::fs::rename(&staged.state, &files.state)?;
        let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        let tmp = d.join("template.json.new");
        std::fs::write(&tmp, json)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, d.join("template.json"))?;
        Ok(Template {
            class: class.into(),
            files,
            meta: meta.clone(),
        })
    }

    /// Removes `class`'s template; false when there was none.
    ///
    /// # Errors
    /// It exists but cannot be removed.
    pub fn remove(&self, class: &str) -> io::Result<bool> {
        match std::fs::remove_dir_all(self.class_dir(class)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every class directory, sorted by name.
    ///
    /// # Errors
    /// The directory exists but cannot be read.
    pub fn list(&self) -> io::Result<Vec<Listed>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let class = entry.file_name().to_string_lossy().into_owned();
            let mut disk_bytes = 0;
            for file in std::fs::read_dir(entry.path())?.flatten() {
                if let Ok(m) = file.metadata() {
                    disk_bytes += m.blocks() * 512;
                }
            }
            out.push(Listed {
                meta: self.meta(&class),
                class,
                disk_bytes,
            });
        }
        out.sort_by(|a, b| a.class.cmp(&b.class));
        Ok(out)
    }
}

fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    fn store(name: &str) -> (TestDir, Store) {
        let d = TestDir::new(name);
        // A directory the store creates itself, as it would on a fresh node.
        let s = Store::new(d.path.join("templates"));
        (d, s)
    }

    fn fingerprint(vcpus: u8) -> Fingerprint {
        Fingerprint {
            kernel_sha256: "k".into(),
            initramfs_sha256: Some("i".into()),
            vmm_sha256: "v".into(),
            vcpus,
            memory_mib: 256,
            cmdline: "console=ttyS0".into(),
            host_cpu: "cpu".into(),
            host_kernel: "6.1".into(),
        }
    }

    fn meta(fp: Fingerprint) -> Meta {
        Meta {
            fingerprint: fp,
            digests: Vec::new(),
            guest_cid: 3,
            built_unix_s: 1,
            build_ms: 2,
        }
    }

    /// A build's output: what a template VMM writes to the staged files.
    fn build(s: &Store, class: &str, fp: &Fingerprint) -> Template {
        let staged = s.staging(class, fp.clone()).expect("staging");
        std::fs::write(&staged.state, b"state").expect("state");
        std::fs::write(&staged.memory, b"memory").expect("memory");
        s.commit(class, &staged, &meta(fp.clone())).expect("commit")
    }

    #[test]
    fn a_template_is_found_only_once_committed_and_only_with_its_fingerprint() {
        let (_d, s) = store("find");
        let class = class(1, 256, false);
        assert_eq!(class, "1vcpu-256mib");
        assert_eq!(super::class(2, 512, true), "2vcpu-512mib-nic");
        let fp = fingerprint(1);
        assert_eq!(
            s.find(&class, &fp).expect_err("nothing yet"),
            "none built yet"
        );
        // Staged but not committed: still none (template.json is the commit mark).
        let staged = s.staging(&class, fp.clone()).expect("staging");
        std::fs::write(&staged.state, b"x").expect("write");
        assert!(s.find(&class, &fp).is_err());
        let t = build(&s, &class, &fp);
        assert_eq!(t.files.state, s.dir().join(&class).join("state"));
        let found = s.find(&class, &fp).expect("found");
        assert_eq!(found.meta, meta(fp.clone()));
        assert_eq!(std::fs::read(&found.files.state).expect("read"), b"state");
        let mut other = fp.clone();
        other.kernel_sha256 = "another kernel".into();
        assert_eq!(
            s.find(&class, &other).expect_err("stale"),
            "the template's kernel_sha256 differs"
        );
    }

    #[test]
    fn a_missing_snapshot_file_makes_a_template_unusable() {
        let (_d, s) = store("missing");
        let fp = fingerprint(1);
        let t = build(&s, "c", &fp);
        std::fs::remove_file(&t.files.memory).expect("rm");
        assert_eq!(
            s.find("c", &fp).expect_err("incomplete"),
            "its snapshot files are missing"
        );
    }

    #[test]
    fn list_and_remove() {
        let (_d, s) = store("list");
        assert!(s.list().expect("list of nothing").is_empty());
        build(&s, "2vcpu-512mib", &fingerprint(2));
        build(&s, "1vcpu-256mib", &fingerprint(1));
        let listed = s.list().expect("list");
        let names: Vec<&str> = listed.iter().map(|l| l.class.as_str()).collect();
        assert_eq!(
            names,
            ["1vcpu-256mib", "2vcpu-512mib"],
            "lock files are not classes"
        );
        assert!(listed.iter().all(|l| l.meta.is_some()));
        assert!(s.remove("1vcpu-256mib").expect("rm"));
        assert!(!s.remove("1vcpu-256mib").expect("rm again"));
        assert_eq!(s.list().expect("list").len(), 1);
    }

    #[test]
    fn the_lock_serialises_holders() {
        let (_d, s) = store("lock");
        let held = s.lock("c").expect("lock");
        let s2 = s.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _second = s2.lock("c").expect("second lock");
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "the second holder waits"
        );
        drop(held);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
        waiter.join().expect("join");
    }
}
