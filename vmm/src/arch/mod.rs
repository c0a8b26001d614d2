//! x86_64 machine setup: memory layout, boot protocol, CPU state.

pub mod layout;
