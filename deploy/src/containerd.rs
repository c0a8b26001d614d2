//! containerd's configuration: which format a node's containerd reads, and the edits that add
//! Pangolin's CRI runtime handler and take it out again, leaving everything else as it was.
//!
//! - containerd 1.6/1.7 (config `version = 2`): the handler's table is added to the main
//!   configuration in place. A drop-in (`imports`) cannot carry it there: containerd 1.x replaces
//!   a plugin's whole table with an imported file's (`containerd config dump` on 1.6.20 shows the
//!   main file's CRI `sandbox_image`, CNI directories and runc handler gone), so a drop-in with
//!   only the handler would unconfigure the rest of CRI.
//! - containerd 2.x (config `version = 3`): a drop-in of its own, `conf.d/<handler>.toml`, listed
//!   in the main file's `imports` (added there if missing; 2.x merges imported plugin tables).
//!
//! Edits go through `toml_edit`, so comments, order and formatting of the operator's file stay.

use toml_edit::{value, Array, DocumentMut, Item, Table};

/// The runtime type containerd starts Pangolin's shim by.
pub const RUNTIME_TYPE: &str = "io.containerd.pangolin.v2";

/// The CRI plugin's table in each format.
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";

/// A configuration could not be read or edited.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML.
    #[error("{path}: not valid TOML: {why}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        why: String,
    },
    /// A format this installer does not edit.
    #[error("{path}: version = {version} configurations are not supported (containerd 1.6+ reads version 2, 2.x version 3; `containerd config migrate` converts older ones)")]
    Version {
        /// The file.
        path: String,
        /// Its `version`.
        version: i64,
    },
    /// Neither the file nor the binary says which format applies.
    #[error("cannot tell containerd's configuration format: {0} (give --containerd-version)")]
    Undetected(String),
    /// A key on the handler's path is not a table.
    #[error("{path}: {key} is not a table")]
    NotATable {
        /// The file.
        path: String,
        /// The dotted key.
        key: String,
    },
}

/// The configuration format a containerd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Format {
    /// containerd 1.6 and 1.7: `version = 2`.
    V2,
    /// containerd 2.x: `version = 3`.
    V3,
}

/// The format: the file's `version` when it has one, else the major version of containerd
/// (`containerd --version` output, or a bare version like `1.6.20`).
pub fn detect(
    path: &str,
    text: Option<&str>,
    containerd_version: Option<&str>,
) -> Result<Format, ConfigError> {
    if let Some(text) = text {
        let doc = parse(path, text)?;
        if let Some(v) = doc.get("version").and_then(Item::as_integer) {
            return match v {
                2 => Ok(Format::V2),
                3 => Ok(Format::V3),
                version => Err(ConfigError::Version {
                    path: path.into(),
                    version,
                }),
            };
        }
    }
    let Some(version) = containerd_version else {
        return Err(ConfigError::Undetected(format!(
            "{path} has no `version` and containerd's version is unknown"
        )));
    };
    // "containerd containerd.io 1.7.2 <commit>", "containerd github.com/... 1.6.20~ds1", "2.0.0"
    let major = version
        .split_whitespace()
        .find_map(|w| {
            let w = w.trim_start_matches('v');
            let (major, rest) = w.split_once('.')?;
            rest.chars().next()?.is_ascii_digit().then_some(major)
        })
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(1) => Ok(Format::V2),
        Some(2) => Ok(Format::V3),
        _ => Err(ConfigError::Undetected(format!(
            "containerd's version {version:?} is neither 1.x nor 2.x"
        ))),
    }
}

fn parse(path: &str, text: &str) -> Result<DocumentMut, ConfigError> {
    text.parse::<DocumentMut>().map_err(|e| ConfigError::Parse {
        path: path.into(),
        why: e.to_string(),
    })
}

/// The handler's table: `runtime_type` and the annotations the shim reads per pod.
fn handler_table() -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", value(RUNTIME_TYPE));
    let mut annotations = Array::new();
    annotations.push("io.pangolin.*");
    t.insert("pod_annotations", value(annotations));
    t
}

/// `plugins.<cri>.containerd.runtimes` of `doc`, made (as implicit tables) where missing.
fn runtimes<'a>(
    doc: &'a mut DocumentMut,
    path: &str,
    cri: &str,
) -> Result<&'a mut Table, ConfigError> {
    let mut table = doc.as_table_mut();
    let mut key = String::new();
    for part in ["plugins", cri, "containerd", "runtimes"] {
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(part);
        let entry = table.entry(part).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = entry.as_table_mut().ok_or_else(|| ConfigError::NotATable {
            path: path.into(),
            key: key.clone(),
        })?;
    }
    Ok(table)
}

/// What [`add_handler`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// The table was added: the new text.
    Added(String),
    /// The file has a table for the handler already (the operator's): left as it is.
    Present,
}

/// Adds runtime handler `handler` to a version 2 configuration (containerd 1.6/1.7).
pub fn add_handler(path: &str, text: &str, handler: &str) -> Result<Added, ConfigError> {
    let mut doc = parse(path, text)?;
    let runtimes = runtimes(&mut doc, path, CRI_V2)?;
    if runtimes.contains_key(handler) {
        return Ok(Added::Present);
    }
    runtimes.insert(handler, Item::Table(handler_table()));
    let mut out = doc.to_string();
    if text.is_empty() {
        // A file made from nothing says its format, or containerd reads it as version 1.
        out = format!("version = 2\n\n{out}");
    }
    Ok(Added::Added(out))
}

/// Takes handler `handler`'s table out of a version 2 configuration; tables the installer made
/// on the way to it go too when nothing else is in them. Everything else stays as it is.
pub fn remove_handler(path: &str, text: &str, handler: &str) -> Result<String, ConfigError> {
    let mut doc = parse(path, text)?;
    if let Ok(runtimes) = runtimes(&mut doc, path, CRI_V2) {
        runtimes.remove(handler);
    }
    prune_empty_implicit(doc.as_table_mut());
    Ok(doc.to_string())
}

/// Removes implicit tables left with nothing in them (they print nothing, but keep the
/// document's shape honest for a later edit).
fn prune_empty_implicit(table: &mut Table) {
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
    for key in keys {
        let empty = match table.get_mut(&key).and_then(Item::as_table_mut) {
            Some(t) => {
                prune_empty_implicit(t);
                t.is_implicit() && t.is_empty()
            }
            None => false,
        };
        if empty {
            table.remove(&key);
        }
    }
}

/// The drop-in for containerd 2.x (`version = 3`) that adds handler `handler`.
pub fn drop_in(handler: &str) -> String {
    let mut doc = DocumentMut::new();
    doc.insert("version", value(3));
    let runtimes = runtimes(&mut doc, "drop-in", CRI_V3).map(|r| {
        r.insert(handler, Item::Table(handler_table()));
    });
    debug_assert!(runtimes.is_ok(), "a fresh document has only tables");
    format!("# Added by pangolin-deploy; `pangolin-deploy uninstall` removes it.\n{doc}")
}

/// Adds `import` to the `imports` of a version 3 main configuration unless a listed entry is
/// it (globs are not expanded: an entry equal to it or the `conf.d/*.toml` glob counts). None
/// when nothing changes.
pub fn add_import(
    path: &str,
    text: &str,
    import: &str,
    glob: &str,
) -> Result<Option<String>, ConfigError> {
    let mut doc = parse(path, text)?;
    if !doc.contains_key("version") {
        doc.insert("version", value(3));
    }
    let imports = doc.entry("imports").or_insert_with(|| value(Array::new()));
    let Some(list) = imports.as_array_mut() else {
        return Err(ConfigError::NotATable {
            path: path.into(),
            key: "imports (not an array)".into(),
        });
    };
    if list
        .iter()
        .any(|v| v.as_str() == Some(import) || v.as_str() == Some(glob))
    {
        return Ok(None);
    }
    list.push(import);
    Ok(Some(doc.to_string()))
}

/// Takes `import` out of the `imports` of a main configuration (the entry the installer added).
pub fn remove_import(path: &str, text: &str, import: &str) -> Result<String, ConfigError> {
    let mut doc = parse(path, text)?;
    let mut now_empty = false;
    if let Some(list) = doc.get_mut("imports").and_then(Item::as_array_mut) {
        list.retain(|v| v.as_str() != Some(import));
        now_empty = list.is_empty();
    }
    if now_empty {
        doc.remove("imports");
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATORS: &str = r#"# the operator's file
version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"   # pinned

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;

    #[test]
    fn the_format_comes_from_the_file_then_from_the_binary() {
        assert_eq!(
            detect("c", Some("version = 2\n"), None).expect("v2"),
            Format::V2
        );
        assert_eq!(
            detect("c", Some("version = 3\n"), Some("1.6.20")).expect("v3"),
            Format::V3
        );
        assert_eq!(
            detect(
                "c",
                None,
                Some("containerd github.com/containerd/containerd 1.6.20~ds1")
            )
            .expect("1.x"),
            Format::V2
        );
        assert_eq!(
            detect(
                "c",
                Some("# nothing\n"),
                Some("containerd containerd.io v2.0.4 abc")
            )
            .expect("2.x"),
            Format::V3
        );
        let old = detect("c", Some("version = 1\n"), None).expect_err("v1");
        assert!(old.to_string().contains("version = 1"), "{old}");
        assert!(detect("c", None, None).is_err());
        assert!(detect("c", Some("not = [toml"), None).is_err());
    }

    #[test]
    fn adding_and_removing_the_handler_restores_the_operators_file_exactly() {
        let Added::Added(with) = add_handler("c", OPERATORS, "pangolin").expect("add") else {
            panic!("not added");
        };
        assert!(
            with.starts_with(OPERATORS.trim_end()),
            "the operator's part changed:\n{with}"
        );
        assert!(
            with.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.pangolin]"),
            "{with}"
        );
        let parsed: toml_edit::DocumentMut = with.parse().expect("toml");
        let h =
            &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["pangolin"];
        assert_eq!(h["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            add_handler("c", &with, "pangolin").expect("again"),
            Added::Present
        );
        assert_eq!(
            remove_handler("c", &with, "pangolin").expect("remove"),
            OPERATORS
        );
    }

    #[test]
    fn a_file_without_a_cri_section_gets_one_and_loses_it_again() {
        let bare = "version = 2\n";
        let Added::Added(with) = add_handler("c", bare, "pangolin").expect("add") else {
            panic!("not added");
        };
        assert!(with.contains("runtimes.pangolin]"), "{with}");
        assert_eq!(
            remove_handler("c", &with, "pangolin").expect("remove"),
            bare
        );
        let Added::Added(fresh) = add_handler("c", "", "pangolin").expect("from nothing") else {
            panic!("not added");
        };
        assert!(fresh.starts_with("version = 2\n"), "{fresh}");
    }

    #[test]
    fn edits_the_operator_made_after_the_install_stay() {
        let Added::Added(with) = add_handler("c", OPERATORS, "pangolin").expect("add") else {
            panic!("not added");
        };
        let edited = format!("{with}\n# tuned later\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.gvisor]\n  runtime_type = \"io.containerd.runsc.v1\"\n");
        let after = remove_handler("c", &edited, "pangolin").expect("remove");
        assert!(!after.contains("runtimes.pangolin"), "{after}");
        assert!(
            after.contains("# tuned later") && after.contains("runtimes.gvisor]"),
            "{after}"
        );
        assert!(
            after.contains("sandbox_image = \"registry.k8s.io/pause:3.9\"   # pinned"),
            "{after}"
        );
    }

    #[test]
    fn a_key_in_the_way_that_is_not_a_table_is_named() {
        let err =
            add_handler("c", "version = 2\nplugins = 3\n", "pangolin").expect_err("in the way");
        assert!(err.to_string().contains("plugins is not a table"), "{err}");
    }

    #[test]
    fn the_v3_drop_in_and_its_import() {
        let d = drop_in("pangolin");
        let parsed: toml_edit::DocumentMut = d.parse().expect("toml");
        assert_eq!(parsed["version"].as_integer(), Some(3));
        let h = &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
            ["pangolin"];
        assert_eq!(h["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        let main = "version = 3\nimports = [\"/etc/containerd/other.toml\"]\n";
        let with = add_import(
            "c",
            main,
            "/etc/containerd/conf.d/pangolin.toml",
            "/etc/containerd/conf.d/*.toml",
        )
        .expect("add")
        .expect("changed");
        assert!(
            with.contains("other.toml") && with.contains("conf.d/pangolin.toml"),
            "{with}"
        );
        assert_eq!(
            remove_import("c", &with, "/etc/containerd/conf.d/pangolin.toml").expect("rm"),
            main
        );
        let globbed = "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        assert_eq!(
            add_import(
                "c",
                globbed,
                "/etc/containerd/conf.d/pangolin.toml",
                "/etc/containerd/conf.d/*.toml"
            )
            .expect("add"),
            None,
            "the glob covers it"
        );
        let fresh = add_import("c", "", "/x/conf.d/pangolin.toml", "/x/conf.d/*.toml")
            .expect("add")
            .expect("changed");
        assert!(fresh.contains("version = 3"), "{fresh}");
        assert_eq!(
            remove_import(
                "c",
                "imports = [\"/x/conf.d/pangolin.toml\"]\n",
                "/x/conf.d/pangolin.toml"
            )
            .expect("rm"),
            ""
        );
    }
}
