//! The `fincrypt` and `fincryptctl` programs: where the crates are wired together.

pub mod config;
pub mod control;
pub mod daemon;
pub mod secrets;
