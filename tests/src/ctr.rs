//! `ctr` against a private containerd whose shims run pangolin: what the containerd suites share.

use std::time::Duration;

use crate::containerd::{Options, PrivateContainerd, BUSYBOX_IMAGE, PANGOLIN_RUNTIME};
use crate::{busybox, pangolin_containerd, run_bounded, TestEnv};

/// A private containerd whose shims use `env`'s configuration, with busybox imported.
pub fn containerd(env: &TestEnv) -> PrivateContainerd {
    containerd_with(env, Options::default())
}

/// [`containerd`] with `options`.
pub fn containerd_with(env: &TestEnv, options: Options) -> PrivateContainerd {
    let ctrd = pangolin_containerd(env, options);
    ctrd.import_busybox(&busybox(), BUSYBOX_IMAGE)
        .expect("import busybox");
    ctrd
}

/// `ctr` arguments for `run OPTS --runtime io.containerd.pangolin.v2 busybox ID CMD...`.
pub fn pangolin_run<'a>(opts: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["--runtime", PANGOLIN_RUNTIME, BUSYBOX_IMAGE, id]);
    args.extend_from_slice(cmd);
    args
}

/// Kills task `id` (SIGKILL), deletes it once it has exited (within a minute) and deletes its
/// container.
pub fn remove_task(ctrd: &PrivateContainerd, id: &str) {
    let _ = ctr(ctrd, &["task", "kill", "-s", "SIGKILL", id]);
    let deadline = std::time::Instant::now() + crate::patience(Duration::from_secs(60));
    while !ctr(ctrd, &["task", "delete", id]).status.success()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctr(ctrd, &["container", "delete", id]);
}

/// Runs `ctr ARGS` against `ctrd`, bounded to 180 s.
pub fn ctr(ctrd: &PrivateContainerd, args: &[&str]) -> std::process::Output {
    run_bounded(ctrd.ctr(args), Duration::from_secs(180))
}
