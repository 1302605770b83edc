//! The migration protocol: what a supervisor and a host daemon (`fsva host`) say over
//! TCP when a mount's appliance moves to that daemon's host.
//!
//! A migration uses two connections from the supervisor to the daemon. Each begins with
//! a mutual challenge-response over a shared key ([`handshake_client`] and
//! [`handshake_server`]): fixed-size frames, checked before a single message is
//! decoded, so a peer without the key gets no further than a refusal. After it, each
//! side speaks [`ToHost`] and [`FromHost`] messages as [`FramedLink`] frames of at most
//! [`MAX_HOST_FRAME`] bytes:
//! - the control connection starts with [`ToHost::Prepare`] and stays open as long as
//!   the remote appliance serves (state transfer, go-ahead, counters); the daemon stops
//!   the appliance when it closes;
//! - the data connection starts with [`ToHost::Attach`]; after the daemon's
//!   [`FromHost::Attached`] it carries nothing but FUSE frames (the `stream` channel),
//!   read and written by the remote appliance itself.
//!
//! The key authenticates the start of a connection; the traffic after it is neither
//! encrypted nor authenticated (these hosts share a private network; run it through a
//! tunnel elsewhere). This module encodes, authenticates and moves; it never acts on a
//! message.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use crate::messages::{ApplianceStats, StartConfig};
use crate::FramedLink;

/// Version of this protocol; both sides must speak the same.
pub const HOST_PROTOCOL: u32 = 1;
/// Largest message on a migration's connections (a batch of file contents or journal
/// records; the FUSE frames of the data connection are bounded by the relay instead).
pub const MAX_HOST_FRAME: usize = 8 << 20;
/// Most content bytes a supervisor puts into one [`ToHost::Files`] message.
pub const FILES_BATCH: usize = 1 << 20;
/// Shortest key accepted.
pub const MIN_KEY: usize = 16;
/// Longest key file read.
const MAX_KEY: u64 = 4096;

const SERVER_HELLO: &[u8; 8] = b"FSVAHOST";
const CLIENT_HELLO: &[u8; 8] = b"FSVAMIGR";
const NONCE: usize = 32;
const MAC: usize = 32;

/// The daemon's verdict on a client's handshake.
const VERDICT_OK: u8 = 0;
const VERDICT_WRONG_KEY: u8 = 1;
const VERDICT_VERSION: u8 = 2;

/// Why a migration connection could not be set up.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("the key is {0} bytes long; use at least {MIN_KEY} random bytes (e.g. `head -c 32 /dev/urandom | base64 > KEY`)")]
    ShortKey(usize),
    #[error("the host daemon refused the key: give both sides the same --key-file")]
    WrongKey,
    #[error("the peer speaks migration protocol v{theirs}, this fsva v{HOST_PROTOCOL}: run the same fsva version on both hosts")]
    Version { theirs: u32 },
    #[error("the peer is not an fsva host daemon or supervisor ({0})")]
    NotFsva(String),
    #[error("the host daemon did not prove that it holds the key: it is not the daemon you meant, or its --key-file differs")]
    Unproven,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> HostError {
    move |source| HostError::Io { what, source }
}

/// A shared secret both sides read from a file (`--key-file`).
#[derive(Clone)]
pub struct HostKey(Vec<u8>);

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({} bytes)", self.0.len())
    }
}

impl HostKey {
    /// Reads a key file: a regular file that only its owner may read or write, whose
    /// contents (without trailing white space) are the key.
    pub fn read(path: &Path) -> Result<HostKey, HostError> {
        use std::os::unix::fs::MetadataExt;
        let bad = |reason: String| HostError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "others may read or write it (mode {:o}): `chmod 600` it",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > MAX_KEY {
            return Err(bad(format!("longer than {MAX_KEY} bytes: not a key file")));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        HostKey::from_bytes(bytes)
    }

    /// A key from its bytes (trailing white space dropped).
    pub fn from_bytes(mut bytes: Vec<u8>) -> Result<HostKey, HostError> {
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        if bytes.len() < MIN_KEY {
            return Err(HostError::ShortKey(bytes.len()));
        }
        Ok(HostKey(bytes))
    }

    /// The key's bytes (to hand to the supervisor that uses it).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(first);
        m.update(second);
        m
    }
}

fn nonce() -> Result<[u8; NONCE], HostError> {
    let mut n = [0u8; NONCE];
    let mut got = 0;
    while got < NONCE {
        got += rustix::rand::getrandom(&mut n[got..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| io("drawing a nonce")(e.into()))?;
    }
    Ok(n)
}

/// The supervisor's side of the handshake: proves it holds `key` and checks that the
/// daemon does too.
pub fn handshake_client(stream: &mut (impl Read + Write), key: &HostKey) -> Result<(), HostError> {
    let mut hello = [0u8; 8 + 4 + NONCE];
    read_exact(stream, &mut hello, "reading the host daemon's greeting")?;
    if &hello[..8] != SERVER_HELLO {
        return Err(HostError::NotFsva("no fsva host greeting".into()));
    }
    let theirs = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
    if theirs != HOST_PROTOCOL {
        return Err(HostError::Version { theirs });
    }
    let server_nonce = &hello[12..];
    let client_nonce = nonce()?;
    let proof = key
        .mac(b"fsva client", server_nonce, &client_nonce)
        .finalize()
        .into_bytes();
    let mut out = Vec::with_capacity(8 + 4 + NONCE + MAC);
    out.extend_from_slice(CLIENT_HELLO);
    out.extend_from_slice(&HOST_PROTOCOL.to_le_bytes());
    out.extend_from_slice(&client_nonce);
    out.extend_from_slice(&proof);
    stream
        .write_all(&out)
        .map_err(io("sending the handshake"))?;
    let mut verdict = [0u8; 1];
    read_exact(stream, &mut verdict, "reading the host daemon's verdict")?;
    match verdict[0] {
        VERDICT_OK => {}
        VERDICT_WRONG_KEY => return Err(HostError::WrongKey),
        VERDICT_VERSION => return Err(HostError::Version { theirs }),
        other => return Err(HostError::NotFsva(format!("verdict {other}"))),
    }
    let mut theirs_proof = [0u8; MAC];
    read_exact(stream, &mut theirs_proof, "reading the host daemon's proof")?;
    key.mac(b"fsva server", &client_nonce, server_nonce)
        .verify_slice(&theirs_proof)
        .map_err(|_| HostError::Unproven)
}

/// The daemon's side of the handshake: checks that the client holds `key` (a client
/// that does not is told so and gets nothing else) and proves that it does too.
pub fn handshake_server(stream: &mut (impl Read + Write), key: &HostKey) -> Result<(), HostError> {
    let server_nonce = nonce()?;
    let mut hello = Vec::with_capacity(8 + 4 + NONCE);
    hello.extend_from_slice(SERVER_HELLO);
    hello.extend_from_slice(&HOST_PROTOCOL.to_le_bytes());
    hello.extend_from_slice(&server_nonce);
    stream
        .write_all(&hello)
        .map_err(io("sending the greeting"))?;
    let mut answer = [0u8; 8 + 4 + NONCE + MAC];
    read_exact(stream, &mut answer, "reading the client's handshake")?;
    if &answer[..8] != CLIENT_HELLO {
        return Err(HostError::NotFsva("no fsva migration handshake".into()));
    }
    let theirs = u32::from_le_bytes(answer[8..12].try_into().expect("4 bytes"));
    if theirs != HOST_PROTOCOL {
        let _ = stream.write_all(&[VERDICT_VERSION]);
        return Err(HostError::Version { theirs });
    }
    let client_nonce = &answer[12..12 + NONCE];
    if key
        .mac(b"fsva client", &server_nonce, client_nonce)
        .verify_slice(&answer[12 + NONCE..])
        .is_err()
    {
        let _ = stream.write_all(&[VERDICT_WRONG_KEY]);
        return Err(HostError::WrongKey);
    }
    let proof = key
        .mac(b"fsva server", client_nonce, &server_nonce)
        .finalize()
        .into_bytes();
    let mut out = vec![VERDICT_OK];
    out.extend_from_slice(&proof);
    stream.write_all(&out).map_err(io("sending the verdict"))
}

fn read_exact(stream: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), HostError> {
    stream.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HostError::NotFsva(format!("the connection ended while {what}"))
        } else {
            HostError::Io { what, source: e }
        }
    })
}

/// A migration connection after its handshake: frames of up to [`MAX_HOST_FRAME`].
pub fn framed(stream: std::net::TcpStream) -> std::io::Result<FramedLink> {
    FramedLink::with_max_frame(stream, MAX_HOST_FRAME)
}

/// Sets what every migration connection needs: no Nagle delay (a FUSE request is one
/// small write), and keep-alives with a user timeout, so that a host that vanished
/// without closing the connection is noticed within seconds, not hours.
pub fn tune(stream: &std::net::TcpStream) -> std::io::Result<()> {
    use rustix::net::sockopt;
    use std::time::Duration;
    stream.set_nodelay(true)?;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, Duration::from_secs(5))?;
    sockopt::set_tcp_keepintvl(stream, Duration::from_secs(1))?;
    sockopt::set_tcp_keepcnt(stream, 5)?;
    sockopt::set_tcp_user_timeout(stream, 15_000)?;
    Ok(())
}

/// What kind of state a migration moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateKind {
    /// `mem`: a checkpoint, the contents of its memfds and the journal records after
    /// the checkpoint; the remote appliance keeps a recovery journal, its host daemon
    /// being its keeper.
    Mem,
    /// `passthrough` over storage both hosts see: the node and handle tables without
    /// descriptors (found again by path).
    Passthrough,
}

/// Part of one memfd's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    /// The memfd's id (as mem's state names it).
    pub id: u64,
    /// `Some(size)`: this part begins the file: a new memfd of `size` bytes (zeroes
    /// where no part writes), replacing any earlier one of this id.
    pub start: Option<u64>,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// One recovery journal record (the payload with its tag byte).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Supervisor → host daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHost {
    /// First message of a control connection: set up an appliance for `config` that
    /// waits for a state of `kind`. Answered `Prepared`, then (once the data
    /// connection is attached and the appliance waits) `Waiting`.
    Prepare {
        config: StartConfig,
        kind: StateKind,
        /// The mount point on the supervisor's host (for the daemon's log).
        mountpoint: PathBuf,
    },
    /// First message of a data connection: it is the FUSE stream of `session`.
    Attach { session: u64 },
    /// Part of the encoded appliance state (the checkpoint).
    State {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The state is complete; it covers the journal up to `boundary`. A later state
    /// replaces it.
    StateEnd { boundary: u64 },
    /// File contents (mem).
    Files { parts: Vec<FilePart> },
    /// Journal records after the state's boundary, in order (mem, after the source
    /// stopped, before `Stopped`).
    Records { records: Vec<JournalRecord> },
    /// The source appliance has stopped and every file that changed since its
    /// contents were sent was named (`Round`). `kept`: every memfd id its file system
    /// holds now; `all_changed`: every file changed (records were lost before they
    /// were read). Answered `Need` with the ids whose contents must come (again).
    Stopped { kept: Vec<u64>, all_changed: bool },
    /// Records read from the source's journal (not kept here, not replayed) that name
    /// files changed since their contents were sent; `kept` is every memfd id its file
    /// system holds. Answered `Need` with those and the ones never sent.
    Round {
        records: Vec<JournalRecord>,
        kept: Vec<u64>,
    },
    /// Everything came: rebuild the state in the appliance; answered `Ready`.
    Build,
    /// The mount's requests come to this appliance now: serve. Answered `Resumed`.
    Resume,
    /// Answered `Stats`.
    Stats,
    /// Answered `Synced` once everything sent before is applied (the pre-copy's files
    /// are written before the source stops, not during its downtime).
    Sync,
}

/// Host daemon → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromHost {
    Prepared {
        session: u64,
    },
    Attached,
    /// The appliance (`pid` on host `host`) is set up and waits for the state.
    Waiting {
        pid: u32,
        host: String,
    },
    Need {
        ids: Vec<u64>,
    },
    Ready {
        pid: u32,
    },
    Resumed,
    Stats(ApplianceStats),
    /// Everything sent before `Sync` is applied; `files` memfds are held.
    Synced {
        files: u64,
    },
    /// Refused or failed; says what and what to do.
    Failed {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn key(s: &str) -> HostKey {
        HostKey::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    fn run(
        client_key: HostKey,
        server_key: HostKey,
    ) -> (Result<(), HostError>, Result<(), HostError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || handshake_server(&mut b, &server_key));
        let client = handshake_client(&mut a, &client_key);
        drop(a);
        (client, server.join().unwrap())
    }

    #[test]
    fn the_same_key_passes_both_ways() {
        let (c, s) = run(key("0123456789abcdef-one"), key("0123456789abcdef-one\n"));
        assert!(c.is_ok(), "{c:?}");
        assert!(s.is_ok(), "{s:?}");
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (c, s) = run(key("0123456789abcdef-one"), key("0123456789abcdef-two"));
        assert!(matches!(c, Err(HostError::WrongKey)), "{c:?}");
        assert!(matches!(s, Err(HostError::WrongKey)), "{s:?}");
    }

    #[test]
    fn short_keys_loose_files_and_strangers_are_refused() {
        assert!(matches!(
            HostKey::from_bytes(b"short\n".to_vec()),
            Err(HostError::ShortKey(5))
        ));
        let dir = std::env::temp_dir().join(format!("fsva-key-test-{}", std::process::id()));
        std::fs::write(&dir, "0123456789abcdef0123").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loose = HostKey::read(&dir);
        assert!(
            matches!(&loose, Err(HostError::KeyFile { reason, .. }) if reason.contains("chmod 600")),
            "{loose:?}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            HostKey::read(&dir).unwrap().bytes(),
            b"0123456789abcdef0123"
        );
        std::fs::remove_file(&dir).unwrap();

        // Something that is not a daemon: refused before anything is decoded.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n.................")
            .unwrap();
        let r = handshake_client(&mut a, &key("0123456789abcdef-one"));
        assert!(matches!(r, Err(HostError::NotFsva(_))), "{r:?}");
    }

    #[test]
    fn bulk_messages_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = FramedLink::with_max_frame(a, MAX_HOST_FRAME).unwrap();
        let b = FramedLink::with_max_frame(b, MAX_HOST_FRAME).unwrap();
        let parts = vec![FilePart {
            id: 7,
            start: Some(3 << 20),
            offset: 1 << 20,
            bytes: vec![0xa5; FILES_BATCH],
        }];
        let sender = std::thread::spawn(move || {
            a.send(&ToHost::Files {
                parts: parts.clone(),
            })
            .unwrap();
            parts
        });
        let got = b.recv::<ToHost>().unwrap();
        let sent = sender.join().unwrap();
        assert!(matches!(got, ToHost::Files { parts } if parts == sent));
    }
}
