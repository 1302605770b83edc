//! The appliance runtime: everything an appliance process does between a channel that
//! delivers FUSE frames and a backend that implements a file system.
//!
//! - [`filesystem`]: the [`Filesystem`] trait every backend implements, with the typed
//!   arguments and replies it deals in;
//! - [`session`]: INIT negotiation (protocol version, capability flags, limits);
//! - [`dispatch`]: one frame in, one reply out: decode, call the backend, encode;
//! - [`server`]: the worker threads, one per channel endpoint, and their counters;
//! - [`backing`]: FUSE passthrough backing ids held by open handles;
//! - [`fileio`]: positioned reads into reply buffers and complete writes, for backends;
//! - [`state`]: the versioned state a live restart hands to the successor;
//! - [`journal`]: the recovery journal, the record of every change since the last
//!   checkpoint, in memory the supervisor keeps; [`keeper`]: what else it keeps.
//!
//! The runtime never interprets file system semantics (that is the backend's job) and
//! never touches mounts, namespaces or the supervisor's state.

pub mod backing;
pub mod dir_hints;
pub mod dispatch;
pub mod fileio;
pub mod filesystem;
pub mod journal;
pub mod keeper;
pub mod server;
pub mod session;
pub mod spares;
pub mod state;

pub use backing::BackingFiles;
pub use filesystem::{
    Completed, Context, DirSink, Entry, Errno, Filesystem, InitRequest, Opened, Result, Xattr,
};
pub use keeper::Keeper;
pub use server::{Server, ServerStats};
pub use session::SessionConfig;
pub use spares::{MemfdSource, SpareBackings};
