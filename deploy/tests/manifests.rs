//! The Kubernetes manifests parse, and name what the installer and the shim use: the
//! RuntimeClass's handler is the one `pangolin-deploy` adds to containerd, its node selector is
//! the label the installer sets, the DaemonSets run the image `cargo xtask deploy-image` builds
//! with the installer's own arguments.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::Path;

use pangolin_deploy::install::NODE_LABEL;

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{file}: not YAML: {e}"))
        })
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

#[test]
fn the_runtime_class_names_the_installed_handler_its_overhead_and_the_node_label() {
    let docs = documents("runtimeclass.yaml");
    let rc = of_kind(&docs, "RuntimeClass");
    assert_eq!(rc.len(), 1);
    let rc = rc[0];
    assert_eq!(rc["apiVersion"].as_str(), Some("node.k8s.io/v1"));
    assert_eq!(rc["metadata"]["name"].as_str(), Some("pangolin"));
    // The handler `pangolin-deploy install` adds by default (its --handler).
    assert_eq!(rc["handler"].as_str(), Some("pangolin"));
    let fixed = &rc["overhead"]["podFixed"];
    assert!(
        fixed["memory"].as_str().is_some() && fixed["cpu"].as_str().is_some(),
        "{fixed:?}"
    );
    assert_eq!(
        rc["scheduling"]["nodeSelector"][NODE_LABEL.0].as_str(),
        Some(NODE_LABEL.1)
    );
}

#[test]
fn the_daemonsets_run_the_installer_image_privileged_on_the_hosts_root() {
    for (file, verb) in [
        ("pangolin-deploy.yaml", "install"),
        ("pangolin-cleanup.yaml", "uninstall"),
    ] {
        let docs = documents(file);
        let ds = of_kind(&docs, "DaemonSet");
        assert_eq!(ds.len(), 1, "{file}");
        let pod = &ds[0]["spec"]["template"]["spec"];
        assert_eq!(
            pod["hostPID"].as_bool(),
            Some(true),
            "{file}: systemctl needs PID 1"
        );
        let c = &pod["containers"][0];
        assert_eq!(
            c["image"].as_str(),
            Some("pangolin.local/pangolin-deploy:latest"),
            "{file}"
        );
        assert_eq!(
            c["command"][0].as_str(),
            Some("/opt/pangolin/bin/pangolin-deploy"),
            "{file}"
        );
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(args.first(), Some(&verb), "{file}");
        assert!(
            args.contains(&"--root=/host") && args.contains(&"--stay"),
            "{file}: {args:?}"
        );
        assert_eq!(
            c["securityContext"]["privileged"].as_bool(),
            Some(true),
            "{file}"
        );
        assert_eq!(
            c["volumeMounts"][0]["mountPath"].as_str(),
            Some("/host"),
            "{file}"
        );
        assert_eq!(
            pod["volumes"][0]["hostPath"]["path"].as_str(),
            Some("/"),
            "{file}"
        );
        assert_eq!(
            pod["serviceAccountName"].as_str(),
            Some("pangolin-deploy"),
            "{file}"
        );
    }
    let docs = documents("pangolin-deploy.yaml");
    let role = of_kind(&docs, "ClusterRole");
    let verbs = &role[0]["rules"][0]["verbs"];
    assert!(
        verbs
            .as_sequence()
            .is_some_and(|v| v.iter().any(|v| v.as_str() == Some("patch"))),
        "the label needs patch on nodes: {verbs:?}"
    );
    assert_eq!(of_kind(&docs, "ServiceAccount").len(), 1);
    assert_eq!(of_kind(&docs, "ClusterRoleBinding").len(), 1);
}
