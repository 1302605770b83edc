//! An appliance's state as an explicit, versioned format, for a live restart: what the
//! runtime itself holds (the negotiated session, the FUSE passthrough backing ids of
//! open handles) and the backend's own snapshot, which the backend encodes.
//!
//! The encoding is a magic, then postcard of an enum with one variant per version; a
//! reader accepts every version it knows and refuses anything else with an error that
//! says what it found. Descriptors (mem's memfds) travel beside the bytes, by number.
//! This module encodes and decodes; it never pauses workers or talks to anyone.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// First bytes of every encoded state.
const MAGIC: &[u8; 8] = b"FSVAST\x00\x01";

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "not an fsva appliance state ({0} bytes without the magic): refusing to restore from it"
    )]
    NotAState(usize),
    #[error("corrupt or truncated appliance state ({0}): refusing to restore from it")]
    Corrupt(String),
    #[error("the state refers to descriptor {index}, but only {count} came with it")]
    MissingDescriptor { index: u32, count: usize },
    #[error("the backend cannot restore from this state: {0}")]
    Backend(String),
    #[error("this backend cannot be checkpointed: {0}")]
    Unsupported(String),
}

/// A backend's snapshot: its own encoded bytes and the descriptors they refer to.
#[derive(Debug, Default)]
pub struct BackendState {
    pub bytes: Vec<u8>,
    pub fds: Vec<StateFd>,
}

/// A descriptor of a state: received (owned), or lent by a paused backend, which keeps
/// it open while the state is sent (no duplicate, so a file system with as many files
/// as the descriptor limit allows can still be checkpointed).
pub enum StateFd {
    Owned(OwnedFd),
    Lent(std::sync::Arc<dyn AsFd + Send + Sync>),
}

impl std::fmt::Debug for StateFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            StateFd::Owned(_) => "owned",
            StateFd::Lent(_) => "lent",
        };
        write!(f, "StateFd({kind} {:?})", self.as_fd())
    }
}

impl AsFd for StateFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            StateFd::Owned(fd) => fd.as_fd(),
            StateFd::Lent(f) => f.as_fd(),
        }
    }
}

impl StateFd {
    /// The descriptor itself, duplicating a lent one.
    pub fn into_owned(self) -> std::io::Result<OwnedFd> {
        match self {
            StateFd::Owned(fd) => Ok(fd),
            StateFd::Lent(f) => f.as_fd().try_clone_to_owned(),
        }
    }
}

/// The negotiated FUSE session (so the successor answers without a new INIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionV1 {
    pub minor: u32,
    pub flags: u64,
    pub max_write: u32,
}

/// One inode's FUSE passthrough registration and the handles holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingV1 {
    pub ino: u64,
    pub id: i32,
    pub handles: Vec<u64>,
}

/// Version 1 of the runtime's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateV1 {
    pub session: Option<SessionV1>,
    pub backing: Vec<BackingV1>,
    /// The backend's snapshot bytes (its descriptors travel beside the blob).
    pub backend: Vec<u8>,
}

/// Version 2: version 1 and the recovery journal's boundary. A checkpoint taken for
/// crash recovery holds every journal record up to `journal_boundary`; a successor
/// replays the records after it. A live restart's state has boundary 0 and no journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateV2 {
    pub session: Option<SessionV1>,
    pub backing: Vec<BackingV1>,
    pub backend: Vec<u8>,
    pub journal_boundary: u64,
}

/// Every version this runtime can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplianceState {
    V1(StateV1),
    V2(StateV2),
}

impl ApplianceState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(postcard::to_allocvec(self).expect("in-memory state always encodes"));
        out
    }

    /// The state in the newest version's terms.
    pub fn into_latest(self) -> StateV2 {
        match self {
            ApplianceState::V1(s) => StateV2 {
                session: s.session,
                backing: s.backing,
                backend: s.backend,
                journal_boundary: 0,
            },
            ApplianceState::V2(s) => s,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<ApplianceState, StateError> {
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(StateError::NotAState(bytes.len()))?;
        let (state, rest) = postcard::take_from_bytes::<ApplianceState>(body)
            .map_err(|e| StateError::Corrupt(e.to_string()))?;
        if !rest.is_empty() {
            return Err(StateError::Corrupt(format!(
                "{} bytes after the end of the state",
                rest.len()
            )));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ApplianceState {
        ApplianceState::V1(StateV1 {
            session: Some(SessionV1 {
                minor: 45,
                flags: 1 << 3,
                max_write: 1 << 20,
            }),
            backing: vec![BackingV1 {
                ino: 7,
                id: 3,
                handles: vec![11, 12],
            }],
            backend: vec![1, 2, 3, 4, 5],
        })
    }

    #[test]
    fn state_round_trips() {
        let s = sample();
        assert_eq!(ApplianceState::decode(&s.encode()), Ok(s));
    }

    #[test]
    fn corrupt_truncated_and_foreign_blobs_are_refused() {
        let good = sample().encode();
        assert!(matches!(
            ApplianceState::decode(b"hello"),
            Err(StateError::NotAState(5))
        ));
        for cut in [MAGIC.len(), MAGIC.len() + 1, good.len() - 1] {
            assert!(
                matches!(
                    ApplianceState::decode(&good[..cut]),
                    Err(StateError::Corrupt(_))
                ),
                "cut at {cut}"
            );
        }
        let mut unknown_version = good.clone();
        unknown_version[MAGIC.len()] = 9;
        // Version 1 states (from an older fsva) still read, as version 2 without a journal.
        let latest = sample().into_latest();
        assert_eq!(latest.journal_boundary, 0);
        let v2 = ApplianceState::V2(latest.clone());
        assert_eq!(ApplianceState::decode(&v2.encode()), Ok(v2));
        assert!(matches!(
            ApplianceState::decode(&unknown_version),
            Err(StateError::Corrupt(_))
        ));
        let mut trailing = good;
        trailing.push(0);
        assert!(matches!(
            ApplianceState::decode(&trailing),
            Err(StateError::Corrupt(_))
        ));
    }
}
