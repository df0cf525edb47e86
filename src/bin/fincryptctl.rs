//! `fincryptctl`: talk to a running Fincrypt daemon.

use clap::Parser;

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
