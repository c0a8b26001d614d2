//! `cargo xtask install` into a private destination root: every file at the path the
//! configuration's defaults name, executable where it must be, the installed binaries run, and a
//! reinstall keeps a user's edited configuration (writing the shipped one beside it).

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pangolin_e2e::{root, run_bounded, stderr, stdout};

fn xtask_install(destdir: &Path) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root())
        .args(["xtask", "install", "--debug", "--destdir"])
        .arg(destdir);
    let out = run_bounded(cmd, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "cargo xtask install failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn install_puts_everything_where_the_defaults_look_and_keeps_an_edited_config() {
    let dest = std::env::temp_dir().join(format!("pangolin-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dest);
    xtask_install(&dest);

    let defaults = pangolin_runtime_config::Config::default();
    let under = |p: &Path| dest.join(p.strip_prefix("/").expect("absolute default"));
    for (path, exec) in [
        (under(&defaults.hypervisor.kernel), false),
        (under(&defaults.hypervisor.initramfs), false),
        (under(&defaults.hypervisor.vmm_path), true),
        (dest.join("usr/local/bin/containerd-shim-pangolin-v2"), true),
        (dest.join("usr/local/bin/pangolin"), true),
        (dest.join("usr/local/bin/vhost-device-vsock"), true),
        (
            under(Path::new(pangolin_runtime_config::DEFAULT_CONFIG_PATH)),
            false,
        ),
    ] {
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(meta.len() > 0, "{} is empty", path.display());
        assert_eq!(
            meta.permissions().mode() & 0o111 != 0,
            exec,
            "{} mode {:o}",
            path.display(),
            meta.permissions().mode()
        );
    }

    // The installed binaries run; the shipped configuration is valid.
    let shim = Command::new(dest.join("usr/local/bin/containerd-shim-pangolin-v2"))
        .arg("-v")
        .output()
        .expect("run the installed shim");
    assert!(
        stdout(&shim).contains("containerd-shim-pangolin-v2"),
        "{}",
        stdout(&shim)
    );
    let config = under(Path::new(pangolin_runtime_config::DEFAULT_CONFIG_PATH));
    pangolin_runtime_config::Config::load(&config).expect("shipped configuration is valid");

    // A user's edit survives a reinstall; the new defaults go beside it.
    let edited = "# mine\n[runtime]\nstate_dir = \"/run/pangolin-mine\"\n";
    std::fs::write(&config, edited).expect("edit config");
    xtask_install(&dest);
    assert_eq!(std::fs::read_to_string(&config).expect("config"), edited);
    assert!(
        config.with_extension("toml.new").exists(),
        "shipped config beside it"
    );
    let _ = std::fs::remove_dir_all(&dest);
}
