//! Bad input in a task's bundle, through the shim's own task API as containerd calls it: each
//! Create is refused with an error naming the field, before any VM boots, the shim keeps
//! serving, and nothing of the task is left (the usual containerd leak checks, and no sandbox
//! directory under the state dir).

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use containerd_shim_protos::ttrpc;
use pangolin_e2e::containerd::Options;
use pangolin_e2e::shim::{bundle, Shim};
use pangolin_e2e::{busybox, finish_containerd, pangolin_containerd, TestEnv};

/// Writes a valid bundle, lets `edit` spoil its config.json, and returns what the shim's
/// Create answered (its status code and message). The shim must then still answer a Create of
/// a good bundle's task id with the same refusal (it is not wedged), and shut down cleanly.
fn refused(name: &str, edit: impl FnOnce(&std::path::Path)) -> (ttrpc::Code, String) {
    let env = TestEnv::new(name);
    let ctrd = pangolin_containerd(&env, Options::default());
    let dir = bundle(&env.dir.join("bundle"), &busybox(), &["true"]).expect("bundle");
    edit(&dir.join("config.json"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let answer = rt.block_on(async {
        let shim = Shim::start(&ctrd, &env, "bad", &dir)
            .await
            .expect("start the shim");
        let first = shim.create("bad").await;
        let again = shim.create("bad").await;
        shim.shutdown().await.expect("shutdown");
        let status = |r: Result<(), ttrpc::Error>| match r {
            Ok(()) => panic!("{name}: the bad bundle was accepted"),
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
            Err(e) => panic!("{name}: not a status: {e}"),
        };
        let (first, again) = (status(first), status(again));
        assert_eq!(first, again, "the shim answers the same the second time");
        first
    });
    let left: Vec<_> = std::fs::read_dir(&env.state)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let left: Vec<_> = left
        .into_iter()
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(
        left.is_empty(),
        "{name}: left under the state dir: {left:?}"
    );
    finish_containerd(ctrd, env);
    answer
}

/// Replaces `from` with `to` in the file (which must hold it).
fn replace(path: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("config.json");
    assert!(text.contains(from), "{from} not in {text}");
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

/// Adds `"annotations": {key: value}` to the spec.
fn annotate(path: &std::path::Path, key: &str, value: &str) {
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("config.json")).expect("json");
    spec["annotations"] = serde_json::json!({ key: value });
    std::fs::write(path, spec.to_string()).expect("write");
}

fn assert_names(answer: &(ttrpc::Code, String), field: &str) {
    assert_eq!(answer.0, ttrpc::Code::INVALID_ARGUMENT, "{answer:?}");
    assert!(
        answer.1.contains(field),
        "the error names {field}: {answer:?}"
    );
}

#[test]
fn a_config_json_that_is_not_json_is_refused_naming_it() {
    let answer = refused("bad-json", |p| {
        std::fs::write(p, "{\"ociVersion\": \"1.0.2\", ").expect("write");
    });
    assert_names(&answer, "config.json");
}

#[test]
fn a_field_of_the_wrong_type_is_refused_naming_its_path() {
    let answer = refused("bad-field", |p| replace(p, "\"uid\":0", "\"uid\":\"root\""));
    assert_names(&answer, "process.user.uid");
}

#[test]
fn a_spec_larger_than_an_agent_call_is_refused_by_its_size() {
    let answer = refused("bad-huge", |p| {
        replace(
            p,
            "\"args\":[\"true\"",
            &format!("\"args\":[\"true\",\"{}\"", "x".repeat(6 << 20)),
        );
    });
    assert_names(&answer, "larger than 4194304 bytes");
}

#[test]
fn absurd_vcpu_and_memory_annotations_are_refused_naming_them() {
    for (key, value) in [
        ("io.pangolin.vcpus", "0"),
        ("io.pangolin.vcpus", "1000000"),
        ("io.pangolin.memory_mib", "0"),
        ("io.pangolin.memory_mib", "1099511627776"),
    ] {
        let answer = refused("bad-size", |p| annotate(p, key, value));
        assert_names(&answer, key);
    }
}

#[test]
fn a_root_path_that_climbs_out_of_the_bundle_is_refused() {
    let answer = refused("bad-root", |p| {
        let text = std::fs::read_to_string(p).expect("config.json");
        let mut spec: serde_json::Value = serde_json::from_str(&text).expect("json");
        spec["root"]["path"] = serde_json::json!("../../../../../../etc");
        std::fs::write(p, spec.to_string()).expect("write");
    });
    assert_names(&answer, "root.path");
}

/// A volume's host directory removed between Create and Start: the bind made at Create keeps
/// what the container sees (the removed directory, empty), the task starts and ends normally,
/// and Delete leaves nothing (the bind in the share is unmounted: the leak checks).
#[test]
fn a_volume_source_that_vanishes_between_create_and_start_leaves_nothing() {
    let env = TestEnv::new("bad-vanish");
    let ctrd = pangolin_containerd(&env, Options::default());
    let source = env.dir.join("vanishing");
    std::fs::create_dir_all(&source).expect("mkdir");
    std::fs::write(source.join("file"), "there").expect("file");
    let dir = bundle(
        &env.dir.join("bundle"),
        &busybox(),
        &["sh", "-c", "ls -A /v | wc -l > /dev/null; test -d /v"],
    )
    .expect("bundle");
    let config = dir.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).expect("config.json"))
            .expect("json");
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/v", "type": "bind", "source": source,
            "options": ["rbind", "rw"],
        }));
    std::fs::write(&config, spec.to_string()).expect("write");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let status = rt.block_on(async {
        let shim = Shim::start(&ctrd, &env, "vanish", &dir)
            .await
            .expect("start the shim");
        shim.create("vanish").await.expect("create");
        std::fs::remove_dir_all(&source).expect("remove the volume's source");
        let started = shim.start_task("vanish").await;
        let status = match started {
            Ok(_) => Some(shim.wait("vanish").await.expect("wait")),
            Err(_) => None,
        };
        shim.delete("vanish").await.expect("delete");
        shim.shutdown().await.expect("shutdown");
        status
    });
    assert_eq!(status, Some(0), "the task did not run to its end");
    finish_containerd(ctrd, env);
}
