//! `fincryptctl`: ask a running Fincrypt daemon for its status, a sync or a snapshot.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fincrypt::config::HomeArg;
use fincrypt::control::{self, Request};

#[derive(Parser)]
#[command(
    name = "fincryptctl",
    version,
    about = "Control a running Fincrypt daemon"
)]
struct Cli {
    #[command(flatten)]
    home: HomeArg,
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
    Sync {
        /// Then also wait until every own block has as many confirmed holders
        /// on peers as its redundancy asks; exit 2 with the count if not by the timeout.
        #[arg(long)]
        replicated: bool,
        /// Seconds to wait for replication.
        #[arg(
            long,
            default_value_t = 300,
            value_name = "SECONDS",
            requires = "replicated"
        )]
        timeout: u64,
    },
    /// Copies on peers of a directory or file inside the mount (the xattr
    /// user.fincrypt.redundancy, inherited by everything below unless overridden).
    Redundancy {
        #[command(subcommand)]
        command: RedundancyCommand,
    },
    /// Who holds what, as the owner's manifest under the newest root says
    /// (that root is not in it yet: its holders go into the next one).
    Manifest {
        /// Print every entry as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// List or take snapshots.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Subcommand)]
enum RedundancyCommand {
    /// Ask for N copies of everything under PATH.
    Set {
        path: PathBuf,
        #[arg(value_parser = clap::value_parser!(u8).range(1..))]
        n: u8,
    },
    /// Show PATH's effective redundancy and where it comes from.
    Get { path: PathBuf },
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
        Ok(code) => code,
        Err(e) => {
            eprintln!("fincryptctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const REDUNDANCY_XATTR: &str = "user.fincrypt.redundancy";

fn get_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    let mut buf = vec![0u8; 64];
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        bail!("reading {name} of {}: {e}", path.display());
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        bail!(
            "setting {name} on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The mount point and default redundancy of the running daemon, and `path` made absolute inside it.
fn inside_mount(data: &Path, path: &Path) -> Result<(PathBuf, u8, PathBuf)> {
    let v = control::call(data, &Request::Status, None)?;
    let mnt = PathBuf::from(v["mountpoint"].as_str().unwrap_or_default());
    let default = v["default_redundancy"].as_u64().unwrap_or(2) as u8;
    let abs = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    if !abs.starts_with(&mnt) {
        bail!(
            "{} is not inside the mount at {}",
            path.display(),
            mnt.display()
        );
    }
    Ok((mnt, default, abs))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let home = cli.home.resolve()?;
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
        Command::Sync {
            replicated,
            timeout,
        } => {
            let v = control::call(data, &Request::Sync, None)?;
            println!(
                "synced; root committed at {}",
                v["time"].as_str().unwrap_or("?")
            );
            if replicated {
                let v = control::call(
                    data,
                    &Request::Replicate {
                        timeout_secs: timeout,
                    },
                    Some(Duration::from_secs(timeout + 120)),
                )?;
                let under = v["under_replicated"].as_u64().unwrap_or(u64::MAX);
                if under > 0 {
                    eprintln!(
                        "fincryptctl: {under} own blocks still have fewer holders than asked after {timeout} s ({})",
                        v["replication_note"].as_str().unwrap_or("")
                    );
                    return Ok(ExitCode::from(2));
                }
                println!(
                    "replicated: {} blocks, {} copies on peers",
                    v["replicated_blocks"], v["placed_copies"]
                );
                if let Some(levels) = v["blocks_by_redundancy"].as_object() {
                    for (n, count) in levels {
                        println!("  {count} blocks at redundancy {n}");
                    }
                }
            }
        }
        Command::Redundancy {
            command: RedundancyCommand::Set { path, n },
        } => {
            inside_mount(data, &path)?;
            set_xattr(&path, REDUNDANCY_XATTR, n.to_string().as_bytes())?;
        }
        Command::Redundancy {
            command: RedundancyCommand::Get { path },
        } => {
            let (mnt, default, abs) = inside_mount(data, &path)?;
            let mut found = None;
            for dir in abs.ancestors() {
                if let Some(v) = get_xattr(dir, REDUNDANCY_XATTR)? {
                    let n: u8 = String::from_utf8_lossy(&v)
                        .trim()
                        .parse()
                        .with_context(|| format!("{REDUNDANCY_XATTR} of {}", dir.display()))?;
                    found = Some((n, dir.to_path_buf()));
                    break;
                }
                if dir == mnt {
                    break;
                }
            }
            match found {
                Some((n, dir)) if dir == abs => println!("{n} (set here)"),
                Some((n, dir)) => println!("{n} (inherited from {})", dir.display()),
                None => println!("{default} (the default)"),
            }
        }
        Command::Manifest { json } => {
            let v = control::call(data, &Request::Manifest, None)?;
            if json {
                println!("{v}");
            } else {
                print_manifest(&v);
            }
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
    Ok(ExitCode::SUCCESS)
}

/// A person's summary of `Request::Manifest`'s answer: counts per holder.
fn print_manifest(v: &serde_json::Value) {
    let root = v["root"].as_str().unwrap_or("?");
    let time = v["time"].as_str().unwrap_or("?");
    println!("root {root} ({time})");
    let m = &v["manifest"];
    if m.is_null() {
        println!("  names no manifest (a mount without peers, or an older root)");
        return;
    }
    let list = |key: &str| m[key].as_array().cloned().unwrap_or_default();
    let (entries, blocks) = (list("entries"), list("blocks"));
    println!(
        "  manifest version {}: {} own blocks, {} bytes in {} blocks of its own",
        m["version"],
        entries.len(),
        m["bytes"],
        blocks.len()
    );
    let mut per_peer: std::collections::BTreeMap<String, u64> = Default::default();
    for e in &entries {
        for h in e["holders"].as_array().into_iter().flatten() {
            *per_peer
                .entry(h.as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
    }
    for (peer, n) in per_peer {
        println!("  {peer} holds {n}");
    }
}
