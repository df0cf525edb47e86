//! `fincryptctl`: ask a running Fincrypt daemon for its status, a sync or a snapshot.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fincrypt::config::Home;
use fincrypt::control::{self, Request};

#[derive(Parser)]
#[command(
    name = "fincryptctl",
    version,
    about = "Control a running Fincrypt daemon"
)]
struct Cli {
    /// The daemon's home, as given to `fincrypt --home`.
    #[arg(long, global = true, env = "FINCRYPT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show health and usage: blocks and bytes stored, snapshots, peers.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Return once everything written so far is durable and a new root is committed.
    Sync,
    /// List or take snapshots.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// List retained snapshots, oldest first.
    List,
    /// Take a snapshot now.
    Create,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fincryptctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let home = Home::resolve(cli.home.as_deref())?;
    let data = &home.data_dir;
    match cli.command {
        Command::Status { json } => {
            let v = control::call(data, &Request::Status, None)?;
            if json {
                println!("{v}");
            } else if let Some(map) = v.as_object() {
                for (k, v) in map {
                    println!("{:<16} {}", k.replace('_', " "), v);
                }
            }
        }
        Command::Sync => {
            let v = control::call(data, &Request::Sync, None)?;
            println!(
                "synced; root committed at {}",
                v["time"].as_str().unwrap_or("?")
            );
        }
        Command::Snapshots {
            command: SnapshotCommand::List,
        } => {
            let v = control::call(data, &Request::SnapshotsList, None)?;
            for s in v.as_array().into_iter().flatten() {
                println!("{}", s["name"].as_str().unwrap_or("?"));
            }
        }
        Command::Snapshots {
            command: SnapshotCommand::Create,
        } => {
            let v = control::call(data, &Request::SnapshotsCreate, None)?;
            println!("{}", v["time"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}
