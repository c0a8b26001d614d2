//! The configuration structs, their defaults, and parsing from TOML.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, ParseEnumError};

/// Where the shim looks when no `--config` is given, so packagers know where to install it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pangolin/configuration.toml";

/// Defines a lowercase string enum whose spellings are written once and shared by serde,
/// `FromStr` and `Display`, so the file and the CLI can never disagree.
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every accepted spelling, for help texts and error messages.
            pub const VALUES: &'static [&'static str] = &[$($text),+];

            /// The spelling used in the file and on the command line.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;

            fn from_str(s: &str) -> Result<Self, ParseEnumError> {
                match s {
                    $( $text => Ok(Self::$variant), )+
                    _ => Err(ParseEnumError::new(s, Self::VALUES)),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = ParseEnumError;

            fn try_from(s: String) -> Result<Self, ParseEnumError> {
                s.parse()
            }
        }

        impl From<$name> for &'static str {
            fn from(value: $name) -> Self {
                value.as_str()
            }
        }
    };
}

string_enum! {
    /// Which VMM boots the pod's microVM; `auto` lets one config file serve KVM and non-KVM hosts.
    pub enum HypervisorKind {
        /// The built-in VMM where KVM is usable, QEMU otherwise.
        #[default]
        Auto => "auto",
        /// QEMU, for hosts or features the built-in VMM does not cover.
        Qemu => "qemu",
        /// The built-in KVM-only VMM, for fastest boot and smallest footprint.
        Builtin => "builtin",
    }
}

string_enum! {
    /// QEMU acceleration; `tcg` lets the runtime work (slowly) on hosts without KVM.
    pub enum Accel {
        /// KVM if `/dev/kvm` is usable, TCG otherwise.
        #[default]
        Auto => "auto",
        /// Hardware virtualization; fails rather than silently degrading.
        Kvm => "kvm",
        /// Software emulation, for nested or KVM-less hosts.
        Tcg => "tcg",
    }
}

string_enum! {
    /// virtiofsd's cache policy: trades guest-visible coherence for speed.
    pub enum VirtiofsCache {
        /// virtiofsd's own default balance.
        #[default]
        Auto => "auto",
        /// Fastest; only safe when nothing on the host changes the shared files.
        Always => "always",
        /// Fully coherent with host-side changes, slowest.
        None => "none",
    }
}

string_enum! {
    /// Verbosity of the runtime's own logs, so operators can debug without rebuilding.
    pub enum LogLevel {
        /// Only failures.
        Error => "error",
        /// Failures and suspicious conditions.
        Warn => "warn",
        /// Lifecycle events; the production default.
        #[default]
        Info => "info",
        /// Enough detail to follow a sandbox boot step by step.
        Debug => "debug",
        /// Everything, including per-request traffic.
        Trace => "trace",
    }
}

/// The whole runtime configuration; one value is built at startup and passed down, so
/// nothing else in Pangolin reads the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How the microVM is booted.
    pub hypervisor: HypervisorConfig,
    /// How the built-in VMM is confined.
    pub jail: JailConfig,
    /// How container filesystems are shared into the guest.
    pub virtiofs: VirtiofsConfig,
    /// How the host reaches the guest agent.
    pub vsock: VsockConfig,
    /// Host-side runtime behaviour.
    pub runtime: RuntimeConfig,
    /// VM templates: pods restored from a snapshot instead of booted.
    pub template: TemplateConfig,
    /// What the guest agent offers beyond running containers.
    pub agent: AgentConfig,
}

/// The guest agent's optional services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `pangolin console`: a shell in the pod's VM outside every container. Off by default:
    /// whoever can reach the state directory then gets root in every pod's guest.
    pub debug_console: bool,
    /// The static busybox the console runs (the guest has no shell of its own): copied into
    /// the pod's share at boot when the console is on. An absolute path.
    pub debug_console_shell: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            debug_console: false,
            debug_console_shell: PathBuf::from("/bin/busybox"),
        }
    }
}

/// Settings for booting the pod's microVM, grouped because every backend needs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// Lets operators force a backend when `auto` picks the wrong one.
    pub kind: HypervisorKind,
    /// The guest kernel is shipped separately from the runtime binary.
    pub kernel: PathBuf,
    /// The initramfs carries the guest agent, so it must match this runtime's version.
    pub initramfs: PathBuf,
    /// Escape hatch for guest debugging (e.g. `console=ttyS0`) without rebuilding.
    pub kernel_params: String,
    /// Pod CPU budget when the pod spec does not say otherwise.
    pub vcpus: u8,
    /// Pod memory budget (MiB) when the pod spec does not say otherwise.
    pub memory_mib: u32,
    /// Bounds how long a hung guest can block pod creation.
    pub boot_timeout_ms: u64,
    /// QEMU is installed in different places by different distributions.
    pub qemu_path: PathBuf,
    /// The built-in VMM is its own small binary, so a compromised VMM holds nothing of the shim's.
    pub vmm_path: PathBuf,
    /// Lets QEMU run without KVM (nested/CI hosts) at the cost of speed.
    pub accel: Accel,
    /// Per-thread seccomp filters in the built-in VMM; off only to debug a filter.
    pub seccomp: bool,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            kind: HypervisorKind::Auto,
            kernel: PathBuf::from("/usr/share/pangolin/vmlinux"),
            initramfs: PathBuf::from("/usr/share/pangolin/initramfs.cpio"),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 256,
            boot_timeout_ms: 20_000,
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            vmm_path: PathBuf::from("/usr/libexec/pangolin/pangolin-vmm"),
            accel: Accel::Auto,
            seccomp: true,
        }
    }
}

/// How the built-in VMM is confined: its own mount, IPC and UTS namespaces whose filesystem is
/// only its sandbox's socket directory, a non-root uid/gid, no capabilities, no_new_privs, and
/// every host resource opened by the host side and passed in. Only this file can change it
/// (no annotation or pod field can).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// The jail is the VMM's second wall after the microVM itself; off only for debugging.
    pub enabled: bool,
    /// A dedicated id no host account uses, so a compromised VMM owns nothing on the host.
    pub uid: u32,
    /// The jailed VMM's group, likewise dedicated.
    pub gid: u32,
    /// Bounds what a compromised VMM can hold open.
    pub max_open_files: u64,
    /// One uid/gid per VM instead of the shared `uid`/`gid`: jailed VMMs cannot even signal
    /// each other.
    pub per_vm_ids: bool,
    /// First id of the per-VM range.
    pub first_per_vm_id: u32,
    /// Ids in the per-VM range (most VMs at once).
    pub per_vm_id_count: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid: 20_050,
            gid: 20_050,
            max_open_files: 1024,
            per_vm_ids: false,
            first_per_vm_id: 200_000,
            per_vm_id_count: 65_536,
        }
    }
}

/// Settings for virtiofsd, which shares container rootfs and volumes with the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VirtiofsConfig {
    /// virtiofsd (the Rust one, 1.14: `--shared-dir`, `--sandbox`, `--seccomp`) is a separate
    /// program whose install path varies; a bare name is searched on `PATH`.
    pub virtiofsd_path: PathBuf,
    /// Lets operators choose coherence vs. speed per deployment.
    pub cache: VirtiofsCache,
}

impl Default for VirtiofsConfig {
    fn default() -> Self {
        Self {
            virtiofsd_path: PathBuf::from("virtiofsd"),
            cache: VirtiofsCache::Auto,
        }
    }
}

/// Settings for the vsock channel to the guest agent, the only host↔guest control path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VsockConfig {
    /// The vhost-user vsock device is an external program; a bare name is searched on `PATH`.
    pub vhost_device_vsock_path: PathBuf,
    /// The guest's vsock address; 0, 1, 2 and `u32::MAX` are reserved by the vsock spec.
    pub guest_cid: u32,
    /// Must match the port the guest agent listens on.
    pub agent_port: u32,
}

impl Default for VsockConfig {
    fn default() -> Self {
        Self {
            vhost_device_vsock_path: PathBuf::from("vhost-device-vsock"),
            guest_cid: 3,
            agent_port: 1024,
        }
    }
}

/// Host-side runtime settings that are not about the VM itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Lets operators raise verbosity without rebuilding.
    pub log_level: LogLevel,
    /// Per-sandbox sockets and pid files live here; absolute so the working directory of
    /// whoever starts the shim cannot change it.
    pub state_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            log_level: LogLevel::Info,
            state_dir: PathBuf::from("/run/pangolin"),
        }
    }
}

/// VM templates (built-in VMM only): one booted, snapshotted VM per size class, from which
/// pods are restored instead of booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateConfig {
    /// Start pods from templates where one fits; off, every pod boots its kernel.
    pub enabled: bool,
    /// Where templates are kept; empty means `<runtime.state_dir>/.templates` (a name no
    /// sandbox id can take: containerd's ids start with a letter or digit).
    pub dir: PathBuf,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: PathBuf::new(),
        }
    }
}

impl TemplateConfig {
    /// The template directory: `dir`, or `.templates` under `state_dir` when `dir` is empty.
    pub fn dir_under(&self, state_dir: &Path) -> PathBuf {
        if self.dir.as_os_str().is_empty() {
            state_dir.join(".templates")
        } else {
            self.dir.clone()
        }
    }
}

impl Config {
    /// The shipped, commented default file, so `pangolin config default` (or a packager) can
    /// write it out without keeping a second copy in sync.
    pub fn default_toml() -> &'static str {
        include_str!("../configuration.toml")
    }

    /// Parses and validates in one step, so no caller can forget to validate.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        // Parsing to a table first gives syntax errors their own, positioned message and lets
        // unknown keys be reported as such before any type errors.
        let table: toml::Table = s.parse().map_err(|e| ConfigError::syntax(s, &e))?;
        check_unknown_keys(&table)?;
        let config: Self = serde_path_to_error::deserialize(toml::Deserializer::new(s))
            .map_err(|e| ConfigError::from_path_error(s, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file; every error names the file so operators with
    /// several candidate files know which one is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml_str(&text).map_err(|error| ConfigError::InFile {
            path: path.to_path_buf(),
            error: Box::new(error),
        })
    }
}

/// Rejects keys the runtime does not know, because a typo that is silently ignored leaves the
/// operator believing a setting is in force when it is not.
///
/// The schema is the serialized default config, so it can never drift from the structs.
fn check_unknown_keys(table: &toml::Table) -> Result<(), ConfigError> {
    // Serializing the default cannot fail (only plain strings and integers); if it ever did,
    // `deny_unknown_fields` still rejects unknown keys, just with serde's wording.
    let Ok(schema) = toml::Table::try_from(Config::default()) else {
        return Ok(());
    };
    walk_unknown(table, &schema, "")
}

fn walk_unknown(
    table: &toml::Table,
    schema: &toml::Table,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match schema.get(name) {
            None => {
                let known: Vec<&str> = schema.keys().map(String::as_str).collect();
                return Err(ConfigError::Key {
                    key,
                    message: format!("unknown key, expected one of {}", known.join(", ")),
                });
            }
            Some(toml::Value::Table(sub_schema)) => {
                // A non-table here is a type error, reported by the typed pass with context.
                if let toml::Value::Table(sub) = value {
                    walk_unknown(sub, sub_schema, &key)?;
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn parse_err(s: &str) -> ConfigError {
        match Config::from_toml_str(s) {
            Ok(c) => panic!("expected an error for {s:?}, got {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn shipped_file_equals_defaults() -> TestResult {
        assert_eq!(
            Config::from_toml_str(Config::default_toml())?,
            Config::default()
        );
        Ok(())
    }

    #[test]
    fn shipped_file_lists_every_key() -> TestResult {
        // Every key must appear uncommented in the shipped file, so it documents them all.
        let shipped: toml::Table = Config::default_toml().parse()?;
        let schema = toml::Table::try_from(Config::default())?;
        assert_eq!(shipped, schema);
        Ok(())
    }

    #[test]
    fn empty_string_gives_defaults() -> TestResult {
        assert_eq!(Config::from_toml_str("")?, Config::default());
        Ok(())
    }

    #[test]
    fn missing_keys_take_defaults() -> TestResult {
        let c = Config::from_toml_str("[hypervisor]\nvcpus = 4\n[vsock]\n")?;
        assert_eq!(c.hypervisor.vcpus, 4);
        assert_eq!(c.hypervisor.memory_mib, 256);
        assert_eq!(c.vsock, VsockConfig::default());
        Ok(())
    }

    #[test]
    fn explicit_values_are_read() -> TestResult {
        let c = Config::from_toml_str(
            r#"
            [hypervisor]
            kind = "qemu"
            accel = "tcg"
            kernel_params = "console=ttyS0"
            [virtiofs]
            cache = "none"
            [vsock]
            vhost_device_vsock_path = "/opt/bin/vhost-device-vsock"
            guest_cid = 42
            [runtime]
            log_level = "trace"
            state_dir = "/var/run/p"
            "#,
        )?;
        assert_eq!(c.hypervisor.kind, HypervisorKind::Qemu);
        assert_eq!(c.hypervisor.accel, Accel::Tcg);
        assert_eq!(c.hypervisor.kernel_params, "console=ttyS0");
        assert_eq!(c.virtiofs.cache, VirtiofsCache::None);
        assert_eq!(c.vsock.guest_cid, 42);
        assert_eq!(c.runtime.log_level, LogLevel::Trace);
        assert_eq!(c.runtime.state_dir, PathBuf::from("/var/run/p"));
        Ok(())
    }

    #[test]
    fn unknown_key_in_section_is_named() {
        let e = parse_err("[hypervisor]\nvcpuz = 2\n");
        assert_eq!(e.key(), Some("hypervisor.vcpuz"));
        assert!(
            e.to_string().starts_with("hypervisor.vcpuz: unknown key"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_in_every_section_is_named() {
        for section in ["hypervisor", "virtiofs", "vsock", "runtime"] {
            let e = parse_err(&format!("[{section}]\nbogus = 1\n"));
            let want = format!("{section}.bogus: unknown key");
            assert!(e.to_string().starts_with(&want), "{e}");
        }
    }

    #[test]
    fn unknown_section_is_named() {
        let e = parse_err("[foo]\nx = 1\n");
        assert!(e.to_string().starts_with("foo: unknown key"), "{e}");
        let e = parse_err("top = 1\n");
        assert!(e.to_string().starts_with("top: unknown key"), "{e}");
    }

    #[test]
    fn unknown_nested_table_is_named() {
        let e = parse_err("[hypervisor.extra]\nx = 1\n");
        assert!(
            e.to_string().starts_with("hypervisor.extra: unknown key"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_keeps_serde_message() {
        let e = parse_err("[hypervisor]\nvcpus = \"two\"\n");
        let msg = e.to_string();
        assert_eq!(e.key(), Some("hypervisor.vcpus"));
        assert!(
            msg.starts_with("hypervisor.vcpus: invalid type: string"),
            "{msg}"
        );
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn integer_overflow_names_key() {
        let e = parse_err("[hypervisor]\nvcpus = 300\n");
        assert!(e.to_string().starts_with("hypervisor.vcpus: "), "{e}");
        let e = parse_err("[vsock]\nguest_cid = -1\n");
        assert!(e.to_string().starts_with("vsock.guest_cid: "), "{e}");
    }

    #[test]
    fn section_of_wrong_type_is_named() {
        let e = parse_err("hypervisor = 5\n");
        assert!(e.to_string().starts_with("hypervisor: invalid type"), "{e}");
    }

    #[test]
    fn bad_enum_value_lists_choices() {
        let e = parse_err("[hypervisor]\nkind = \"kvm\"\n");
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                r#"hypervisor.kind: unknown value "kvm", expected one of auto, qemu, builtin"#
            ),
            "{msg}"
        );
        let e = parse_err("[virtiofs]\ncache = \"never\"\n");
        assert!(
            e.to_string().starts_with("virtiofs.cache: unknown value"),
            "{e}"
        );
        let e = parse_err("[runtime]\nlog_level = \"INFO\"\n");
        assert!(
            e.to_string()
                .starts_with("runtime.log_level: unknown value"),
            "{e}"
        );
        let e = parse_err("[hypervisor]\naccel = 1\n");
        assert!(
            e.to_string().starts_with("hypervisor.accel: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse_err("[hypervisor]\nvcpus = = 2\n");
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("line 2, column"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn duplicate_key_is_a_syntax_error() {
        let e = parse_err("[vsock]\nagent_port = 1\nagent_port = 2\n");
        assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{e:?}");
    }

    #[test]
    fn validation_runs_on_parse() {
        let e = parse_err("[hypervisor]\nvcpus = 0\n");
        assert_eq!(e.to_string(), "hypervisor.vcpus: must be in 1..=16, got 0");
    }

    #[test]
    fn enums_round_trip_through_str() {
        for s in HypervisorKind::VALUES {
            assert_eq!(
                s.parse::<HypervisorKind>()
                    .map(|k| k.to_string())
                    .as_deref(),
                Ok(*s)
            );
        }
        for s in Accel::VALUES {
            assert_eq!(s.parse::<Accel>().map(|k| k.to_string()).as_deref(), Ok(*s));
        }
        for s in VirtiofsCache::VALUES {
            assert_eq!(
                s.parse::<VirtiofsCache>().map(|k| k.to_string()).as_deref(),
                Ok(*s)
            );
        }
        for s in LogLevel::VALUES {
            assert_eq!(
                s.parse::<LogLevel>().map(|k| k.to_string()).as_deref(),
                Ok(*s)
            );
        }
        let err = "QEMU"
            .parse::<HypervisorKind>()
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(r#"unknown value "QEMU", expected one of auto, qemu, builtin"#)
        );
        let err = "hvf".parse::<Accel>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(r#"unknown value "hvf", expected one of auto, kvm, tcg"#)
        );
    }

    #[test]
    fn serializes_back_to_equal_config() -> TestResult {
        let text = toml::to_string(&Config::default())?;
        assert_eq!(Config::from_toml_str(&text)?, Config::default());
        Ok(())
    }

    #[test]
    fn load_reads_file() -> TestResult {
        let dir = std::env::temp_dir().join(format!("pangolin-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let good = dir.join("good.toml");
        std::fs::write(&good, "[hypervisor]\nmemory_mib = 512\n")?;
        assert_eq!(Config::load(&good)?.hypervisor.memory_mib, 512);

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[hypervisor]\nmemory_mib = 1\n")?;
        let e = Config::load(&bad).err().ok_or("bad.toml loaded")?;
        assert_eq!(e.key(), Some("hypervisor.memory_mib"));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{}: hypervisor.memory_mib: ", bad.display())),
            "{msg}"
        );

        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn load_missing_file_names_path() {
        let path = Path::new("/nonexistent/pangolin/configuration.toml");
        let e = Config::load(path).err();
        assert!(matches!(e, Some(ConfigError::Read { .. })), "{e:?}");
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.starts_with("/nonexistent/pangolin/configuration.toml: cannot read"),
            "{msg}"
        );
    }
}
