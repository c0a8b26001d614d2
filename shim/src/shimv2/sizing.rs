//! The pod VM's shape: configuration defaults, then the allow-listed `io.pangolin.*` annotations,
//! then the container's own CPU/memory limits (a VM must fit what it runs).
//!
//! Annotations: `io.pangolin.vcpus` (1-16), `io.pangolin.memory_mib`, `io.pangolin.hypervisor`
//! (`auto|qemu|builtin`). Other `io.pangolin.*` keys are ignored (logged); a malformed value of an
//! allowed key is an error naming it.

use std::collections::HashMap;

use oci_spec::runtime::Spec;
use pangolin_runtime_config::Config;

use super::PodError;

/// Annotation prefix the shim reads.
pub const ANNOTATION_PREFIX: &str = "io.pangolin.";
/// vCPUs of the pod VM.
pub const VCPUS: &str = "io.pangolin.vcpus";
/// Memory of the pod VM in MiB.
pub const MEMORY_MIB: &str = "io.pangolin.memory_mib";
/// Backend for the pod VM.
pub const HYPERVISOR: &str = "io.pangolin.hypervisor";
/// Guest memory kept for the kernel and agent on top of a container's memory limit.
pub const MEMORY_OVERHEAD_MIB: u64 = 64;

fn bad(key: &str, value: &str, why: impl std::fmt::Display) -> PodError {
    PodError::Invalid {
        what: "annotation",
        why: format!("{key}={value:?}: {why}"),
    }
}

/// The VM configuration for a pod whose first task has `spec`.
///
/// # Errors
/// [`PodError::Invalid`] naming the annotation whose value is malformed or out of range.
pub fn vm_config(base: &Config, spec: &Spec) -> Result<Config, PodError> {
    let mut config = base.clone();
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    for (key, value) in annotations {
        if !key.starts_with(ANNOTATION_PREFIX) {
            continue;
        }
        match key.as_str() {
            VCPUS => config.hypervisor.vcpus = value.parse().map_err(|e| bad(key, value, e))?,
            MEMORY_MIB => {
                config.hypervisor.memory_mib = value.parse().map_err(|e| bad(key, value, e))?
            }
            HYPERVISOR => config.hypervisor.kind = value.parse().map_err(|e| bad(key, value, e))?,
            _ => tracing::info!(%key, "ignoring an unknown io.pangolin annotation"),
        }
        if let Err(e) = config.validate() {
            return Err(bad(key, value, e));
        }
    }
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    if let Some(limit) = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(|l| u64::try_from(l).ok())
    {
        let need = (limit >> 20) + MEMORY_OVERHEAD_MIB;
        let need = u32::try_from(need).unwrap_or(u32::MAX).min(65_536);
        config.hypervisor.memory_mib = config.hypervisor.memory_mib.max(need);
    }
    if let Some(cpu) = resources.and_then(|r| r.cpu().as_ref()) {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                let quota = u64::try_from(quota).unwrap_or(0);
                let cpus = quota.div_ceil(period).min(16);
                let cpus = u8::try_from(cpus).unwrap_or(16);
                config.hypervisor.vcpus = config.hypervisor.vcpus.max(cpus);
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pangolin_runtime_config::HypervisorKind;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("spec")
    }

    #[test]
    fn annotations_override_and_bad_ones_are_named() {
        let base = Config::default();
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.pangolin.vcpus":"2","io.pangolin.memory_mib":"512","io.pangolin.hypervisor":"qemu","io.pangolin.unknown":"x","other":"y"}}"#,
        );
        let c = vm_config(&base, &s).expect("config");
        assert_eq!((c.hypervisor.vcpus, c.hypervisor.memory_mib), (2, 512));
        assert_eq!(c.hypervisor.kind, HypervisorKind::Qemu);
        for bad in [
            r#"{"io.pangolin.vcpus":"many"}"#,
            r#"{"io.pangolin.vcpus":"99"}"#,
            r#"{"io.pangolin.memory_mib":"-1"}"#,
            r#"{"io.pangolin.hypervisor":"xen"}"#,
        ] {
            let s = spec(&format!(r#"{{"ociVersion":"1.0.2","annotations":{bad}}}"#));
            let err = vm_config(&base, &s).expect_err(bad).to_string();
            assert!(err.contains("io.pangolin."), "{err}");
        }
    }

    #[test]
    fn container_limits_size_the_vm() {
        let base = Config::default();
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1073741824},"cpu":{"quota":250000,"period":100000}}}}"#,
        );
        let c = vm_config(&base, &s).expect("config");
        assert_eq!(c.hypervisor.memory_mib, 1024 + 64);
        assert_eq!(c.hypervisor.vcpus, 3);
        let small =
            spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1048576}}}}"#);
        assert_eq!(
            vm_config(&base, &small)
                .expect("config")
                .hypervisor
                .memory_mib,
            base.hypervisor.memory_mib
        );
    }
}
