//! What a pod brings to the host side: the bundle's OCI config.json as the shim reads it
//! (`shimv2::bundle::parse_spec`: oci-spec's `Spec`, an error naming the field), then the shim's
//! own shaping of it: the pod network namespace (`pod_netns`), the guest's spec (`guest_spec`:
//! host namespaces and hooks dropped, a cgroup namespace added), the VM size from annotations and
//! resource limits (`vm_config` over the default configuration), and the bind-mount options of
//! every mount (`is_bind`, `readonly_of`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use pangolin_runtime_config::Config;
use pangolin_shim::shimv2::guest_spec::{guest_spec, pod_netns};
use pangolin_shim::shimv2::sizing::{vm_config_on, HostSize};
use pangolin_shim::shimv2::volumes::{is_bind, readonly_of};

fuzz_target!(|data: &[u8]| {
    // As the shim reads a bundle: the error names the field.
    let Ok(spec) = pangolin_shim::shimv2::bundle::parse_spec(data) else { return };
    let _ = pod_netns(&spec);
    if let Some(mounts) = spec.mounts() {
        for m in mounts {
            let _ = (is_bind(m), readonly_of(m));
        }
    }
    let base = Config::default();
    // A fixed host: probing this one would read /proc/meminfo for every input.
    let host = HostSize {
        cpus: 16,
        memory_mib: 65_536,
    };
    if let Ok(config) = vm_config_on(&base, &spec, host) {
        assert!(config.validate().is_ok(), "vm_config produced an invalid configuration");
    }
    let hostname = spec.hostname().clone();
    if let Ok(json) = guest_spec(spec, Some("pod"), &[7]) {
        let guest: Spec = serde_json::from_str(&json).expect("guest_spec emits a valid spec");
        assert!(guest.hooks().is_none(), "hooks reach the guest");
        if let Some(nss) = guest.linux().as_ref().and_then(|l| l.namespaces().as_ref()) {
            assert!(nss.iter().all(|ns| ns.path().is_none()), "host namespace path reaches the guest");
            assert!(!nss.iter().any(|ns| ns.typ() == LinuxNamespaceType::Network));
        }
        if hostname.is_some() {
            assert_eq!(guest.hostname(), &hostname);
        }
    }
});
