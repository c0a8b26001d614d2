//! A pod under pressure from its own workload, through a real (private) containerd and `ctr`:
//! the guest runs out of memory (the whole guest, not a container cgroup), a volume or the
//! rootfs fills up, a process writes output far faster than its reader takes it. Each time the
//! pod and its shim stay responsive (an exec still answers), nothing is lost, and nothing is
//! left after.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pangolin_e2e::containerd::{Options, PrivateContainerd};
use pangolin_e2e::ctr::{containerd, containerd_with, ctr, pangolin_run, remove_task};
use pangolin_e2e::{finish_containerd, patience, stderr, stdout, TestEnv};

/// `ctr task exec` of `cmd` in `id`; its output.
fn exec(ctrd: &PrivateContainerd, id: &str, exec_id: &str, cmd: &[&str]) -> std::process::Output {
    let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
    args.extend_from_slice(cmd);
    ctr(ctrd, &args)
}

/// Writes `mib` MiB of zeros to `path` in `id`, more than its file system holds: the write must
/// fail with ENOSPC (dd says so and exits non-zero).
fn fill_until_enospc(ctrd: &PrivateContainerd, id: &str, path: &str, mib: u32) {
    let script = format!("dd if=/dev/zero of={path} bs=1M count={mib} 2>&1; echo status=$?");
    let fill = exec(ctrd, id, "fill", &["sh", "-c", &script]);
    let text = format!("{}{}", stdout(&fill), stderr(&fill));
    assert!(
        text.contains("No space left on device") && !text.contains("status=0"),
        "the write to {path} did not fail with ENOSPC: {text}"
    );
}

/// The pod still answers: an exec prints what it is asked to, and the task runs.
fn assert_responsive(ctrd: &PrivateContainerd, id: &str, after: &str) {
    let out = exec(ctrd, id, "alive", &["echo", "alive"]);
    assert!(
        out.status.success() && stdout(&out).trim() == "alive",
        "after {after}: the exec did not answer: {} {}",
        stdout(&out),
        stderr(&out)
    );
    let tasks = stdout(&ctr(ctrd, &["task", "ls"]));
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING")),
        "after {after}: the task does not run:\n{tasks}"
    );
}

/// The guest's memory runs out (no container limit: the guest kernel's own OOM killer acts,
/// not a cgroup's): the process eating it is killed (137), the agent (PID 1, which the kernel
/// never picks) and the shim go on serving.
#[test]
fn a_guest_out_of_memory_kills_the_process_not_the_pod() {
    let env = TestEnv::new("pressure-oom");
    let ctrd = containerd(&env);
    let id = "pressoom";
    let out = ctr(&ctrd, &pangolin_run(&["-d"], id, &["sleep", "3600"]));
    assert!(out.status.success(), "{}", stderr(&out));
    // `tail` keeps the last line of a newline-free stream: it grows until the guest is full.
    let hog = exec(&ctrd, id, "hog", &["tail", "/dev/zero"]);
    assert_eq!(
        hog.status.code(),
        Some(137),
        "the memory hog was not killed: {} {}",
        stdout(&hog),
        stderr(&hog)
    );
    assert_responsive(&ctrd, id, "the guest ran out of memory");
    remove_task(&ctrd, id);
    finish_containerd(ctrd, env);
}

/// A volume on a full file system: the write fails with ENOSPC in the container (the host
/// file system says so through virtio-fs), the pod goes on, and the volume holds what fitted.
#[test]
fn a_full_volume_fails_the_write_not_the_pod() {
    let env = TestEnv::new("pressure-full");
    let ctrd = containerd(&env);
    let volume = env.dir.join("small-volume");
    std::fs::create_dir_all(&volume).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&volume)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mount a small tmpfs");
    let id = "pressfull";
    let mount = format!("type=bind,src={},dst=/v,options=rbind:rw", volume.display());
    let out = ctr(
        &ctrd,
        &pangolin_run(&["-d", "--mount", &mount], id, &["sleep", "3600"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    fill_until_enospc(&ctrd, id, "/v/fill", 64);
    let host_size = std::fs::metadata(volume.join("fill")).map_or(0, |m| m.len());
    assert!(
        host_size > 4 << 20 && host_size <= 8 << 20,
        "the host file holds {host_size} bytes"
    );
    assert_responsive(&ctrd, id, "its volume filled up");
    remove_task(&ctrd, id);
    let _ = std::process::Command::new("umount").arg(&volume).status();
    finish_containerd(ctrd, env);
}

/// The rootfs on a full file system (containerd's root, where the snapshots live, on a 48 MiB
/// tmpfs: a node whose image disk fills up): the container's write fails with ENOSPC, the
/// pod goes on, and once the file is removed the rootfs takes writes again. The space is the
/// snapshotter's, as with runc: Pangolin adds no per-pod quota (the README says so).
#[test]
fn a_full_rootfs_fails_the_write_not_the_pod() {
    let env = TestEnv::new("pressure-rootfs");
    let ctrd = containerd_with(
        &env,
        Options {
            root_size_mib: Some(48),
            ..Options::default()
        },
    );
    let id = "pressroot";
    let out = ctr(&ctrd, &pangolin_run(&["-d"], id, &["sleep", "3600"]));
    assert!(out.status.success(), "{}", stderr(&out));
    fill_until_enospc(&ctrd, id, "/fill", 96);
    assert_responsive(&ctrd, id, "its rootfs filled up");
    let freed = exec(
        &ctrd,
        id,
        "free",
        &["sh", "-c", "rm /fill && echo again > /again && cat /again"],
    );
    assert!(
        freed.status.success() && stdout(&freed).trim() == "again",
        "the rootfs took no write after the file was removed: {} {}",
        stdout(&freed),
        stderr(&freed)
    );
    remove_task(&ctrd, id);
    finish_containerd(ctrd, env);
}

/// A process writes 2 million numbered lines as fast as it can while its reader (ctr's
/// stdout, read here) stalls for 3 s at the start and then reads slowly: the guest and shim
/// hold the output back (no loss), every line arrives once and in order, and the pod stays
/// responsive meanwhile.
#[test]
fn output_far_faster_than_its_reader_loses_no_line() {
    const LINES: u64 = 2_000_000;
    let env = TestEnv::new("pressure-flood");
    let ctrd = containerd(&env);
    let id = "pressflood";
    let out = ctr(&ctrd, &pangolin_run(&["-d"], id, &["sleep", "3600"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = LINES.to_string();
    let mut child = ctrd
        .ctr(["task", "exec", "--exec-id", "flood", id, "seq", "1", &lines])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task exec");
    std::thread::sleep(Duration::from_secs(3));
    // The writer is blocked on its full pipe now: the pod must still answer.
    assert_responsive(&ctrd, id, "output backed up");
    let reader = BufReader::new(child.stdout.take().expect("stdout"));
    let started = Instant::now();
    let mut expected = 1u64;
    let mut broken = None;
    for line in reader.lines() {
        let line = line.expect("a line");
        if broken.is_none() && line != expected.to_string() {
            broken = Some(format!("line {expected} was {line:?}"));
        }
        expected += 1;
        if expected.is_multiple_of(200_000) {
            // A slow reader.
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            started.elapsed() < patience(Duration::from_secs(300)),
            "the output did not end"
        );
    }
    let status = child.wait().expect("wait");
    assert_eq!(broken, None, "output was lost or reordered");
    assert_eq!(expected - 1, LINES, "lines received");
    assert!(status.success(), "the exec failed: {status}");
    remove_task(&ctrd, id);
    finish_containerd(ctrd, env);
}
