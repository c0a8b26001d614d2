//! What a pod holds on the host, through a real (private) containerd and `ctr`: its helpers
//! confined (virtiofsd's sandbox, QEMU's and vhost-device-vsock's ids and filters), its host
//! cgroup, its volumes as the guest and virtiofsd see them (rw, ro, rro, files, symlinks out of
//! a volume), and nothing of it left after it ends, also when its shim is killed.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::Path;
use std::time::{Duration, Instant};

use pangolin_e2e::ctr::{containerd, ctr, pangolin_run};
use pangolin_e2e::{finish_containerd, patience, stderr, stdout, TestEnv};

/// kill -9 of a pod's shim: containerd sees the task exit, runs the shim's `delete`, and the
/// task and container can be deleted; the VM and its helpers died with the shim (PDEATHSIG)
/// and nothing of the pod is left (processes, sockets, mounts, directories, its host cgroup).
#[test]
fn killing_the_shim_ends_the_task_and_leaves_nothing() {
    let env = TestEnv::new("ctr-shimkill");
    let ctrd = containerd(&env);
    let out = ctr(
        &ctrd,
        &pangolin_run(&["-d"], "shimkill1", &["sleep", "3600"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let shims: Vec<u32> = pangolin_e2e::processes_mentioning(&ctrd.dir)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-pangolin-v2"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    let vmm = *env.vmm_pids().first().expect("the VM runs");
    let cgroup = memory_cgroup(vmm);
    assert!(cgroup.ends_with("/shimkill1"), "the VM runs in {cgroup}");
    let killed = std::process::Command::new("kill")
        .args(["-9", &shims[0].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -9 of the shim");
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    loop {
        let tasks = stdout(&ctr(&ctrd, &["task", "ls"]));
        if !tasks.contains("RUNNING") {
            break;
        }
        assert!(Instant::now() < deadline, "the task still runs:\n{tasks}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while !env.vmm_pids().is_empty() {
        assert!(Instant::now() < deadline, "the VM outlived its shim");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctr(&ctrd, &["task", "delete", "shimkill1"]);
    let out = ctr(&ctrd, &["container", "delete", "shimkill1"]);
    assert!(out.status.success(), "container delete: {}", stderr(&out));
    // containerd runs the shim's `delete` (which removes the cgroup) on its own schedule.
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while !cgroup_dirs(&cgroup).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_cgroup_gone(&cgroup);
    finish_containerd(ctrd, env);
}

/// Mount options of mount points ending in `suffix`, as virtiofsd's mount namespace has them
/// (it serves the guest from there).
fn virtiofsd_mount_options(env: &TestEnv, suffix: &str) -> Vec<String> {
    let fsd: Vec<u32> = env
        .leftover_processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("virtiofsd"))
        .map(|(pid, _)| pid)
        .collect();
    let mut options = Vec::new();
    for pid in fsd {
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        for line in info.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.get(4).is_some_and(|p| p.ends_with(suffix)) {
                options.push(fields.get(5).copied().unwrap_or("").to_string());
            }
        }
    }
    options
}

/// `key:` of a `/proc/<pid>/status`, whitespace-joined.
fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The pod's helpers confine themselves (virtiofsd: its own mount namespace rooted at the
/// share, seccomp; QEMU: `-sandbox`, seccomp), and a volume's symlinks that point out of it
/// resolve in the guest, never to the host file they name.
#[test]
fn helpers_are_sandboxed_and_volume_symlinks_cannot_reach_the_host() {
    let env = TestEnv::new("ctr-helpers");
    let ctrd = containerd(&env);
    let secret = env.dir.join("host-secret.txt");
    std::fs::write(&secret, "host-only\n").expect("secret");
    let vol = env.dir.join("links");
    std::fs::create_dir_all(&vol).expect("mkdir");
    std::os::unix::fs::symlink(&secret, vol.join("absolute")).expect("symlink");
    std::os::unix::fs::symlink("../../../../../../../../..", vol.join("up")).expect("symlink");
    let mount = format!("type=bind,src={},dst=/vol,options=rbind:ro", vol.display());
    let out = ctr(
        &ctrd,
        &pangolin_run(&["-d", "--mount", &mount], "links1", &["sleep", "3600"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let host_path = secret.display().to_string();
    let probe = format!(
        "cat /vol/absolute 2>&1; cat /vol/up{host_path} 2>&1; cat /vol/../..{host_path} 2>&1; \
         ls /vol/up/ | tr '\\n' ' '"
    );
    let out = ctr(
        &ctrd,
        &[
            "task",
            "exec",
            "--exec-id",
            "p",
            "links1",
            "sh",
            "-c",
            &probe,
        ],
    );
    let text = stdout(&out);
    assert!(
        !text.contains("host-only"),
        "a host file leaked into the guest: {text}"
    );
    assert!(text.contains("No such file"), "{text}");
    assert!(
        text.contains("bin") && text.contains("proc"),
        "up/ is the container's root: {text}"
    );
    let procs = env.leftover_processes();
    let pid_of = |name: &str| {
        procs
            .iter()
            .find(|(_, cmd)| cmd.contains(name))
            .map(|(pid, _)| *pid)
            .unwrap_or_else(|| panic!("no {name} among {procs:?}"))
    };
    // virtiofsd forks into its namespaces: a parent that only waits, and the child that serves
    // the guest (seccomp set no_new_privs) from its own namespaces under seccomp.
    let is_virtiofsd = |cmd: &str| {
        cmd.split_whitespace()
            .next()
            .is_some_and(|exe| exe.ends_with("/virtiofsd"))
    };
    let fsd = procs
        .iter()
        .filter(|(_, cmd)| is_virtiofsd(cmd))
        .map(|(pid, _)| *pid)
        .find(|pid| status_field(*pid, "NoNewPrivs") == "1")
        .unwrap_or_else(|| panic!("no sandboxed virtiofsd among {procs:?}"));
    assert_eq!(status_field(fsd, "Seccomp"), "2", "virtiofsd's seccomp");
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    assert_ne!(
        ns(&fsd.to_string()),
        ns("self"),
        "virtiofsd in the host's mount namespace"
    );
    let unfiltered: Vec<String> = std::fs::read_dir(format!("/proc/{fsd}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().eq(["Seccomp:", "0"]))
            })
        })
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        unfiltered.is_empty(),
        "virtiofsd {fsd}: threads without a seccomp filter: {unfiltered:?}"
    );
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{fsd}/root"))
        .expect("virtiofsd root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        root.iter().any(|e| e == "links1") && !root.iter().any(|e| e == "etc"),
        "virtiofsd's root is the pod share: {root:?}"
    );
    if !pangolin_e2e::host_has_hardware_kvm() {
        // This host's backend is QEMU on TCG (with hardware KVM it is the jailed built-in
        // VMM): QEMU and vhost-device-vsock run as the jail's ids with no capability.
        let qemu = pid_of("qemu-system");
        assert_eq!(status_field(qemu, "Seccomp"), "2", "QEMU -sandbox");
        let jail = (env.config.jail.uid, env.config.jail.gid);
        assert_unprivileged(jail, qemu, "QEMU");
        assert_unprivileged(jail, pid_of("vhost-device-vsock"), "vhost-device-vsock");
    }
    let _ = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "links1"]);
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    while !ctr(&ctrd, &["task", "delete", "links1"]).status.success() {
        assert!(Instant::now() < deadline, "task delete");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&ctrd, &["container", "delete", "links1"])
        .status
        .success());
    finish_containerd(ctrd, env);
}

/// `pid` runs as the jail's uid/gid (real, effective, saved, filesystem), in no supplementary
/// group, with every capability set but the bounding set empty and no_new_privs.
fn assert_unprivileged((uid, gid): (u32, u32), pid: u32, what: &str) {
    let ids = |field: &str| -> Vec<String> {
        status_field(pid, field)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(ids("Uid"), vec![uid.to_string(); 4], "{what}'s uids");
    assert_eq!(ids("Gid"), vec![gid.to_string(); 4], "{what}'s gids");
    assert_eq!(
        status_field(pid, "Groups"),
        "",
        "{what}'s supplementary groups"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{what}'s {set}");
    }
    assert_eq!(
        status_field(pid, "NoNewPrivs"),
        "1",
        "{what}'s no_new_privs"
    );
}

/// The cgroup that charges `pid`'s memory: the memory controller's (cgroup v1 or hybrid) or
/// the unified hierarchy's (v2).
fn memory_cgroup(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let path_of = |want: &dyn Fn(&str, &str) -> bool| {
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            want(id, ctrls).then(|| path.to_string())
        })
    };
    path_of(&|_, c| c.split(',').any(|c| c == "memory"))
        .or_else(|| path_of(&|id, c| id == "0" && c.is_empty()))
        .unwrap_or_else(|| format!("<no memory cgroup for {pid}: {text}>"))
}

/// Every process a pod starts on the host (VMM or QEMU, virtiofsd, vhost-device-vsock) runs in
/// the pod's cgroup, `linux.cgroupsPath` (ctr's is `/<namespace>/<id>`), so its host memory and
/// CPU are the pod's; the cgroup is removed with the pod.
#[test]
fn a_pods_host_processes_run_in_its_cgroup_which_goes_with_the_pod() {
    let env = TestEnv::new("ctr-cgroup");
    let ctrd = containerd(&env);
    let out = ctr(&ctrd, &pangolin_run(&["-d"], "cg1", &["sleep", "3600"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let procs = env.leftover_processes();
    let helpers: Vec<(u32, String)> = procs
        .iter()
        .filter(|(_, cmd)| {
            let exe = cmd.split_whitespace().next().unwrap_or_default();
            [
                "/virtiofsd",
                "qemu-system-x86_64",
                "pangolin-vmm",
                "vhost-device-vsock",
            ]
            .iter()
            .any(|name| exe.ends_with(name))
        })
        .cloned()
        .collect();
    assert!(
        helpers.iter().any(|(_, c)| c.contains("virtiofsd"))
            && helpers
                .iter()
                .any(|(_, c)| c.contains("qemu-system") || c.contains("pangolin-vmm")),
        "the pod's VM and virtiofsd among {procs:?}"
    );
    let pod = memory_cgroup(helpers[0].0);
    assert!(pod.ends_with("/cg1"), "{:?} runs in {pod}", helpers[0]);
    for (pid, cmd) in &helpers {
        assert_eq!(memory_cgroup(*pid), pod, "{cmd}");
    }
    assert_ne!(
        memory_cgroup(std::process::id()),
        pod,
        "the test itself is elsewhere"
    );
    let _ = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "cg1"]);
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    while !ctr(&ctrd, &["task", "delete", "cg1"]).status.success() {
        assert!(Instant::now() < deadline, "task delete");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&ctrd, &["container", "delete", "cg1"]).status.success());
    assert_cgroup_gone(&pod);
    finish_containerd(ctrd, env);
}

/// A pod's teardown kills whatever is left in its cgroup, so a second pod asking for a cgroup
/// that already holds the first one's processes is refused, naming the field, and the first
/// pod runs on (before, the second pod's end killed the first one's virtiofsd: two
/// `ctr run --config` specs from `ctr oci spec` share `/<namespace>`).
#[test]
fn a_pod_is_refused_a_cgroup_that_holds_another_pods_processes() {
    let env = TestEnv::new("ctr-cgroup-shared");
    let ctrd = containerd(&env);
    let cgroup = format!("/pangolin-test/shared-{}", std::process::id());
    let first = ctr(
        &ctrd,
        &pangolin_run(
            &["-d", "--cgroup", &cgroup],
            "cgshared1",
            &["sleep", "3600"],
        ),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let second = ctr(
        &ctrd,
        &pangolin_run(&["--rm", "--cgroup", &cgroup], "cgshared2", &["true"]),
    );
    assert!(
        !second.status.success(),
        "the second pod ran in the first one's cgroup"
    );
    let err = stderr(&second);
    assert!(
        err.contains("linux.cgroupsPath") && err.contains("already holds processes"),
        "{err}"
    );
    let _ = ctr(&ctrd, &["container", "delete", "cgshared2"]);
    let alive = ctr(
        &ctrd,
        &["task", "exec", "--exec-id", "probe", "cgshared1", "true"],
    );
    assert!(
        alive.status.success(),
        "the first pod did not survive: {}",
        stderr(&alive)
    );
    let _ = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "cgshared1"]);
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    while !ctr(&ctrd, &["task", "delete", "cgshared1"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "task delete");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&ctrd, &["container", "delete", "cgshared1"])
        .status
        .success());
    assert_cgroup_gone(&cgroup);
    finish_containerd(ctrd, env);
}

/// The cgroup `path` exists in no cgroup hierarchy of this host (v1 controllers or v2).
fn assert_cgroup_gone(path: &str) {
    let left = cgroup_dirs(path);
    assert!(left.is_empty(), "{left:?} outlived the pod");
}

/// The directories of cgroup `path` in this host's cgroup hierarchies (v1 controllers, v2).
fn cgroup_dirs(path: &str) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mounts
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|root| format!("{root}{path}"))
        .filter(|dir| Path::new(dir).exists())
        .collect()
}

/// `rbind,rro` (Kubernetes `recursiveReadOnly: Enabled`) of a host directory with a tmpfs
/// mounted inside: the container can write to neither, and the share's binds that virtiofsd
/// serves from are read-only too (a guest kernel is not trusted to refuse writes). `rbind,ro`
/// is read-only below its top too: the guest sees the submount as part of one virtio-fs
/// filesystem (runc would leave the submount writable; README, CRI conformance).
#[test]
fn rro_volumes_are_read_only_to_their_submounts_in_the_guest_and_in_virtiofsd() {
    let env = TestEnv::new("ctr-rro");
    let ctrd = containerd(&env);
    let src = env.dir.join("rro-volume");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &src.join("sub"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("tmpfs inside the volume");
    let mount =
        |dst: &str, opts: &str| format!("type=bind,src={},dst={dst},options={opts}", src.display());
    let out = ctr(
        &ctrd,
        &pangolin_run(
            &[
                "-d",
                "--mount",
                &mount("/rro", "rbind:rro"),
                "--mount",
                &mount("/ro", "rbind:ro"),
            ],
            "rro1",
            &["sleep", "3600"],
        ),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        ctrd.log_tail(20)
    );
    let probe = "for f in /rro/top /rro/sub/f /ro/top /ro/sub/f; do \
                 touch $f 2>/dev/null && echo $f:rw || echo $f:ro; done";
    let out = ctr(
        &ctrd,
        &[
            "task",
            "exec",
            "--exec-id",
            "probe",
            "rro1",
            "sh",
            "-c",
            probe,
        ],
    );
    assert_eq!(
        stdout(&out),
        "/rro/top:ro\n/rro/sub/f:ro\n/ro/top:ro\n/ro/sub/f:ro\n",
        "{}",
        stderr(&out)
    );
    // Host side: the share's binds as virtiofsd sees them (volume 0 is /rro, 1 is /ro).
    for (suffix, want) in [
        ("/rro1/mounts/0", "ro"),
        ("/rro1/mounts/0/sub", "ro"),
        ("/rro1/mounts/1", "ro"),
        ("/rro1/mounts/1/sub", "ro"),
    ] {
        let options = virtiofsd_mount_options(&env, suffix);
        assert!(
            !options.is_empty() && options.iter().all(|o| o.split(',').any(|x| x == want)),
            "{suffix} in virtiofsd's namespace: {options:?}, want {want}"
        );
    }
    let _ = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "rro1"]);
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    while !ctr(&ctrd, &["task", "delete", "rro1"]).status.success() {
        assert!(Instant::now() < deadline, "task delete");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&ctrd, &["container", "delete", "rro1"])
        .status
        .success());
    std::fs::write(src.join("sub/after"), "x").expect("the host's own mount is untouched");
    let _ = nix::mount::umount2(&src.join("sub"), nix::mount::MntFlags::MNT_DETACH);
    finish_containerd(ctrd, env);
}

#[test]
fn bind_mounts_reach_the_guest_rw_ro_and_file_and_a_missing_source_is_named() {
    let env = TestEnv::new("ctr-volumes");
    let ctrd = containerd(&env);
    let rw = env.dir.join("rw-volume");
    let ro = env.dir.join("ro-volume");
    std::fs::create_dir_all(&rw).expect("mkdir rw");
    std::fs::create_dir_all(&ro).expect("mkdir ro");
    std::fs::write(ro.join("seed.txt"), "from-the-host\n").expect("seed");
    let greeting = env.dir.join("greeting.txt");
    std::fs::write(&greeting, "hello-file-mount\n").expect("file");
    let mount = |src: &std::path::Path, dst: &str, opts: &str| {
        format!("type=bind,src={},dst={dst},options={opts}", src.display())
    };
    let out = ctr(
        &ctrd,
        &pangolin_run(
            &[
                "--rm",
                "--mount",
                &mount(&rw, "/data", "rbind:rw"),
                "--mount",
                &mount(&ro, "/seed", "rbind:ro"),
                "--mount",
                &mount(&greeting, "/etc/greeting", "rbind:ro"),
            ],
            "vol1",
            &[
                "sh",
                "-c",
                "echo written-in-guest > /data/out.txt; cat /seed/seed.txt /etc/greeting; \
             touch /seed/nope 2>/dev/null || echo ro-refused",
            ],
        ),
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}\n{}",
        stderr(&out),
        ctrd.log_tail(20)
    );
    assert_eq!(text, "from-the-host\nhello-file-mount\nro-refused\n");
    assert_eq!(
        std::fs::read_to_string(rw.join("out.txt")).expect("written through the volume"),
        "written-in-guest\n"
    );
    assert!(!ro.join("nope").exists());

    let out = ctr(
        &ctrd,
        &pangolin_run(
            &[
                "--rm",
                "--mount",
                "type=bind,src=/nonexistent/pangolin-volume,dst=/data,options=rbind:rw",
            ],
            "vol2",
            &["true"],
        ),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("mount /data: host path /nonexistent/pangolin-volume does not exist"),
        "{}",
        stderr(&out)
    );
    let _ = ctr(&ctrd, &["container", "rm", "vol2"]);
    // The volumes' host files survive the container's cleanup.
    assert!(rw.join("out.txt").exists() && ro.join("seed.txt").exists() && greeting.exists());

    // rslave propagation (Kubernetes HostToContainer): a mount made on the host under the
    // volume after the container started shows up inside it.
    let prop = env.dir.join("prop-volume");
    std::fs::create_dir_all(prop.join("later")).expect("mkdir prop");
    let sh = |cmd: String| {
        let st = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .status()
            .expect("sh");
        assert!(st.success(), "{cmd}");
    };
    let p = prop.display();
    sh(format!("mount --bind {p} {p} && mount --make-shared {p}"));
    let out = ctr(
        &ctrd,
        &pangolin_run(
            &["-d", "--mount", &mount(&prop, "/prop", "rbind:rslave")],
            "vol3",
            &["sleep", "600"],
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    sh(format!(
        "mount -t tmpfs tmpfs {p}/later && echo mounted-later > {p}/later/file"
    ));
    let out = ctr(
        &ctrd,
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "vol3",
            "cat",
            "/prop/later/file",
        ],
    );
    let seen = stdout(&out);
    let _ = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "vol3"]);
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    while !stdout(&ctr(&ctrd, &["task", "ls"])).contains("STOPPED") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctr(&ctrd, &["task", "delete", "vol3"]);
    let _ = ctr(&ctrd, &["container", "rm", "vol3"]);
    // Removing the container must not unmount the host's own mount under the volume.
    let kept = std::fs::read_to_string(prop.join("later/file")).unwrap_or_default();
    sh(format!("umount {p}/later && umount {p}"));
    assert_eq!(
        kept, "mounted-later\n",
        "host mount under the volume survives the container"
    );
    assert_eq!(
        seen,
        "mounted-later\n",
        "host mount propagated into the container: {}",
        stderr(&out)
    );
    finish_containerd(ctrd, env);
}
