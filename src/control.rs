//! The control socket between `fincryptctl` and a running daemon.
//!
//! One JSON request per connection, one JSON reply, each a single line
//! (docs/FORMATS.md, "Control socket"). The socket lives in the data
//! directory and is private to the user who mounted.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Version of the control protocol.
pub const CONTROL_VERSION: u32 = 1;

/// What `fincryptctl` asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Health and usage figures.
    Status,
    /// Return once everything written so far is durable and a new root is committed.
    Sync,
    /// Retained snapshots.
    SnapshotsList,
    /// Take a snapshot now.
    SnapshotsCreate,
    /// Run replication passes until no own block is short of copies, or
    /// `timeout_secs` pass; answers `{"under_replicated": N, ...}`.
    Replicate { timeout_secs: u64 },
    /// The owner's manifest the newest root names: who holds each own block.
    Manifest,
}

/// The daemon's answer: a JSON object, or an error message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The socket path of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fincrypt.sock")
}

/// Serves requests on `path` with `handle` until the process ends; one thread per connection.
pub fn serve<F>(path: &Path, handle: F) -> Result<()>
where
    F: Fn(Request) -> Result<serde_json::Value> + Send + Sync + 'static,
{
    if path.exists() {
        // Left by a daemon that died: nobody answers on it.
        if UnixStream::connect(path).is_ok() {
            bail!("another daemon already serves {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let handle = std::sync::Arc::new(handle);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &*handle) {
                            tracing::debug!(error = %e, "control connection ended badly");
                        }
                    });
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, handle: &dyn Fn(Request) -> Result<serde_json::Value>) -> Result<()> {
    let mut line = String::new();
    std::io::Read::take(BufReader::new(conn.try_clone()?), 64 * 1024).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match handle(req) {
            Ok(v) => Reply {
                version: CONTROL_VERSION,
                ok: Some(v),
                error: None,
            },
            Err(e) => Reply {
                version: CONTROL_VERSION,
                ok: None,
                error: Some(format!("{e:#}")),
            },
        },
        Err(e) => Reply {
            version: CONTROL_VERSION,
            ok: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut conn = conn;
    serde_json::to_writer(&mut conn, &reply)?;
    conn.write_all(b"\n")?;
    Ok(())
}

/// Sends one request to the daemon of `data_dir` and returns its answer.
pub fn call(
    data_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<serde_json::Value> {
    let path = socket_path(data_dir);
    let mut conn = UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "no Fincrypt daemon is running for {} ({}: {e}); start one with `fincrypt mount`",
            data_dir.display(),
            path.display()
        )
    })?;
    conn.set_read_timeout(timeout)?;
    serde_json::to_writer(&mut conn, req)?;
    conn.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .context("reading the daemon's reply")?;
    let reply: Reply = serde_json::from_str(&line).context("the daemon's reply is not valid")?;
    match (reply.ok, reply.error) {
        (Some(v), _) => Ok(v),
        (None, Some(e)) => bail!("{e}"),
        (None, None) => bail!("the daemon sent an empty reply"),
    }
}
