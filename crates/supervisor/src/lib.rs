//! The supervisor: fsva's user-side proxy in user space, one per mount.
//!
//! It owns everything the user's side must keep whatever the appliance does: the mount
//! ([`mount`]), the `/dev/fuse` session and every clone of it, the appliance process
//! ([`appliance`]), the privileged operations it does on the appliance's behalf
//! ([`broker`]: FUSE passthrough registrations checked by [`backing`], device nodes), the
//! relay for stream channels ([`bridge`], which answers the kernel's capability checks
//! and directory GETATTRs it already knows the answer to, with [`fsva_relay`]), the
//! appliance's memory cgroup that enforces
//! its cache budget ([`cgroup`]), what it keeps so that a successor can take over after
//! an appliance dies ([`keeper`]), replacing an appliance by a successor ([`takeover`]),
//! moving it to another host's daemon ([`migrate`]), watching a shared export for
//! changes made beside the mount so the kernel forgets them ([`host_watch`]),
//! the fallback that answers
//! requests with errors once an appliance is gone ([`fallback`]), the per-mount runtime
//! files ([`registry`]) and the loop that ties them together ([`supervisor`]).
//!
//! It never interprets file system semantics beyond FUSE framing: it reads headers to
//! route and validate frames, and answers with errors when no appliance can. The
//! exceptions hold only where the appliance is the only writer, and are about what
//! passed through the relay, not about any file system: a node keeps having no
//! `security.capability` until a SETXATTR passes, and a directory keeps the attributes
//! the appliance reported after changing it until a request that may change it passes
//! ([`fsva_relay`]).

pub mod appliance;
pub mod backing;
pub mod bridge;
pub mod broker;
pub mod cgroup;
pub mod fallback;
pub mod host_watch;
pub mod keeper;
pub mod launch;
pub mod migrate;
pub mod mount;
pub mod registry;
pub mod supervisor;
pub mod takeover;
pub mod vhost;

pub use supervisor::{run, MountRequest, SupervisorError, VmPlan};
