//! The control messages. Every message travels inside an [`Envelope`] whose variant is
//! the protocol version, so a peer from another fsva version is recognised and refused
//! with a clear error instead of being misread. Adding a field means adding a version.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Current control protocol version.
pub const CONTROL_VERSION: u32 = 1;

/// Versioned wrapper of every control message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Envelope<T> {
    V1(T),
}

/// Which file system an appliance serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendSpec {
    /// In memory; `capacity` bytes at most.
    Mem { capacity: u64 },
    /// A directory of the appliance's OS, served through system calls. `exclusive`:
    /// nothing else changes it, so the kernel may cache entries and attributes long.
    Passthrough { path: PathBuf, exclusive: bool },
    /// A disk image mounted by a VM appliance's kernel and served by `passthrough`
    /// over that mount; `fstype` `None` lets the appliance detect it.
    Image {
        path: PathBuf,
        fstype: Option<String>,
        read_only: bool,
    },
}

impl BackendSpec {
    /// Whether the appliance is the only writer of what it serves: a VM's image, `mem`,
    /// an `--exclusive` export. Not a shared export, which can change beside the mount.
    pub fn is_only_writer(&self) -> bool {
        !matches!(
            self,
            BackendSpec::Passthrough {
                exclusive: false,
                ..
            }
        )
    }
}

impl std::fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendSpec::Mem { .. } => write!(f, "mem"),
            BackendSpec::Passthrough { path, .. } => write!(f, "passthrough:{}", path.display()),
            BackendSpec::Image { path, fstype, .. } => {
                write!(
                    f,
                    "image:{}:{}",
                    fstype.as_deref().unwrap_or("auto"),
                    path.display()
                )
            }
        }
    }
}

/// How FUSE frames reach the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelKind {
    /// Cloned `/dev/fuse` descriptors, one per worker (attached to `Start`).
    Fusedev,
    /// One stream socket (attached to `Start`) relayed by the supervisor.
    Stream,
    /// A listening vhost-user socket (attached to `Start`): the appliance is the
    /// vhost-user-fs device itself and answers a VM guest's virtqueues in its queue
    /// workers, with `request_queues` request queues.
    Vhost { request_queues: u16 },
}

impl std::fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelKind::Fusedev => "fusedev",
            ChannelKind::Stream => "stream",
            ChannelKind::Vhost { .. } => "vhost-user",
        })
    }
}

/// The isolation an appliance runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxKind {
    /// Namespaces, pivot_root, dropped capabilities, seccomp, rlimits.
    Namespaces,
    /// A plain child process (debugging only).
    None,
    /// A QEMU virtual machine with its own kernel.
    Vm,
}

impl std::fmt::Display for SandboxKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxKind::Namespaces => "namespaces",
            SandboxKind::None => "none",
            SandboxKind::Vm => "vm",
        })
    }
}

/// Everything an appliance needs to start serving.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartConfig {
    pub backend: BackendSpec,
    pub channel: ChannelKind,
    /// Worker threads per channel endpoint.
    pub workers_per_channel: u32,
    pub sandbox: SandboxKind,
    /// `tracing` filter for the appliance's log.
    pub log_filter: String,
    /// The supervisor does privileged work for this appliance: the last descriptor of
    /// `Start` is then a link for [`BrokerRequest`]s.
    pub broker_link: bool,
    /// The broker registers FUSE passthrough backing files (needs `broker_link`).
    pub backing_files: bool,
    /// The broker creates device nodes in the export (needs `broker_link`).
    pub device_nodes: bool,
    /// Most bytes of file data the appliance may keep in memory (`--cache-budget`).
    pub cache_budget: Option<u64>,
    /// The virtio-fs tag a `Vhost` channel offers in its configuration space.
    pub vhost_tag: Option<String>,
    /// A live restart: a `Restore` with the predecessor's state follows `Start`.
    pub restore: bool,
    /// The supervisor watches a shared passthrough export for changes made beside the
    /// mount and has them invalidated ([`ToAppliance::HostChanged`]), so the kernel may
    /// trust entries and attributes longer than an unwatched export allows.
    pub host_watched: bool,
    /// The relay at the other end of a `Stream` channel (a host mount's, or a vhost
    /// device's link) answers from directory-attribute hints (`fsva_protocol::hint`):
    /// for a backend nothing else writes.
    pub dir_hints: bool,
}

/// Appliance → supervisor, on the broker link: the few operations that need a
/// capability in the initial user namespace, which the appliance must not hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BrokerRequest {
    /// Register the file attached to this message as a FUSE passthrough backing file
    /// (`FUSE_DEV_IOC_BACKING_OPEN` needs CAP_SYS_ADMIN).
    OpenBacking,
    /// Drop a backing-file registration. Never answered: the appliance does not wait
    /// for it (a release's round trip would hold a worker), and the link's order keeps
    /// it before any later request.
    CloseBacking { id: i32 },
    /// Create a character or block device node `name` in the directory attached to
    /// this message (`mknod` of a device needs CAP_MKNOD), for a caller with group
    /// `gid` and `umask` (applied by the kernel, which knows about default ACLs).
    MakeDevice {
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u64,
        gid: u32,
    },
    /// Register the attached memfds (none is fine) as spare backing files, for new
    /// files' first opens (answered `SparesOpened`); `claimed` are earlier spares that
    /// now back files. Spares are not open files: they count as open only once claimed
    /// (so `fsva status` may show a file created in the last second as not open yet).
    OpenSpares { claimed: Vec<i32> },
}

/// Appliance → supervisor, on the keeper link: what a successor needs if this
/// appliance dies. One way, never answered: a message the appliance has sent is kept
/// even if it dies the next moment (the supervisor reads everything queued on the link
/// before it starts a successor), and the appliance never waits on the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum KeeperMessage {
    /// Keep the attached descriptor (a memfd holding file contents) under `id`.
    Keep { id: u64 },
    /// The descriptor kept under `id` is no longer needed.
    Release { id: u64 },
    /// The attached sealed memfd is the checkpoint a successor starts from; it holds
    /// every journal record up to `boundary`.
    Checkpoint { boundary: u64 },
    /// Written by the supervisor itself, on the appliance's end of the link once the
    /// appliance is dead: everything before it is everything the appliance sent.
    Barrier { nonce: u64 },
}

/// Supervisor → appliance, on the broker link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BrokerReply {
    BackingOpened {
        id: i32,
    },
    /// Not sent any more (`CloseBacking` is one way); kept so the variants after it
    /// keep their numbers.
    BackingClosed,
    DeviceMade,
    /// Not done: the request failed a check or the kernel refused.
    Refused {
        errno: i32,
        reason: String,
    },
    /// For each memfd attached to `OpenSpares`, in order: its backing id, or the
    /// negated errno the check or the kernel refused it with.
    SparesOpened {
        ids: Vec<i32>,
    },
}

/// Supervisor → appliance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToAppliance {
    /// First message; carries the channel descriptors.
    Start(StartConfig),
    /// Ask for counters.
    Stats,
    /// The cache budget changed (`fsva cache`).
    SetCacheBudget { bytes: u64 },
    /// A VM appliance sets its clock to the host's (its RTC has whole seconds only), so
    /// that file times written in the guest agree with the host's.
    SetClock { secs: i64, nanos: u32 },
    /// Live restart: pause, and answer `Checkpointed` with the state.
    Checkpoint,
    /// To a successor started with `restore`, after `Start`: the predecessor's state, a
    /// sealed memfd attached, followed by `StateFds` until `fds` descriptors came.
    Restore { fds: u32 },
    /// A batch of the state's descriptors (a message carries at most [`FDS_PER_MESSAGE`]).
    StateFds,
    /// After a checkpoint whose successor did not start: serve on.
    Resume,
    /// First message of an appliance that keeps a recovery journal: as `Start`, with
    /// two more descriptors attached last (after the broker link): its end of the
    /// keeper link, then the journal memfd.
    StartJournaled(StartConfig),
    /// To a successor started with `StartJournaled` and `restore`: rebuild the state a
    /// dead (or stopped) predecessor left. The checkpoint's sealed memfd is attached if
    /// `checkpoint` (after a `Preload`: only if newer than that one); `KeptFds`
    /// batches follow until `fds` descriptors came (after a `Preload`: those kept
    /// since). `fresh`: that state is lost; start empty, answering ESTALE for every
    /// old node.
    Recover {
        checkpoint: bool,
        fds: u32,
        fresh: bool,
    },
    /// A batch of kept descriptors, in the order of `ids`.
    KeptFds { ids: Vec<u64> },
    /// Take a checkpoint for crash recovery now (before a planned replacement, so the
    /// successor has little journal to replay). Answered `CheckpointTaken`.
    CheckpointNow,
    /// To a spare successor (started with `StartJournaled` and `restore`), ahead of
    /// need: rebuild from this checkpoint (attached if `checkpoint`; otherwise keep the
    /// one preloaded before) with these kept descriptors (`KeptFds` batches follow
    /// until `fds` came), then wait. A later `Preload` or `Recover` brings only what
    /// is new. Answered `Preloaded`.
    Preload { checkpoint: bool, fds: u32 },
    /// Pause, and answer `Checkpointed` with a state fit for a transfer that carries
    /// bytes only (a vhost-user device's state, for a guest's migration): its
    /// descriptors are only files whose contents travel by value (mem's memfds); a
    /// passthrough state names none (its nodes are found again by path). `Resume`
    /// ends the pause.
    CheckpointForTransfer,
    /// Objects of the export changed by someone other than the appliance (seen by the
    /// supervisor's watch): answered [`ToSupervisor::Invalidations`] with the nodes the
    /// kernel knows them by.
    HostChanged(HostChanges),
    /// Write everything the appliance's file system holds back to its storage
    /// (`syncfs`), because the host's sync(2) never reaches a FUSE server. Answered
    /// [`ToSupervisor::Synced`].
    Sync,
}

/// Most descriptors one message carries.
pub const FDS_PER_MESSAGE: usize = crate::link::MAX_FDS;

/// Appliance → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToSupervisor {
    /// Serving; `pid` as seen from the host.
    Ready {
        pid: u32,
    },
    /// A VM appliance's kernel mounted the image and serves it.
    VmReady {
        /// `uname -r` of the appliance's kernel.
        kernel: String,
        /// The file system type the kernel mounted the image with.
        fstype: String,
        read_only: bool,
        /// It mapped the shared-memory region and sends large frames through it.
        shared_memory: bool,
    },
    Stats(ApplianceStats),
    CacheBudgetSet,
    ClockSet,
    /// Paused; the state is the attached sealed memfd, and `fds` descriptors follow in
    /// `StateFds` messages.
    Checkpointed {
        fds: u32,
    },
    /// A batch of the state's descriptors.
    StateFds,
    Resumed,
    /// A successor is set up and waits for its predecessor's state.
    AwaitingState,
    /// Start-up failed; the message says what and what to do.
    Failed {
        message: String,
    },
    /// A checkpoint for crash recovery is stored; the journal is replayed from `boundary`.
    CheckpointTaken {
        boundary: u64,
    },
    /// A spare successor rebuilt the state it was given and waits.
    Preloaded,
    /// A successor refused the predecessor's state (it does not hold together): the
    /// message says why. Unlike `Failed`, another successor would refuse it too.
    StateRefused {
        message: String,
    },
    /// What the kernel must forget after [`ToAppliance::HostChanged`].
    Invalidations(Invalidations),
    /// [`ToAppliance::Sync`] is done: everything written before it is on storage.
    Synced,
}

/// Changes made to a shared export beside the mount, by host identity (device and
/// inode number as `stat` gives them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostChanges {
    /// A name in a directory appeared, went or was renamed: `(dev, ino, name)` of the
    /// directory.
    pub entries: Vec<(u64, u64, Vec<u8>)>,
    /// An object's attributes or contents changed (the directories of `entries` too).
    pub objects: Vec<(u64, u64)>,
}

/// Node ids the kernel must drop what it cached for (FUSE_NOTIFY_INVAL_*).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidations {
    /// `(parent node, name)`: the name's entry.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// Nodes whose attributes and cached contents are stale.
    pub nodes: Vec<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceStats {
    pub requests: u64,
    pub errors: u64,
    /// Inodes open through FUSE passthrough, as the appliance knows them (the broker
    /// learns of a new mem file's spare backing file only within a second).
    pub passthrough_files: u64,
}

/// CLI → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    Status,
    /// Flush, stop the appliance and unmount; `lazy` detaches even when busy.
    Unmount {
        lazy: bool,
    },
    /// Change the appliance's cache budget.
    SetCacheBudget {
        bytes: u64,
    },
    /// Replace the appliance by a new process with the same state, live.
    Restart,
    /// `Status` with the recovery counters (answered `StatusFull`).
    StatusFull,
    /// Move the appliance to the host daemon at `to` (`HOST:PORT`), authenticating with
    /// `key` (read by the CLI from its `--key-file`). Answered `Migrated`.
    Migrate {
        to: String,
        key: Vec<u8>,
    },
    /// `StatusFull` with the migration counters (answered `StatusMigration`).
    StatusMigration,
    /// Have the appliance write its file system back to storage (`fsva sync`; the CLI
    /// has the kernel write back the mount's dirty pages first). Answered `Synced`.
    Sync,
}

/// Supervisor → CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminReply {
    Status(Box<MountStatus>),
    Unmounted,
    CacheBudgetSet,
    /// The new appliance serves; `downtime_us` is how long requests waited.
    Restarted {
        downtime_us: u64,
        pid: u32,
    },
    Error {
        message: String,
    },
    StatusFull(Box<MountStatus>, RecoveryStatus),
    /// The appliance on `host` (pid `pid` there) serves the mount; requests waited
    /// `downtime_us` at most.
    Migrated {
        downtime_us: u64,
        host: String,
        pid: u32,
    },
    StatusMigration(Box<MountStatus>, RecoveryStatus, MigrationStatus),
    /// The appliance's file system is on storage; it took `micros`.
    Synced {
        micros: u64,
    },
}

/// One mount as `fsva status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStatus {
    pub mountpoint: PathBuf,
    pub backend: String,
    pub channel: String,
    pub sandbox: String,
    pub supervisor_pid: u32,
    pub appliance_pid: Option<u32>,
    /// Seconds since the Unix epoch when the mount went live.
    pub started: u64,
    pub requests: u64,
    pub errors: u64,
    /// "serving", or why not ("appliance died: ...").
    pub state: String,
    /// How file data moves: "passthrough" (the kernel uses the backend's files
    /// directly), or "via appliance" with the reason.
    pub data_path: String,
    /// Backing files registered right now.
    pub backing_files: u64,
    /// The appliance's cache budget, if one is set.
    pub cache_budget: Option<u64>,
    /// Memory the appliance's cgroup uses now (file data it caches included).
    pub memory_used: Option<u64>,
    /// Live restarts so far, and how long requests waited during the last one.
    pub restarts: u32,
    pub last_downtime_us: Option<u64>,
}

/// What `fsva status` shows beyond [`MountStatus`] (a separate message, so that the
/// status of older supervisors still decodes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// Appliances that died and were replaced with their state.
    pub recoveries: u32,
    /// Times the state could not be rebuilt and a fresh appliance took over.
    pub fresh_starts: u32,
    /// What the last recovery or restart cost requests, and when it happened (seconds
    /// since the Unix epoch).
    pub last_downtime_us: Option<u64>,
    pub last_event: Option<u64>,
    /// Whether the mount keeps a recovery journal (crash recovery is possible).
    pub journaled: bool,
}

/// What `fsva status` shows about migrations (a separate message, so that the status
/// of older supervisors still decodes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Migrations to another host so far.
    pub migrations: u32,
    /// Where the appliance serving the mount runs: `None` on this host, else the
    /// daemon's address, with the appliance's pid there.
    pub host: Option<String>,
    pub remote_pid: Option<u32>,
    /// How long requests waited during the last migration, and when it ended (seconds
    /// since the Unix epoch).
    pub last_downtime_us: Option<u64>,
    pub last_event: Option<u64>,
}
