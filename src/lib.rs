//! The `fincrypt` and `fincryptctl` programs: where the crates are wired together.

pub mod config;
pub mod secrets;
