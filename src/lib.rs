//! The `fincrypt` and `fincryptctl` programs: where the crates are wired together.

pub mod config;
pub mod control;
pub mod daemon;
pub mod mediator;
pub mod recover;
pub mod secrets;
pub mod serve;
pub mod wants;
pub mod watch;

// Large block buffers are allocated and freed all the time; mimalloc reuses
// them where the system allocator maps and faults in fresh pages each time.
// Declared once here, it serves both programs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
