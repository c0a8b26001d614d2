//! What the guest sees of a container's bundle spec: host-only objects (host hooks, namespace
//! paths, the network namespace) removed, a cgroup namespace and the pod hostname added; and
//! which network namespace a pod's VM serves.

use std::path::PathBuf;

use oci_spec::runtime::{Hooks, LinuxNamespace, LinuxNamespaceType, Spec};

use super::PodError;

/// The network namespace the pod's VM serves: the spec's network namespace path (CNI's, for a
/// CRI sandbox), or None for a fresh namespace (`ctr run`: the VM gets no NIC). A spec without a
/// network namespace asks for the host's network, which a VM cannot join: refused.
pub fn pod_netns(spec: &Spec) -> Result<Option<PathBuf>, PodError> {
    match namespace(spec, LinuxNamespaceType::Network) {
        Some(ns) => Ok(ns.path().clone()),
        None => Err(PodError::Invalid {
            what: "network namespace",
            why: "host networking (hostNetwork: true, ctr --net-host) is not supported: a pod's \
                  microVM cannot join the host's network namespace"
                .into(),
        }),
    }
}

/// The spec's `linux.namespaces` entry of kind `typ`, if it has one (no entry: the host's).
fn namespace(spec: &Spec, typ: LinuxNamespaceType) -> Option<&LinuxNamespace> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|nss| nss.iter().find(|ns| ns.typ() == typ))
}

/// Refuses a container that asks for the host's PID or IPC namespace (CRI's `hostPID` /
/// `hostIPC`: the spec then has no `pid` / `ipc` namespace entry at all): the container runs in
/// a microVM, which cannot share either with the host, so it would otherwise get a private one
/// in the guest silently. A namespace with a path (another container's, the pod's) is not the
/// host's and passes.
pub fn refuse_host_namespaces(spec: &Spec) -> Result<(), PodError> {
    for (typ, what, field) in [
        (LinuxNamespaceType::Pid, "PID namespace", "hostPID: true"),
        (LinuxNamespaceType::Ipc, "IPC namespace", "hostIPC: true"),
    ] {
        if namespace(spec, typ).is_none() {
            return Err(PodError::Invalid {
                what,
                why: format!(
                    "the host's {what} ({field}) is not supported: a pod's microVM cannot share \
                     it with the host"
                ),
            });
        }
    }
    Ok(())
}

/// The spec's `startContainer` hooks alone, if it has any.
fn only_start_container(spec: &Spec) -> Option<Hooks> {
    let start = spec.hooks().as_ref()?.start_container().clone()?;
    let mut hooks = Hooks::default();
    hooks.set_start_container(Some(start));
    Some(hooks)
}

/// The bundle's spec as the guest should see it: host namespace paths dropped and of the hooks
/// only `startContainer` kept (the others run on the host, [`super::hooks`]; `startContainer`
/// runs in the container, its path is the container's), no network namespace (containers share the guest's, where the agent
/// configured the pod's interface), a private cgroup namespace (the guest is cgroup v2, where containerd and
/// Docker give each container its own, so `/sys/fs/cgroup` shows the container's limits). Bind
/// mounts must already point into the share ([`super::volumes::share`]).
///
/// PID and IPC namespaces with a path are kept: CRI's POD mode (the default) names the
/// sandbox container's, `/proc/<pid>/ns/pid|ipc` with the pid this shim reported for it,
/// which is its pid in the guest, so the container joins it there (and sees the pod's IPC
/// sysctls). Such a path must name the namespace of kind `pid` or `ipc` of one of
/// `pod_inits` (the guest pids of the pod's running containers): anything else (the guest's
/// own PID 1, the agent) is refused.
pub fn guest_spec(
    mut spec: Spec,
    pod_hostname: Option<&str>,
    pod_inits: &[u32],
) -> Result<String, PodError> {
    spec.set_hooks(only_start_container(&spec));
    let joins_pod_uts =
        namespace(&spec, LinuxNamespaceType::Uts).is_some_and(|ns| ns.path().is_some());
    if joins_pod_uts && spec.hostname().is_none() {
        // The container joins the pod's UTS namespace: in the guest it gets a fresh one, named
        // as the pod.
        spec.set_hostname(pod_hostname.map(str::to_string));
    }
    refuse_bidirectional_mounts(&spec)?;
    if let Some(linux) = spec.linux_mut() {
        let propagation = linux
            .rootfs_propagation()
            .as_deref()
            .map(guest_rootfs_propagation)
            .transpose()?;
        linux.set_rootfs_propagation(propagation.map(str::to_string));
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
        for ns in &mut namespaces {
            let joins_pod = match (ns.typ(), ns.path()) {
                (typ @ (LinuxNamespaceType::Pid | LinuxNamespaceType::Ipc), Some(path)) => {
                    check_pod_namespace(typ, path, pod_inits)?;
                    true
                }
                _ => false,
            };
            if !joins_pod {
                ns.set_path(None);
            }
        }
        if !namespaces
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::Cgroup)
        {
            let mut cgroup = LinuxNamespace::default();
            cgroup.set_typ(LinuxNamespaceType::Cgroup);
            namespaces.push(cgroup);
        }
        linux.set_namespaces(Some(namespaces));
    }
    serde_json::to_string(&spec).map_err(|e| PodError::Invalid {
        what: "bundle config.json",
        why: e.to_string(),
    })
}

/// `linux.rootfsPropagation` as the guest's libcontainer takes it. It applies every mode
/// recursively and knows only the names without `r` (containerd sends `rslave` for a
/// HostToContainer volume and `rprivate` by default), so the `r` forms map onto those. Shared
/// propagation (containerd's `rshared`, for a Bidirectional volume) is refused: mounts a
/// container makes cannot reach the host through virtio-fs.
fn guest_rootfs_propagation(mode: &str) -> Result<&'static str, PodError> {
    match mode {
        "rslave" | "slave" => Ok("slave"),
        "rprivate" | "private" => Ok("private"),
        "runbindable" | "unbindable" => Ok("unbindable"),
        "rshared" | "shared" => Err(PodError::Invalid {
            what: "linux.rootfsPropagation",
            why: format!(
                "{mode} (Bidirectional mount propagation) is not supported: mounts made in the \
                 container cannot propagate to the host through the VM's virtio-fs share"
            ),
        }),
        other => Err(PodError::Invalid {
            what: "linux.rootfsPropagation",
            why: format!("unknown mode {other:?}"),
        }),
    }
}

/// Refuses a mount with shared propagation (containerd's `rshared` option for a Bidirectional
/// volume): as for [`guest_rootfs_propagation`], nothing mounted in the guest can reach the host.
fn refuse_bidirectional_mounts(spec: &Spec) -> Result<(), PodError> {
    for m in spec.mounts().iter().flatten() {
        let shared = m
            .options()
            .iter()
            .flatten()
            .any(|o| o == "rshared" || o == "shared");
        if shared {
            return Err(PodError::Invalid {
                what: "mounts",
                why: format!(
                    "{}: shared (Bidirectional) propagation is not supported: mounts made in the \
                     container cannot propagate to the host through the VM's virtio-fs share",
                    m.destination().display()
                ),
            });
        }
    }
    Ok(())
}

/// `path` is `/proc/<pid>/ns/<kind>` for one of `pod_inits` and the kind of `typ`.
fn check_pod_namespace(
    typ: LinuxNamespaceType,
    path: &std::path::Path,
    pod_inits: &[u32],
) -> Result<(), PodError> {
    let kind = if typ == LinuxNamespaceType::Pid {
        "pid"
    } else {
        "ipc"
    };
    let pid = path
        .to_str()
        .and_then(|p| p.strip_prefix("/proc/"))
        .and_then(|p| p.strip_suffix(&format!("/ns/{kind}")))
        .and_then(|p| p.parse::<u32>().ok());
    match pid {
        Some(pid) if pod_inits.contains(&pid) => Ok(()),
        _ => Err(PodError::Invalid {
            what: "linux.namespaces",
            why: format!(
                "{kind} namespace path {}: not the {kind} namespace of a running container of \
                 this pod (/proc/<its pid>/ns/{kind})",
                path.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec whose `linux.namespaces` is the JSON array `nss`.
    fn with(nss: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":{nss}}}}}"#
        ))
        .expect("spec")
    }

    #[test]
    fn guest_spec_drops_host_namespaces_and_host_hooks_and_adds_a_cgroup_namespace() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2",
                "hooks":{"createRuntime":[{"path":"/usr/bin/true"}],
                         "startContainer":[{"path":"/bin/in-container"}],
                         "poststop":[{"path":"/usr/bin/true"}]},
                "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                          {"destination":"/etc/hosts","type":"bind","source":"/var/lib/x/hosts","options":["rbind","ro"]}],
                "linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"},
                                       {"type":"uts","path":"/proc/1/ns/uts"}]}}"#,
        )
        .expect("spec");
        let out: serde_json::Value =
            serde_json::from_str(&guest_spec(spec, Some("pod1"), &[]).expect("guest spec"))
                .expect("json");
        assert_eq!(
            out["hooks"],
            serde_json::json!({"startContainer": [{"path": "/bin/in-container"}]}),
            "only startContainer runs in the guest"
        );
        let mounts = out["mounts"].as_array().expect("mounts");
        assert_eq!(mounts.len(), 2, "mounts kept: {mounts:?}");
        let nss = out["linux"]["namespaces"].as_array().expect("namespaces");
        let types: Vec<&str> = nss.iter().filter_map(|n| n["type"].as_str()).collect();
        assert_eq!(
            types,
            ["pid", "uts", "cgroup"],
            "network dropped: the guest's is shared"
        );
        assert_eq!(
            out["hostname"], "pod1",
            "joins the pod's UTS: named as the pod"
        );
        assert!(nss.iter().all(|n| n.get("path").is_none()), "{nss:?}");

        // An existing cgroup namespace is kept, not doubled.
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"cgroup"}]}}"#,
        )
        .expect("spec");
        let out = guest_spec(spec, None, &[]).expect("guest spec");
        assert_eq!(out.matches("\"cgroup\"").count(), 1, "{out}");
    }

    #[test]
    fn pid_and_ipc_namespaces_of_the_pods_containers_are_joined_and_no_others() {
        let spec = |pid: &str, ipc: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[
                    {{"type":"pid","path":"{pid}"}},{{"type":"ipc","path":"{ipc}"}},
                    {{"type":"uts","path":"/proc/7/ns/uts"}},{{"type":"mount"}}]}}}}"#
            ))
            .expect("spec")
        };
        let out: serde_json::Value = serde_json::from_str(
            &guest_spec(spec("/proc/7/ns/pid", "/proc/7/ns/ipc"), None, &[3, 7])
                .expect("joins the pod's"),
        )
        .expect("json");
        let nss = out["linux"]["namespaces"].as_array().expect("namespaces");
        let path = |typ: &str| {
            nss.iter()
                .find(|n| n["type"] == typ)
                .and_then(|n| n.get("path"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        assert_eq!(path("pid").as_deref(), Some("/proc/7/ns/pid"));
        assert_eq!(path("ipc").as_deref(), Some("/proc/7/ns/ipc"));
        assert_eq!(path("uts"), None, "a fresh UTS namespace named as the pod");
        for (pid, ipc) in [
            ("/proc/1/ns/pid", "/proc/7/ns/ipc"), // the guest's init (the agent)
            ("/proc/7/ns/pid", "/proc/9/ns/ipc"), // no container of the pod
            ("/proc/7/ns/ipc", "/proc/7/ns/ipc"), // another kind
            ("/proc/7/../1/ns/pid", "/proc/7/ns/ipc"), // not the plain form
            ("/var/run/ns/pid", "/proc/7/ns/ipc"),
        ] {
            let err = guest_spec(spec(pid, ipc), None, &[3, 7]).expect_err(pid);
            assert!(err.to_string().starts_with("linux.namespaces"), "{err}");
        }
    }

    #[test]
    fn rootfs_propagation_takes_the_forms_libcontainer_knows_and_shared_is_refused() {
        let spec = |mode: &str, option: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2",
                    "mounts":[{{"destination":"/v","type":"bind","source":"/s","options":["rbind","{option}"]}}],
                    "linux":{{"rootfsPropagation":"{mode}"}}}}"#
            ))
            .expect("spec")
        };
        for (mode, want) in [
            ("rslave", "slave"),
            ("rprivate", "private"),
            ("slave", "slave"),
        ] {
            let out: serde_json::Value =
                serde_json::from_str(&guest_spec(spec(mode, "rslave"), None, &[]).expect(mode))
                    .expect("json");
            assert_eq!(out["linux"]["rootfsPropagation"], want, "{mode}");
        }
        let err = guest_spec(spec("rshared", "rprivate"), None, &[]).expect_err("rshared");
        assert!(
            err.to_string()
                .starts_with("linux.rootfsPropagation: rshared"),
            "{err}"
        );
        let err = guest_spec(spec("rslave", "rshared"), None, &[]).expect_err("shared mount");
        assert!(err.to_string().starts_with("mounts: /v: shared"), "{err}");
        let err = guest_spec(spec("bogus", "rslave"), None, &[]).expect_err("unknown");
        assert!(err.to_string().contains("unknown mode"), "{err}");
    }

    #[test]
    fn the_hosts_pid_and_ipc_namespaces_are_refused_naming_the_pod_field() {
        let private = with(r#"[{"type":"pid"},{"type":"ipc"},{"type":"network"}]"#);
        refuse_host_namespaces(&private).expect("private namespaces");
        let joined = with(
            r#"[{"type":"pid","path":"/proc/7/ns/pid"},{"type":"ipc","path":"/proc/7/ns/ipc"}]"#,
        );
        refuse_host_namespaces(&joined).expect("the pod's namespaces");
        let err = refuse_host_namespaces(&with(r#"[{"type":"ipc"}]"#)).expect_err("host pid");
        assert!(err.to_string().contains("hostPID: true"), "{err}");
        let err = refuse_host_namespaces(&with(r#"[{"type":"pid"}]"#)).expect_err("host ipc");
        assert!(err.to_string().contains("hostIPC: true"), "{err}");
        let bare: Spec = serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).expect("spec");
        assert!(
            refuse_host_namespaces(&bare).is_err(),
            "no linux section: the host's"
        );
    }

    #[test]
    fn pod_netns_is_the_specs_path_none_for_a_fresh_one_and_host_networking_is_refused() {
        let cni = with(r#"[{"type":"network","path":"/var/run/netns/cni-1"}]"#);
        assert_eq!(
            pod_netns(&cni).expect("cni"),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(
            pod_netns(&with(r#"[{"type":"network"}]"#)).expect("fresh"),
            None
        );
        let err = pod_netns(&with(r#"[{"type":"pid"}]"#)).expect_err("host network");
        assert!(err.to_string().contains("host networking"), "{err}");
    }
}
