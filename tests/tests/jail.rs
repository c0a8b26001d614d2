//! The built-in VMM's jail, read off the live process: every thread runs as the configured
//! non-root uid/gid with no capability in any set and no_new_privs, in mount, IPC, UTS and
//! network namespaces of its own whose root holds only the path to the sandbox directory, and it holds
//! no descriptor it was not given for the VM, and every thread runs under its seccomp filter. Runs on any KVM (on this project's PVM machines
//! the guest never finishes booting, but the VMM runs; in the nested test host it boots).

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::Path;
use std::time::{Duration, Instant};

use pangolin_e2e::{patience, wait_for_end, TestEnv};

/// `key:` fields of a `/proc/<pid>/task/<tid>/status` text, whitespace-joined.
fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| format!("<no {key}>"))
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn the_builtin_vmm_runs_jailed_without_privileges_namespaces_or_stray_descriptors() {
    let env = TestEnv::with("jail", |c| c.hypervisor.boot_timeout_ms = 60_000);
    let (uid, gid) = (env.config.jail.uid, env.config.jail.gid);
    let mut child = env.spawn_builtin_run(&["sleep", "20"]);
    // The VMM once its vCPU thread runs (it jails itself before it creates any thread).
    let vmm = env
        .wait_for_vmm_with_vcpu(Duration::from_secs(30))
        .to_string();
    // The vCPU threads exist (and hold their filters) a moment before the main thread installs
    // its own and opens the start gate: give it that moment (seconds in the nested test host).
    let filtered = |task: &std::fs::DirEntry| {
        std::fs::read_to_string(task.path().join("status"))
            .is_ok_and(|s| field(&s, "Seccomp") == "2")
    };
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    let tasks: Vec<_> = loop {
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{vmm}/task"))
            .expect("tasks")
            .flatten()
            .collect();
        if tasks.iter().all(filtered) || Instant::now() > deadline {
            break tasks;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(tasks.len() >= 2, "main thread and at least one vCPU thread");
    for task in &tasks {
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        let name = field(&status, "Name");
        let ids = |v: u32| format!("{v} {v} {v} {v}");
        assert_eq!(field(&status, "Uid"), ids(uid), "{name}");
        assert_eq!(field(&status, "Gid"), ids(gid), "{name}");
        assert_eq!(field(&status, "Groups"), "", "{name}");
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{name}");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(&status, caps), "0000000000000000", "{name} {caps}");
        }
        // Each thread its own filter (`hypervisor.seccomp = true`, the default): the vCPUs
        // install theirs before the main thread installs its own, so none stacks on another.
        assert_eq!(field(&status, "Seccomp"), "2", "{name} seccomp mode");
        assert_eq!(field(&status, "Seccomp_filters"), "1", "{name} filters");
    }
    for kind in ["mnt", "ipc", "uts", "net"] {
        assert_ne!(
            ns(&vmm, kind),
            ns("self", kind),
            "{kind} namespace is the host's"
        );
    }
    // Its root holds only the path down to its sandbox directory.
    let top: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root"))
        .expect("root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let first = env
        .state
        .components()
        .nth(1)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    assert_eq!(top, [first], "the jail's root");
    // Every descriptor is one of the VM's: KVM objects, eventfds, sockets, guest RAM, its logs.
    for fd in std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .expect("fds")
        .flatten()
    {
        let target = std::fs::read_link(fd.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let ours = target.starts_with("anon_inode:")
            || target.starts_with("socket:")
            || target.starts_with("/memfd:pangolin-guest-ram")
            || target == "/dev/kvm"
            || (target.starts_with(&env.state.display().to_string())
                && (target.ends_with("/vmm.log") || target.ends_with("/console.log")));
        assert!(
            ours,
            "VMM holds descriptor {:?} -> {target}",
            fd.file_name()
        );
    }
    // The run ends on its own: `sleep 20` finishes where the guest boots (hardware KVM), the
    // emulation gives up where it cannot (PVM: "KVM internal error"); either way it cleans up
    // after the jailed VMM (whose directory belongs to the jail's uid).
    let status = wait_for_end(&mut child, Duration::from_secs(120));
    let expected = if pangolin_e2e::host_has_hardware_kvm() {
        0
    } else {
        125
    };
    assert_eq!(status.code(), Some(expected), "pangolin run");
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "the VMM outlived the run"
    );
    env.finish();
}

/// `[jail] per_vm_ids`: two VMMs running at once get two different ids from the range, and
/// the ids are free again once the runs ended.
#[test]
fn per_vm_ids_give_concurrent_vmms_distinct_uids_from_the_range() {
    let env = TestEnv::with("jail-ids", |c| {
        c.hypervisor.boot_timeout_ms = 60_000;
        c.jail.per_vm_ids = true;
        c.jail.first_per_vm_id = 300_000;
        c.jail.per_vm_id_count = 8;
    });
    let mut runs = [
        env.spawn_builtin_run(&["sleep", "20"]),
        env.spawn_builtin_run(&["sleep", "20"]),
    ];
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    let uids = loop {
        let mut uids: Vec<String> = env
            .vmm_pids()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .map(|s| field(&s, "Uid"))
            .filter(|u| u.starts_with("300"))
            .collect();
        uids.sort();
        if uids.len() == 2 {
            break uids;
        }
        assert!(
            Instant::now() < deadline,
            "two jailed VMMs never ran at once: {uids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(uids[0], uids[1], "each VMM its own uid");
    for u in &uids {
        let id: u32 = u
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .expect("uid");
        assert!((300_000..300_008).contains(&id), "{id} outside the range");
    }
    for run in &mut runs {
        wait_for_end(run, Duration::from_secs(120));
    }
    assert!(
        !env.state.join(".jail-ids").exists(),
        "the ids were not released"
    );
    env.finish();
}

/// `hypervisor.seccomp = false` leaves the VMM's threads unfiltered (the jail still holds) and
/// says so in the VMM's log.
#[test]
fn seccomp_false_runs_the_vmm_unfiltered_and_logs_it() {
    let env = TestEnv::with("jail-noseccomp", |c| {
        c.hypervisor.boot_timeout_ms = 60_000;
        c.hypervisor.seccomp = false;
    });
    let mut child = env.spawn_builtin_run(&["sleep", "5"]);
    let vmm = env.wait_for_vmm_with_vcpu(Duration::from_secs(30));
    let log = std::fs::read_dir(&env.state)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|d| std::fs::read_to_string(d.path().join("vmm.log")).ok())
        .unwrap_or_default();
    for task in std::fs::read_dir(format!("/proc/{vmm}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        let name = field(&status, "Name");
        assert_eq!(field(&status, "Seccomp"), "0", "{name}");
        assert_eq!(
            field(&status, "NoNewPrivs"),
            "1",
            "{name}: the jail still holds"
        );
    }
    assert!(
        log.contains("seccomp = false"),
        "the VMM's log does not say it runs unfiltered:\n{log}"
    );
    wait_for_end(&mut child, Duration::from_secs(120));
    env.finish();
}
