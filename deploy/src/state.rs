//! What an install did, kept on the node (`<root>/var/lib/pangolin-deploy/state.json`), so that
//! `uninstall` undoes exactly that: the files it put down (restoring what was there before),
//! its containerd change, its node label.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::containerd::Format;
use crate::payload::FileError;

/// The state directory, relative to the root.
pub const STATE_DIR: &str = "var/lib/pangolin-deploy";

/// One file the install put down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstalledFile {
    /// Where, relative to the root.
    pub path: String,
    /// Its SHA-256 as installed.
    pub sha256: String,
    /// The file that was there before, saved under the state directory (relative to it).
    pub backup: Option<String>,
    /// A configuration kept because the operator's differed: the new one went to `path`
    /// as `.new` and `path` is not the installer's.
    pub kept_existing: bool,
}

/// The change made to containerd's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerdChange {
    /// The main configuration file.
    pub config: PathBuf,
    /// Its format.
    pub format: Format,
    /// The runtime handler's name.
    pub handler: String,
    /// Whether the handler table was added (false: the operator had one, left alone).
    pub handler_added: bool,
    /// The drop-in written (format 3).
    pub drop_in: Option<PathBuf>,
    /// The `imports` entry added to the main file (format 3).
    pub import_added: Option<String>,
    /// The main file did not exist and was made by the install.
    pub created_config: bool,
}

/// What one install did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The files put down.
    pub files: Vec<InstalledFile>,
    /// containerd's configuration change.
    pub containerd: Option<ContainerdChange>,
    /// The node labelled, and the label (`key=value`).
    pub node_label: Option<(String, String)>,
}

impl State {
    /// The state file under `root`.
    pub fn file(root: &Path) -> PathBuf {
        root.join(STATE_DIR).join("state.json")
    }

    /// The state of a previous install under `root`, if there is one.
    pub fn load(root: &Path) -> Result<Option<State>, FileError> {
        let path = Self::file(root);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| FileError {
                    what: "parsing",
                    path,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileError {
                what: "reading",
                path,
                source: e,
            }),
        }
    }

    /// Writes it (a temporary file, then a rename).
    pub fn save(&self, root: &Path) -> Result<(), FileError> {
        let path = Self::file(root);
        let dir = root.join(STATE_DIR);
        fs::create_dir_all(&dir).map_err(FileError::on("creating", &dir))?;
        let tmp = dir.join("state.json.new");
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        fs::write(&tmp, json).map_err(FileError::on("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(FileError::on("renaming into", &path))
    }
}
