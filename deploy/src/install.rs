//! `install` and `uninstall`: the files, containerd's configuration, containerd's restart and
//! the node label, each recorded in the [`State`] so that `uninstall` undoes exactly what
//! `install` did and nothing the operator did.

use std::fs;
use std::path::{Path, PathBuf};

use crate::containerd::{self, Added, ConfigError, Format};
use crate::node::{self, Restart, RestartError};
use crate::payload::{self, FileError, ITEMS};
use crate::state::{ContainerdChange, InstalledFile, State, STATE_DIR};

/// The label the RuntimeClass's `scheduling.nodeSelector` selects nodes by.
pub const NODE_LABEL: (&str, &str) = ("pangolin.io/runtime", "true");

/// An install or uninstall failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The payload lacks files.
    #[error("the payload in {from} lacks {missing:?}")]
    Payload {
        /// The payload directory.
        from: PathBuf,
        /// What is missing.
        missing: Vec<PathBuf>,
    },
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// containerd's configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// containerd could not be restarted, or the node labelled.
    #[error(transparent)]
    Restart(#[from] RestartError),
}

/// What to install from where, and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node's root as the installer sees it (`/host` in the DaemonSet, `/` on the node).
    pub root: PathBuf,
    /// The payload directory.
    pub from: PathBuf,
    /// containerd's main configuration file, as the installer sees it.
    pub containerd_config: PathBuf,
    /// containerd's version when the file does not say its format (`1.6.20`, `2.0.4`); None:
    /// asked from the node's `containerd --version`.
    pub containerd_version: Option<String>,
    /// The CRI runtime handler name (the RuntimeClass's `handler`).
    pub handler: String,
    /// How containerd is restarted afterwards.
    pub restart: Restart,
    /// The Kubernetes node to label (`pangolin.io/runtime=true`), if any.
    pub label_node: Option<String>,
}

impl Options {
    /// `path` as the node sees it: without the root prefix the installer sees it under.
    fn on_node(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root)
            .map_or_else(|_| path.to_path_buf(), |rest| Path::new("/").join(rest))
    }
}

/// Installs: the payload's files, the runtime handler, the restart, the label. Run again, it
/// refreshes the files and keeps the rest of what the first install did.
pub fn install(o: &Options) -> Result<State, DeployError> {
    let missing = payload::missing(&o.from);
    if !missing.is_empty() {
        return Err(DeployError::Payload {
            from: o.from.clone(),
            missing,
        });
    }
    let before = State::load(&o.root)?.unwrap_or_default();
    let mut state = State {
        files: install_files(o, &before)?,
        containerd: before.containerd.clone(),
        node_label: before.node_label.clone(),
    };
    state.save(&o.root)?;
    if state.containerd.is_none() {
        state.containerd = Some(add_handler(o)?);
        state.save(&o.root)?;
    }
    node::containerd(o.restart, &o.root)?;
    if let (Some(node), None) = (&o.label_node, &state.node_label) {
        let label = (NODE_LABEL.0.to_string(), NODE_LABEL.1.to_string());
        node::label_node(node, Some(&label))?;
        state.node_label = Some((node.clone(), format!("{}={}", label.0, label.1)));
        state.save(&o.root)?;
    }
    Ok(state)
}

fn install_files(o: &Options, before: &State) -> Result<Vec<InstalledFile>, DeployError> {
    let ours = |to: &str| {
        before
            .files
            .iter()
            .find(|f| f.path == to && !f.kept_existing)
    };
    let mut files = Vec::new();
    for item in ITEMS {
        let from = o.from.join(item.from);
        let to = o.root.join(item.to);
        let sha256 = payload::digest(&from)?;
        let previous = ours(item.to);
        if item.config && to.exists() && previous.is_none() {
            // The operator's configuration stays; the new defaults go beside it.
            let beside = format!("{}.new", item.to);
            payload::copy(&from, &o.root.join(&beside), item.mode)?;
            files.push(InstalledFile {
                path: beside,
                sha256,
                backup: None,
                kept_existing: true,
            });
            continue;
        }
        let backup = match previous {
            Some(p) => p.backup.clone(),
            None if to.exists() => {
                let saved = format!("backup/{}", item.to);
                payload::copy(&to, &o.root.join(STATE_DIR).join(&saved), item.mode)?;
                Some(saved)
            }
            None => None,
        };
        payload::copy(&from, &to, item.mode)?;
        files.push(InstalledFile {
            path: item.to.into(),
            sha256,
            backup,
            kept_existing: false,
        });
    }
    // What an earlier version installed and this one does not (a renamed file: the initramfs
    // was `initramfs.cpio.gz` before it was uncompressed) goes as an uninstall would take it,
    // its backup put back; otherwise it would stay on the node, recorded nowhere.
    for old in before
        .files
        .iter()
        .filter(|old| files.iter().all(|f| f.path != old.path))
    {
        remove_file(o, old)?;
    }
    Ok(files)
}

fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileError {
            what: "reading",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Writes `text` to `path` through a temporary file and a rename, keeping the mode.
fn write_atomically(path: &Path, text: &str) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(FileError::on("creating", dir))?;
    let tmp = dir.join(".pangolin-deploy.tmp");
    fs::write(&tmp, text).map_err(FileError::on("writing", &tmp))?;
    if let Ok(meta) = fs::metadata(path) {
        fs::set_permissions(&tmp, meta.permissions()).map_err(FileError::on("chmod", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(FileError::on("renaming into", path))
}

fn add_handler(o: &Options) -> Result<ContainerdChange, DeployError> {
    let config = &o.containerd_config;
    let shown = config.display().to_string();
    let text = read_optional(config)?;
    let given = o.containerd_version.as_deref();
    let format = match containerd::detect(&shown, text.as_deref(), given) {
        // The file does not say: the node's containerd does.
        Err(ConfigError::Undetected(_)) if given.is_none() => {
            let version = node::containerd_version(&o.root).ok();
            containerd::detect(&shown, text.as_deref(), version.as_deref())?
        }
        other => other?,
    };
    let mut change = ContainerdChange {
        config: config.clone(),
        format,
        handler: o.handler.clone(),
        handler_added: false,
        drop_in: None,
        import_added: None,
        created_config: text.is_none(),
    };
    let current = text.unwrap_or_default();
    match format {
        Format::V2 => {
            if let Added::Added(new) = containerd::add_handler(&shown, &current, &o.handler)? {
                write_atomically(config, &new)?;
                change.handler_added = true;
            }
        }
        Format::V3 => {
            let dir = config.parent().unwrap_or(Path::new("/")).join("conf.d");
            let drop_in = dir.join(format!("{}.toml", o.handler));
            write_atomically(&drop_in, &containerd::drop_in(&o.handler))?;
            change.drop_in = Some(drop_in.clone());
            change.handler_added = true;
            let import = o.on_node(&drop_in).display().to_string();
            let glob = o.on_node(&dir.join("*.toml")).display().to_string();
            if let Some(new) = containerd::add_import(&shown, &current, &import, &glob)? {
                write_atomically(config, &new)?;
                change.import_added = Some(import);
            }
        }
    }
    Ok(change)
}

/// Undoes what the recorded install did; None when nothing was installed under the root.
pub fn uninstall(o: &Options) -> Result<Option<State>, DeployError> {
    let Some(state) = State::load(&o.root)? else {
        return Ok(None);
    };
    if let Some((node, label)) = &state.node_label {
        let key = label.split('=').next().unwrap_or(label);
        node::label_node(node, None).or_else(|e| {
            // The node may be gone (a cluster scaled down): nothing to unlabel.
            tracing::warn!(error = %e, node, key, "could not remove the node label");
            Ok::<(), RestartError>(())
        })?;
    }
    if let Some(change) = &state.containerd {
        remove_handler(change)?;
    }
    for file in state.files.iter().rev() {
        remove_file(o, file)?;
    }
    node::containerd(o.restart, &o.root)?;
    let dir = o.root.join(STATE_DIR);
    fs::remove_dir_all(&dir).map_err(FileError::on("removing", &dir))?;
    Ok(Some(state))
}

fn remove_handler(change: &ContainerdChange) -> Result<(), DeployError> {
    let config = &change.config;
    let shown = config.display().to_string();
    if let Some(drop_in) = &change.drop_in {
        match fs::remove_file(drop_in) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::on("removing", drop_in)(e).into()),
        }
    }
    let Some(text) = read_optional(config)? else {
        return Ok(());
    };
    let mut new = text.clone();
    if change.format == Format::V2 && change.handler_added {
        new = containerd::remove_handler(&shown, &new, &change.handler)?;
    }
    if let Some(import) = &change.import_added {
        new = containerd::remove_import(&shown, &new, import)?;
    }
    let trivial = new
        .lines()
        .all(|l| l.trim().is_empty() || l.trim().starts_with("version"));
    if change.created_config && trivial {
        fs::remove_file(config).map_err(FileError::on("removing", config))?;
    } else if new != text {
        write_atomically(config, &new)?;
    }
    Ok(())
}

fn remove_file(o: &Options, file: &InstalledFile) -> Result<(), DeployError> {
    let path = o.root.join(&file.path);
    let current = if path.exists() {
        Some(payload::digest(&path)?)
    } else {
        None
    };
    if let Some(backup) = &file.backup {
        let saved = o.root.join(STATE_DIR).join(backup);
        fs::rename(&saved, &path).map_err(FileError::on("restoring", &path))?;
        return Ok(());
    }
    match current {
        Some(sha) if sha == file.sha256 => {
            fs::remove_file(&path).map_err(FileError::on("removing", &path))?;
            // Pangolin's own directories, when nothing else is in them.
            if let Some(d) = path.parent().filter(|d| d.ends_with("pangolin")) {
                let _ = fs::remove_dir(d);
            }
        }
        Some(_) => tracing::warn!(
            path = %path.display(),
            "changed since the install: left in place"
        ),
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node root and a payload of every item, under a fresh temp directory.
    fn staged(tag: &str) -> (PathBuf, Options) {
        let dir = std::env::temp_dir().join(format!("pg-deploy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let from = dir.join("payload");
        for item in ITEMS {
            let path = from.join(item.from);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, item.from).expect("payload file");
        }
        let root = dir.join("root");
        let containerd_config = root.join("etc/containerd/config.toml");
        fs::create_dir_all(containerd_config.parent().expect("parent")).expect("mkdir");
        fs::write(&containerd_config, "version = 2\n").expect("containerd config");
        let o = Options {
            root,
            from,
            containerd_config,
            containerd_version: None,
            handler: "pangolin".into(),
            restart: Restart::None,
            label_node: None,
        };
        (dir, o)
    }

    #[test]
    fn a_file_an_earlier_install_put_down_and_this_one_does_not_is_removed() {
        let (dir, o) = staged("upgrade");
        install(&o).expect("first install");
        // As an earlier version would have left it: one file more in the state and on disk.
        let stale = "usr/share/pangolin/initramfs.cpio.gz";
        fs::write(o.root.join(stale), b"old initramfs").expect("stale file");
        let mut state = State::load(&o.root).expect("load").expect("state");
        state.files.push(InstalledFile {
            path: stale.into(),
            sha256: payload::digest(&o.root.join(stale)).expect("digest"),
            backup: None,
            kept_existing: false,
        });
        state.save(&o.root).expect("save");

        let after = install(&o).expect("second install");
        assert!(!o.root.join(stale).exists(), "the stale file is gone");
        assert!(after.files.iter().all(|f| f.path != stale));
        for item in ITEMS {
            assert!(o.root.join(item.to).exists(), "{} installed", item.to);
        }
        uninstall(&o).expect("uninstall");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
