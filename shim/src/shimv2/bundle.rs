//! A task's bundle as containerd writes it: `config.json`, read with bounds, and the root
//! filesystem it names.
//!
//! The spec is read once, refused above [`MAX_SPEC_BYTES`] (what one agent call can carry: a
//! bigger spec could never reach the guest), and parsed so that an error names the field it
//! is in (`process.user.uid: invalid type: string "root", expected u32`), not only a line and
//! column. A relative `root.path` must stay inside the bundle once symlinks are resolved; an
//! absolute one is the caller's explicit choice (`ctr run --rootfs DIR`), as OCI allows.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;

use super::PodError;

/// The largest `config.json` read: the agent's ttrpc messages are at most 4 MiB, and the
/// spec travels in one of them.
pub const MAX_SPEC_BYTES: u64 = 4 << 20;

/// The bundle's `config.json`.
///
/// # Errors
/// [`PodError::Invalid`] naming `bundle config.json` when it cannot be read, is larger than
/// [`MAX_SPEC_BYTES`], or does not parse (with the field's path).
pub fn load_spec(bundle: &Path) -> Result<Spec, PodError> {
    let path = bundle.join("config.json");
    let bad = |why: String| PodError::invalid("bundle config.json", why);
    let file = std::fs::File::open(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let mut text = Vec::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(bad(format!(
            "{} is larger than {MAX_SPEC_BYTES} bytes, more than one agent call carries",
            path.display()
        )));
    }
    parse_spec(&text).map_err(bad)
}

/// `text` as a spec; an error names the field's path.
pub fn parse_spec(text: &[u8]) -> Result<Spec, String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let spec: Spec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        if field == "." {
            e.inner().to_string()
        } else {
            format!("{field}: {}", e.inner())
        }
    })?;
    de.end().map_err(|e| e.to_string())?;
    Ok(spec)
}

/// The container's root filesystem directory: `root.path` (default `rootfs`), relative to the
/// bundle unless absolute.
///
/// # Errors
/// [`PodError::Invalid`] naming `root.path` when a relative path leads outside the bundle
/// (`..`, or a symlink) once resolved.
pub fn root_path(bundle: &Path, spec: &Spec) -> Result<PathBuf, PodError> {
    let given = spec
        .root()
        .as_ref()
        .map_or_else(|| PathBuf::from("rootfs"), |r| r.path().clone());
    if given.is_absolute() {
        return Ok(given);
    }
    let joined = bundle.join(&given);
    let bad = |why: String| PodError::invalid("root.path", why);
    let bundle_real = bundle
        .canonicalize()
        .map_err(|e| bad(format!("bundle {}: {e}", bundle.display())))?;
    // Where it does not exist yet (containerd mounts the rootfs there), its nearest existing
    // ancestor is resolved and the rest must not climb.
    let (existing, rest) = joined
        .ancestors()
        .find_map(|a| Some((a.canonicalize().ok()?, joined.strip_prefix(a).ok()?)))
        .ok_or_else(|| bad(format!("{} does not resolve", joined.display())))?;
    let climbs = rest
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if climbs || !existing.starts_with(&bundle_real) {
        return Err(bad(format!(
            "{:?} leads outside the bundle {} (to {})",
            given,
            bundle.display(),
            existing.join(rest).display()
        )));
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    const MINIMAL: &str = r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["true"],"cwd":"/"},"root":{"path":"rootfs"}}"#;

    #[test]
    fn a_malformed_field_is_named_by_its_path() {
        let text = MINIMAL.replace(r#""uid":0"#, r#""uid":"root""#);
        let err = parse_spec(text.as_bytes()).expect_err("refused");
        assert!(err.starts_with("process.user.uid: invalid type"), "{err}");
        let err = parse_spec(b"{not json").expect_err("refused");
        assert!(err.contains("line 1"), "{err}");
        assert!(parse_spec(MINIMAL.as_bytes()).is_ok());
        let err = parse_spec(format!("{MINIMAL} trailing").as_bytes()).expect_err("refused");
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn a_spec_above_the_limit_is_refused_by_size_without_parsing() {
        let dir = TestDir::new("bundle-huge");
        let huge = MINIMAL.replace(
            r#""args":["true"]"#,
            &format!(r#""args":["true","{}"]"#, "x".repeat(5 << 20)),
        );
        std::fs::write(dir.path.as_path().join("config.json"), huge).expect("write");
        let err = load_spec(dir.path.as_path())
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("larger than 4194304"),
            "{err}"
        );
        std::fs::write(dir.path.as_path().join("config.json"), MINIMAL).expect("write");
        assert!(load_spec(dir.path.as_path()).is_ok());
    }

    #[test]
    fn a_root_path_that_leaves_the_bundle_is_refused() {
        let dir = TestDir::new("bundle-root");
        let bundle = dir.path.as_path().join("b");
        std::fs::create_dir_all(bundle.join("rootfs")).expect("rootfs");
        std::fs::create_dir_all(dir.path.as_path().join("outside")).expect("outside");
        std::os::unix::fs::symlink(dir.path.as_path().join("outside"), bundle.join("link"))
            .expect("ln");
        let spec_with = |root: &str| -> Spec {
            parse_spec(
                MINIMAL
                    .replace(r#""path":"rootfs""#, &format!(r#""path":"{root}""#))
                    .as_bytes(),
            )
            .expect("spec")
        };
        assert_eq!(
            root_path(&bundle, &spec_with("rootfs")).expect("ok"),
            bundle.join("rootfs")
        );
        // Not there yet (containerd mounts it later): fine while it stays inside.
        assert!(root_path(&bundle, &spec_with("later")).is_ok());
        assert_eq!(
            root_path(&bundle, &spec_with("/srv/rootfs")).expect("abs"),
            Path::new("/srv/rootfs")
        );
        for escape in [
            "../outside",
            "link",
            "link/later",
            "rootfs/../../outside",
            "../nowhere",
        ] {
            let err = root_path(&bundle, &spec_with(escape))
                .expect_err(escape)
                .to_string();
            assert!(
                err.contains("root.path") && err.contains("outside the bundle"),
                "{escape}: {err}"
            );
        }
    }
}
