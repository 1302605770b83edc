//! The virtio-fs device: virtqueues in, appliance requests out, replies back into the
//! guest's chains.
//!
//! Queue 0 is the high-priority queue (FORGETs), queues 1..=N the request queues; each
//! queue has its own worker thread (vhost-user-backend's epoll loop), so a guest that
//! spreads requests over several queues (Linux does since 6.12) is served in parallel.
//! A worker pops the chains the guest made available, gathers each request
//! ([`crate::chain`]) and hands it to the [`Relay`]; the relay's reply thread writes
//! each reply into its chain and returns the chain to the guest.
//!
//! This module owns the device's view of guest memory and its vrings. It must never
//! hold a vring's lock while it sends to the appliance (the reply thread needs the lock
//! to complete requests) and never answer a chain twice.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fsva_protocol::reply::ReplyBuf;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::{self, ReplySpace};
use crate::config::DeviceConfig;
use crate::migration::{DeviceState, Direction, Transfers};
use crate::relay::{Forwarded, OnFailure, Relay};

/// How long stopping a queue waits for its requests at the appliance.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest queue the guest may set up (as virtiofsd; the guest's virtiofs sizes its
/// largest request by the queue).
const MAX_QUEUE_SIZE: usize = 1024;

/// Guest memory, with the dirty-page log the VMM reads during a live migration: every
/// write of ours into guest memory (replies, used rings) marks its pages once the VMM
/// has set a log (`VHOST_USER_SET_LOG_BASE`), so pages we change after they were
/// copied are copied again.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
/// A vring over that memory.
pub type VringRwLock = vhost_user_backend::VringRwLock<Memory>;

/// `VHOST_F_LOG_ALL`: the device logs its writes to guest memory (required by the VMM
/// for live migration).
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Where a request's reply goes.
#[derive(Debug)]
pub struct Token {
    queue: usize,
    head: u16,
    space: ReplySpace,
}

/// The device's queues and memory, shared by the workers and the reply thread.
struct Queues {
    memory: Mutex<Memory>,
    /// Filled in by each queue's worker on its first event.
    vrings: Mutex<Vec<Option<VringRwLock>>>,
    event_idx: AtomicBool,
    /// Chains refused as malformed (the first is logged as a warning).
    refused: AtomicU64,
    /// Per queue, the chains taken from it: shows whether a guest spreads its requests.
    taken: Vec<AtomicU64>,
    /// Per queue, the heads handed out and not yet returned: a head the guest posts
    /// again while it is in flight is ignored (answering it would answer twice), and
    /// `stop_vring` waits for the set to empty.
    in_flight: Vec<Mutex<HashSet<u16>>>,
}

impl Queues {
    fn new(config: &DeviceConfig, memory: Memory) -> Arc<Queues> {
        Arc::new(Queues {
            memory: Mutex::new(memory),
            vrings: Mutex::new(vec![None; config.num_queues()]),
            event_idx: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            taken: (0..config.num_queues())
                .map(|_| AtomicU64::new(0))
                .collect(),
            in_flight: (0..config.num_queues())
                .map(|_| Mutex::new(HashSet::new()))
                .collect(),
        })
    }

    fn in_flight(&self, queue: usize) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.in_flight[queue]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `reply` into the chain (or an EIO reply if it does not fit) and hands the
    /// chain back to the guest.
    fn complete(&self, token: Token, reply: &[u8]) {
        let memory = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .memory();
        let used = match chain::write_reply(&*memory, &token.space, reply) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reply does not fit its chain; answering EIO");
                let unique = guest_unique(reply);
                let mut eio = ReplyBuf::default();
                chain::write_reply(&*memory, &token.space, eio.error(unique, libc::EIO))
                    .unwrap_or(0)
            }
        };
        let vring = self
            .vrings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token.queue)
            .cloned()
            .flatten();
        let Some(vring) = vring else { return };
        self.in_flight(token.queue).remove(&token.head);
        if let Err(e) = vring.add_used(token.head, used) {
            tracing::warn!(queue = token.queue, error = ?e, "could not return a chain to the guest");
            return;
        }
        let notify =
            !self.event_idx.load(Ordering::Relaxed) || vring.needs_notification().unwrap_or(true);
        if notify {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(queue = token.queue, error = %e, "could not notify the guest");
            }
        }
    }
}

/// Answers requests in the queue worker's own thread: the appliance's dispatcher, when
/// the device runs inside the appliance process.
pub trait Inline: Send + Sync {
    /// The reply to `frame`, written into `reply`; `None` if the request has none.
    fn answer<'r>(&self, frame: &[u8], reply: &'r mut ReplyBuf) -> Option<&'r [u8]>;
}

/// Where requests go.
enum Route {
    /// Over a stream to an appliance in another process (or VM), which never sees
    /// guest memory.
    Relay(Arc<Relay<Token>>),
    /// Answered here, in the queue worker (one process hop less, as virtiofsd).
    Inline(Arc<dyn Inline>),
}

thread_local! {
    /// Each queue worker's request and reply buffers, reused across requests.
    static BUFFERS: std::cell::RefCell<(Vec<u8>, ReplyBuf)> =
        std::cell::RefCell::new((Vec::with_capacity(64 << 10), ReplyBuf::default()));
}

/// The guest's id of a request (0 if the frame is too short to hold one).
fn guest_unique(frame: &[u8]) -> u64 {
    frame
        .get(8..16)
        .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0)
}

/// The vhost-user-fs back end.
pub struct FsDevice {
    config: DeviceConfig,
    queues: Arc<Queues>,
    route: Route,
    /// The appliance's side of migration; unset, the device offers no device state
    /// (and no dirty log), so the VMM refuses to migrate the guest.
    state: std::sync::OnceLock<Arc<dyn DeviceState>>,
    transfers: Arc<Transfers>,
}

impl FsDevice {
    /// A device whose requests go to the appliance at the other end of `stream`.
    /// Starts the thread that delivers the appliance's replies.
    pub fn relayed(
        config: DeviceConfig,
        memory: Memory,
        stream: std::os::unix::net::UnixStream,
        shm: Option<Arc<fsva_channel::shm::ShmRegion>>,
        answers: Option<fsva_relay::Answers>,
        on_failure: OnFailure,
    ) -> std::io::Result<Arc<FsDevice>> {
        let queues = Queues::new(&config, memory);
        let q = queues.clone();
        let (relay, reader) = Relay::new(
            stream,
            shm,
            answers,
            Box::new(move |token, reply: &[u8]| q.complete(token, reply)),
            on_failure,
        )?;
        let r = relay.clone();
        std::thread::Builder::new()
            .name("fsva-vhost-reply".into())
            .spawn(move || r.run_replies(reader))?;
        Ok(Arc::new(FsDevice {
            config,
            queues,
            route: Route::Relay(relay),
            state: Default::default(),
            transfers: Default::default(),
        }))
    }

    /// A device that answers every request in its queue worker, through `inline`.
    pub fn inline(config: DeviceConfig, memory: Memory, inline: Arc<dyn Inline>) -> Arc<FsDevice> {
        Arc::new(FsDevice {
            queues: Queues::new(&config, memory),
            config,
            route: Route::Inline(inline),
            state: Default::default(),
            transfers: Default::default(),
        })
    }

    /// Makes the device migratable: `state` saves and loads the appliance's state.
    /// Must be set before a VMM connects (the features it offers depend on it); a
    /// second call is ignored.
    pub fn set_device_state(&self, state: Arc<dyn DeviceState>) {
        let _ = self.state.set(state);
    }

    fn migratable(&self) -> bool {
        self.state.get().is_some()
    }

    /// Waits (at most [`STOP_DRAIN`]) until no request is in flight on any queue.
    fn quiesced(queues: &Queues) -> bool {
        let deadline = std::time::Instant::now() + STOP_DRAIN;
        loop {
            if (0..queues.in_flight.len()).all(|q| queues.in_flight(q).is_empty()) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The chains taken from each queue so far (index 0: the high-priority queue).
    pub fn requests_per_queue(&self) -> Vec<u64> {
        self.queues
            .taken
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// The link to the appliance, for a relayed device (to fail it when the appliance
    /// exits).
    pub fn relay(&self) -> Option<Arc<Relay<Token>>> {
        match &self.route {
            Route::Relay(r) => Some(r.clone()),
            Route::Inline(_) => None,
        }
    }

    /// Serves every chain the guest has made available on `vring`.
    fn drain(&self, vring: &VringRwLock, queue: usize) {
        let memory = self
            .queues
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .memory();
        // Popped under the vring's lock, served without it; at most a queue's worth per
        // pass, so a guest that keeps posting cannot hold the lock (the event loop calls
        // again while notifications show more).
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            let most = usize::from(q.size());
            std::iter::from_fn(|| q.pop_descriptor_chain(memory.clone()))
                .take(most)
                .collect()
        };
        self.queues.taken[queue].fetch_add(chains.len() as u64, Ordering::Relaxed);
        if !chains.is_empty() {
            self.transfers
                .served
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        BUFFERS.with_borrow_mut(|(frame, reply)| {
            for c in chains {
                let head = c.head_index();
                if !self.queues.in_flight(queue).insert(head) {
                    self.refused(queue, &chain::ChainError::HeadInFlight(head));
                    continue;
                }
                let token = |space| Token { queue, head, space };
                let space = match chain::read_request(&*memory, c, frame) {
                    Ok(space) => space,
                    Err(e) => {
                        self.refused(queue, &e);
                        let unique = guest_unique(frame);
                        self.queues.complete(
                            token(ReplySpace::default()),
                            reply.error(unique, libc::EINVAL),
                        );
                        continue;
                    }
                };
                match &self.route {
                    Route::Inline(inline) => {
                        let answer = inline.answer(frame, reply).unwrap_or(&[]);
                        self.queues.complete(token(space), answer);
                    }
                    Route::Relay(relay) => match relay.forward(frame, token(space)) {
                        Forwarded::Sent => {}
                        Forwarded::NoReply(token) => self.queues.complete(token, &[]),
                        Forwarded::Answered(token, reply) => self.queues.complete(token, &reply),
                        Forwarded::Refused(token, errno) => {
                            let unique = guest_unique(frame);
                            self.queues.complete(token, reply.error(unique, errno));
                        }
                    },
                }
            }
        });
    }

    fn refused(&self, queue: usize, e: &chain::ChainError) {
        if self.queues.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(queue, error = %e, "refusing a malformed descriptor chain (further ones logged at debug)");
        } else {
            tracing::debug!(queue, error = %e, "refusing a malformed descriptor chain");
        }
    }
}

impl VhostUserBackend for FsDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.config.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | if self.migratable() {
                VHOST_F_LOG_ALL
            } else {
                0
            }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut f = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if self.config.tag().is_some() {
            // The VMM may take the tag from us (a generic vhost-user device does).
            f |= VhostUserProtocolFeatures::CONFIG;
        }
        if self.migratable() {
            // The dirty log in a shared memfd, and the state through a pipe.
            f |= VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::DEVICE_STATE;
        }
        f
    }

    fn set_event_idx(&self, enabled: bool) {
        self.queues.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.space(offset, size)
    }

    fn update_memory(&self, memory: Memory) -> std::io::Result<()> {
        *self.queues.memory.lock().unwrap_or_else(|p| p.into_inner()) = memory;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per queue: worker i serves queue i.
        (0..self.config.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // Requests still at the appliance must be answered before the VMM takes the
        // ring back (a late reply would land in a ring it re-initialised).
        let queue = queue_index as usize;
        if queue >= self.queues.in_flight.len() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + STOP_DRAIN;
        while !self.queues.in_flight(queue).is_empty() {
            if std::time::Instant::now() >= deadline {
                if let Route::Relay(relay) = &self.route {
                    // Answers everything waiting with EIO, now, before we return.
                    relay.fail("requests still unanswered when the VMM stopped a queue");
                }
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: std::fs::File,
    ) -> std::io::Result<Option<std::fs::File>> {
        let Some(state) = self.state.get() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this device cannot be migrated (a VM appliance's state cannot be moved yet)",
            ));
        };
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(std::io::Error::other(format!(
                "device state transfer in phase {phase:?}: only a stopped device's state is transferred"
            )));
        }
        let direction = match direction {
            VhostTransferStateDirection::SAVE => Direction::Save,
            VhostTransferStateDirection::LOAD => Direction::Load,
        };
        let queues = self.queues.clone();
        self.transfers
            .start(state.clone(), direction, file, move || {
                FsDevice::quiesced(&queues)
            })?;
        // The pipe the VMM gave is the one we use.
        Ok(None)
    }

    fn check_device_state(&self) -> std::io::Result<()> {
        self.transfers.check()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // The daemon signals it when it is dropped, so the workers end with the service.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::warn!(error = %e, "no exit event for a queue worker; it ends with the process");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event {evset:?} on queue {thread_id}"
            )));
        }
        let vring = vrings.get(device_event as usize).ok_or_else(|| {
            std::io::Error::other(format!("event for unknown queue {device_event}"))
        })?;
        let queue = thread_id;
        {
            let mut known = self.queues.vrings.lock().unwrap_or_else(|p| p.into_inner());
            match known.get_mut(queue) {
                Some(slot) if slot.is_none() => *slot = Some(vring.clone()),
                Some(_) => {}
                None => return Err(std::io::Error::other(format!("no queue {queue}"))),
            }
        }
        if self.queues.event_idx.load(Ordering::Relaxed) {
            // Serve until the guest adds nothing between our last pop and re-enabling
            // notifications.
            loop {
                vring
                    .disable_notification()
                    .map_err(std::io::Error::other)?;
                self.drain(vring, queue);
                if !vring.enable_notification().map_err(std::io::Error::other)? {
                    break;
                }
            }
        } else {
            self.drain(vring, queue);
        }
        Ok(())
    }
}
