//! Pangolin's runtime configuration: one TOML file, parsed and validated up front so that a
//! bad setting fails at startup with the offending key named, not deep inside a pod boot.
#![deny(missing_docs)]

mod config;
mod error;
mod validate;

pub use config::{
    Accel, Config, HypervisorConfig, HypervisorKind, LogLevel, RuntimeConfig, TemplateConfig,
    VirtiofsCache, VirtiofsConfig, VsockConfig, DEFAULT_CONFIG_PATH,
};
pub use error::{ConfigError, ParseEnumError};
