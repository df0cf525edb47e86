//! `fincryptctl`: talk to a running Fincrypt daemon.

use clap::Parser;

// Large block buffers are allocated and freed all the time; mimalloc reuses
// them where the system allocator maps and faults in fresh pages each time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fincryptctl",
    version,
    about = "Control a running Fincrypt daemon"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
