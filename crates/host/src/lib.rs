//! The host daemon (`fsva host --listen ADDR:PORT --key-file KEY`): the receiving end
//! of a migration. It runs on the host a mount's appliance moves to; the mount itself
//! and its supervisor stay on the applications' host.
//!
//! It listens on TCP. Every connection must pass the shared-key handshake of
//! [`fsva_control::host`] before a single message is read; then it is either a
//! migration's control connection (`Prepare`, served by [`session`]) or its data
//! connection (`Attach`), which is handed to the appliance of that session as its
//! `stream` channel: the appliance reads the mount's FUSE requests from it and writes
//! its replies to it, with no hop through this daemon.
//!
//! For each migration it starts a sandboxed appliance (`fsva __appliance`, as a
//! supervisor does), rebuilds the state the supervisor sends into it, and relays the
//! supervisor's go-ahead and counters requests. It is the appliance's keeper: a mem
//! appliance keeps its recovery journal with it, as with a supervisor (what an
//! appliance that dies here would need; recovering it here is not built yet). It stops
//! the appliance when the control connection ends, and ends the control connection
//! when the appliance exits, so the supervisor learns of either at once.
//!
//! It never touches a FUSE mount, never trusts the supervisor beyond its key (every
//! configuration is checked: sandboxed appliances only, passthrough only under the
//! directories given with `--export`), and never serves anything itself.

pub mod session;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use fsva_control::host::{self, FromHost, HostKey, ToHost};
use thiserror::Error;

/// How long a connection may take to prove the key and say what it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon could not run.
#[derive(Debug, Error)]
pub enum HostDaemonError {
    #[error("cannot listen on {addr}: {source} (give a free HOST:PORT this host has, e.g. 0.0.0.0:7420)")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("--export {path}: {reason}")]
    Export { path: PathBuf, reason: String },
}

/// What `fsva host` was asked for.
#[derive(Debug)]
pub struct HostConfig {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    pub key: HostKey,
    /// The fsva executable to run appliances with.
    pub exe: PathBuf,
    /// Directories a migrating passthrough appliance may serve (and everything below).
    pub exports: Vec<PathBuf>,
}

/// What every connection's thread shares.
pub(crate) struct Shared {
    pub key: HostKey,
    pub exe: PathBuf,
    pub exports: Vec<PathBuf>,
    /// Control connections waiting for their data connection, by session.
    pub waiting: Mutex<std::collections::HashMap<u64, mpsc::Sender<TcpStream>>>,
    /// This host's name, for the supervisor's status.
    pub hostname: String,
}

/// Listens and serves migrations until killed.
pub fn run(config: HostConfig) -> Result<(), HostDaemonError> {
    let exports = config
        .exports
        .iter()
        .map(|p| {
            let c = p.canonicalize().map_err(|e| HostDaemonError::Export {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            if !c.is_dir() {
                return Err(HostDaemonError::Export {
                    path: p.clone(),
                    reason: "not a directory".into(),
                });
            }
            Ok(c)
        })
        .collect::<Result<Vec<_>, _>>()?;
    raise_open_file_limit();
    let listener = TcpListener::bind(&config.listen).map_err(|source| HostDaemonError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let shared = Arc::new(Shared {
        key: config.key,
        exe: config.exe,
        exports,
        waiting: Mutex::default(),
        hostname,
    });
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(config.listen),
        exports = ?shared.exports,
        "fsva host daemon ready for migrations"
    );
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("fsva-host-conn".into())
            .spawn(move || connection(stream, &shared));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread for a connection");
        }
    }
    Ok(())
}

/// One connection: the handshake, then what it is.
fn connection(mut stream: TcpStream, shared: &Arc<Shared>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let setup = host::tune(&stream).and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)));
    if let Err(e) = setup {
        tracing::warn!(peer, error = %e, "setting up a connection failed");
        return;
    }
    match host::handshake_server(&mut stream, &shared.key) {
        Ok(()) => {}
        Err(fsva_control::host::HostError::WrongKey) => {
            tracing::warn!(
                peer,
                "refused a connection that did not prove the key (another --key-file?)"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(peer, error = %e, "refused a connection");
            return;
        }
    }
    let link = match stream
        .set_read_timeout(None)
        .and_then(|()| stream.try_clone())
        .and_then(host::framed)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(peer, error = %e, "setting up a connection failed");
            return;
        }
    };
    match link.recv_within::<ToHost>(HELLO_TIMEOUT) {
        Ok(ToHost::Prepare {
            config,
            kind,
            mountpoint,
        }) => {
            tracing::info!(peer, mountpoint = %mountpoint.display(), ?kind, backend = %config.backend, "migration begins");
            session::run(session::Start {
                shared: shared.clone(),
                link,
                control: stream,
                config,
                kind,
                peer,
            });
        }
        Ok(ToHost::Attach { session }) => {
            let waiting = shared
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session);
            match waiting {
                Some(tx) => {
                    if link.send(&FromHost::Attached).is_ok() {
                        // The link's reader holds nothing beyond the message it read.
                        drop(link);
                        let _ = tx.send(stream);
                    }
                }
                None => {
                    let _ = link.send(&FromHost::Failed {
                        message: "no migration waits for this data connection".into(),
                    });
                }
            }
        }
        Ok(other) => {
            let _ = link.send(&FromHost::Failed {
                message: format!("a connection must begin with Prepare or Attach, not {other:?}"),
            });
        }
        Err(e) => tracing::warn!(peer, error = %e, "a connection said nothing usable"),
    }
}

/// A daemon keeps every memfd of the mem appliances it runs (and they hold as many):
/// raise the descriptor limit as a supervisor does; appliances inherit it.
fn raise_open_file_limit() {
    fsva_supervisor::supervisor::raise_open_file_limit();
    let now = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(0);
    tracing::info!(
        open_files = now,
        "descriptor limit (a mem appliance received here holds one per file)"
    );
}
