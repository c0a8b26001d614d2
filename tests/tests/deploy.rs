//! `pangolin-deploy` against a real private containerd and its configuration file: before the
//! install CRI has no `pangolin` handler; after it (and containerd's restart) a pod runs on it,
//! with the shim the install put down; after the uninstall the handler is gone again, the
//! configuration is what it was plus what the operator added meanwhile, a drop-in beside it is
//! untouched, and the node's files are as before (a binary that was there is restored). The
//! containerd 2.x path (a drop-in and its `imports` entry) is checked on the files alone: this
//! machine's containerd is 1.6.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::{Path, PathBuf};
use std::process::Command;

use pangolin_e2e::containerd::{Options, PrivateContainerd, PANGOLIN_HANDLER};
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::cri_pods::{exec, runtime};
use pangolin_e2e::deploy_image::{self, Sources};
use pangolin_e2e::{busybox, finish_containerd, stderr, stdout, target_dir, TestEnv};

/// The bridge network's tag (subnet 10.231.43.0/24).
const NET_TAG: u8 = 43;

/// The installer's payload, staged from this build: what `cargo xtask deploy-image` packs.
fn stage_payload(dir: &Path) -> PathBuf {
    let sources = Sources::of_build(&target_dir()).expect("the build's sources");
    deploy_image::stage_payload(&sources, dir).expect("payload");
    dir.to_path_buf()
}

/// `pangolin-deploy VERB ARGS...`, which must succeed; its stdout.
fn deploy(verb: &str, args: &[&str]) -> String {
    let out = Command::new(target_dir().join("pangolin-deploy"))
        .arg(verb)
        .args(args)
        .output()
        .expect("run pangolin-deploy (build the workspace)");
    assert!(
        out.status.success(),
        "{verb}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// RunPodSandbox on the `pangolin` handler; the pod, or CRI's error.
async fn run_pod(cri: &mut Cri, config: &k8s_cri::v1::PodSandboxConfig) -> Result<String, String> {
    cri.run_pod(PANGOLIN_HANDLER, config)
        .await
        .map_err(|e| e.message().to_string())
}

#[test]
fn install_adds_a_handler_containerd_runs_pods_on_and_uninstall_puts_the_node_back() {
    let env = TestEnv::new("deploy");
    let root = env.dir.join("node");
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    // A `pangolin` the node had before (an older manual install): restored by the uninstall.
    std::fs::write(bin.join("pangolin"), "an older pangolin\n").expect("old binary");
    let payload = stage_payload(&env.dir.join("payload"));
    let ctrd_dir = env.dir.join("containerd");
    let net = BridgeNetwork::create(&ctrd_dir, "pangolin-deploy", NET_TAG).expect("network");
    let options = Options {
        cri: true,
        without_pangolin_handler: true,
        env: vec![(
            "PANGOLIN_CONFIG".into(),
            env.config_file.display().to_string(),
        )],
        ..Options::default()
    };
    // The installed shim is the one containerd finds: the node's /usr/local/bin first on PATH.
    let mut ctrd = PrivateContainerd::start_with(&ctrd_dir, &bin, &options).expect("containerd");
    cri::import_images(&ctrd, &busybox()).expect("images");
    let config = ctrd.config_file.display().to_string();
    let original = std::fs::read_to_string(&ctrd.config_file).expect("config");
    let other_drop_in = ctrd_dir.join("conf.d/other.toml");
    std::fs::create_dir_all(other_drop_in.parent().expect("dir")).expect("mkdir");
    std::fs::write(&other_drop_in, "# the operator's drop-in\n").expect("drop-in");
    let rt = runtime();
    let pod_config = cri::pod_config("deployed", &env.dir.join("logs"), Default::default());

    let mut cri = rt.block_on(Cri::connect(&ctrd.socket)).expect("CRI");
    let before = rt.block_on(run_pod(&mut cri, &pod_config));
    assert!(
        before.as_ref().is_err_and(|e| e.contains("pangolin")),
        "a pangolin handler before the install: {before:?}"
    );

    let r = root.display().to_string();
    let p = payload.display().to_string();
    let common = [
        "--root",
        &r,
        "--from",
        &p,
        "--containerd-config",
        &config,
        "--restart",
        "none",
    ];
    deploy("install", &common);
    let installed = std::fs::read_to_string(&ctrd.config_file).expect("config");
    assert!(
        installed.starts_with(original.trim_end())
            && installed.contains("runtimes.pangolin]")
            && installed.contains("io.containerd.pangolin.v2"),
        "the handler was not added after the operator's configuration:\n{installed}"
    );
    for f in [
        "usr/local/bin/containerd-shim-pangolin-v2",
        "usr/local/bin/virtiofsd",
        "usr/libexec/pangolin/pangolin-vmm",
        "usr/share/pangolin/vmlinux",
        "etc/pangolin/configuration.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }

    ctrd.restart().expect("restart containerd");
    let mut cri = rt.block_on(Cri::connect(&ctrd.socket)).expect("CRI");
    let pod = rt
        .block_on(run_pod(&mut cri, &pod_config))
        .expect("a pod on the installed handler");
    let container = rt.block_on(cri.create_start(
        &pod,
        &pod_config,
        cri::container_config("deployed", &["sleep", "3600"]),
    ));
    let id = container.expect("container");
    let (said, _, code) = rt.block_on(exec(&mut cri, &id, &["uname", "-r"]));
    assert_eq!(code, 0);
    assert!(said.contains("pangolin"), "not in a Pangolin VM: {said}");
    // `pangolin list` knows the CRI pod and its two containers (the sandbox's and this one).
    let listed = stdout(&env.pangolin().arg("list").output().expect("pangolin list"));
    assert!(
        listed
            .lines()
            .any(|l| l.contains("/deployed") && l.split_whitespace().nth(6) == Some("2")),
        "pangolin list: {listed}"
    );
    let shims = pangolin_e2e::processes_mentioning(&bin.join("containerd-shim-pangolin-v2"));
    assert!(!shims.is_empty(), "the pod's shim is not the installed one");
    rt.block_on(cri.remove_pod(&pod)).expect("remove pod");

    // The operator edits the configuration after the install: the uninstall keeps that.
    let edited = format!("{installed}\n# added by the operator after the install\n");
    std::fs::write(&ctrd.config_file, &edited).expect("edit");
    deploy("uninstall", &common);
    let after = std::fs::read_to_string(&ctrd.config_file).expect("config");
    assert!(
        !after.contains("runtimes.pangolin"),
        "handler left:\n{after}"
    );
    assert!(
        after.contains("# added by the operator after the install"),
        "the operator's edit was lost:\n{after}"
    );
    let without_edit = after.replace("# added by the operator after the install\n", "");
    assert_eq!(
        without_edit.trim_end(),
        original.trim_end(),
        "the configuration is not what it was"
    );
    assert_eq!(
        std::fs::read_to_string(&other_drop_in).expect("drop-in"),
        "# the operator's drop-in\n"
    );
    assert_eq!(
        std::fs::read_to_string(bin.join("pangolin")).expect("restored"),
        "an older pangolin\n"
    );
    for f in [
        "usr/local/bin/containerd-shim-pangolin-v2",
        "usr/libexec/pangolin",
        "usr/share/pangolin",
        "etc/pangolin",
        "var/lib/pangolin-deploy",
    ] {
        assert!(!root.join(f).exists(), "{f} outlived the uninstall");
    }
    ctrd.restart().expect("restart containerd");
    let mut cri = rt.block_on(Cri::connect(&ctrd.socket)).expect("CRI");
    let gone = rt.block_on(run_pod(&mut cri, &pod_config));
    assert!(
        gone.is_err(),
        "the handler outlived the uninstall: {gone:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&payload);
    drop(cri);
    finish_containerd(ctrd, env);
    drop(net);
}

#[test]
fn a_containerd_2_node_gets_a_drop_in_and_its_import_and_loses_both() {
    let env = TestEnv::new("deploy-v3");
    let root = env.dir.join("node");
    let payload = stage_payload(&env.dir.join("payload"));
    let etc = root.join("etc/containerd");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let main = etc.join("config.toml");
    let original =
        "version = 3\n\n[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"overlayfs\"\n";
    std::fs::write(&main, original).expect("config");
    let (r, p) = (root.display().to_string(), payload.display().to_string());
    let common = ["--root", &r, "--from", &p, "--restart", "none"];
    deploy("install", &common);
    let drop_in = std::fs::read_to_string(etc.join("conf.d/pangolin.toml")).expect("drop-in");
    assert!(
        drop_in.contains("version = 3")
            && drop_in.contains(
                "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.pangolin]"
            ),
        "{drop_in}"
    );
    let with = std::fs::read_to_string(&main).expect("config");
    assert!(
        with.contains("imports = [\"/etc/containerd/conf.d/pangolin.toml\"]"),
        "the import names the drop-in as the node sees it:\n{with}"
    );
    deploy("uninstall", &common);
    assert_eq!(std::fs::read_to_string(&main).expect("config"), original);
    assert!(!etc.join("conf.d/pangolin.toml").exists(), "drop-in left");
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&payload);
    env.finish();
}

/// The installer's OCI image (what `cargo xtask deploy-image` writes) runs: imported into a
/// containerd and run on runc with a node's root at `/host`, as the DaemonSet runs it, it
/// installs onto that root (its own shared libraries are in the image) and uninstalls again.
#[test]
fn the_installer_image_installs_onto_the_root_it_is_given_and_uninstalls() {
    let env = TestEnv::new("deploy-image");
    let payload = stage_payload(&env.dir.join("payload"));
    let archive = env.dir.join("pangolin-deploy.oci.tar");
    let kubectl = Path::new("/usr/bin/kubectl");
    deploy_image::build(
        &payload,
        &target_dir().join("pangolin-deploy"),
        kubectl.exists().then_some(kubectl),
        &env.dir.join("image"),
        &archive,
    )
    .expect("build the image");
    let ctrd =
        PrivateContainerd::start(&env.dir.join("containerd"), &target_dir()).expect("containerd");
    ctrd.ctr_output(["images", "import", &archive.display().to_string()])
        .expect("import the image");
    let root = env.dir.join("node");
    std::fs::create_dir_all(root.join("etc/containerd")).expect("mkdir");
    let config = root.join("etc/containerd/config.toml");
    std::fs::write(&config, "version = 2\n").expect("config");
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        root.display()
    );
    let run = |id: &str, verb: &str| {
        ctrd.ctr_output([
            "run",
            "--rm",
            "--mount",
            &mount,
            deploy_image::IMAGE,
            id,
            "/opt/pangolin/bin/pangolin-deploy",
            verb,
            "--root",
            "/host",
            "--containerd-version",
            "1.6.20",
            "--restart",
            "none",
        ])
    };
    let said = run("installer1", "install").expect("install in the image");
    assert!(said.contains("runtime handler \"pangolin\""), "{said}");
    assert!(root
        .join("usr/local/bin/containerd-shim-pangolin-v2")
        .is_file());
    assert!(
        std::fs::read_to_string(&config)
            .expect("config")
            .contains("runtimes.pangolin]"),
        "the handler was not added"
    );
    run("installer2", "uninstall").expect("uninstall in the image");
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        "version = 2\n"
    );
    assert!(!root
        .join("usr/local/bin/containerd-shim-pangolin-v2")
        .exists());
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&payload);
    let _ = std::fs::remove_dir_all(env.dir.join("image"));
    let _ = std::fs::remove_file(&archive);
    finish_containerd(ctrd, env);
}
