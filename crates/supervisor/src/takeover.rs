//! Replacing a mount's appliance by a successor on the same `/dev/fuse` clones: after
//! it died (crash recovery), on request (`fsva restart`), or with an empty file system
//! when its state cannot be rebuilt.
//!
//! For an appliance that keeps a recovery journal every replacement is the same: the
//! predecessor is gone (dead, or killed here after a fresh checkpoint), everything it
//! sent its keeper link has been read ([`crate::keeper`]), and the successor rebuilds
//! the state from the last checkpoint and the journal. Only then is the kernel asked
//! to resend what the predecessor held (`FUSE_NOTIFY_RESEND`), and only after that
//! does the successor serve: a resend while it already served would hand it requests
//! it is executing, twice. A request that had taken effect is answered from the
//! journal, so nothing runs twice. A successor is set up ahead of need (a spare), so
//! that a crash costs the handover only.
//!
//! An appliance without a journal can only be replaced live: it is paused, its state
//! (with descriptors) is handed over, then it is stopped.
//!
//! This module starts and hands over; it never reads the state it passes on and never
//! decides whether a mount recovers (the supervisor's event loop does).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::process::Child;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fsva_channel::fusedev::FuseDev;
use fsva_control::{BackendSpec, ChannelKind, StartConfig};

use crate::appliance::{Appliance, ApplianceError, Starting};
use crate::keeper::{Kept, LinkEnd};
use crate::supervisor::{Event, MountRequest};
use crate::{launch, mount};

/// The appliance serving a mount now, with what tells when its keeper link ended.
pub(crate) struct Current {
    pub appliance: Appliance,
    pub keeper: Option<LinkEnd>,
}

/// A successor set up ahead of need, waiting for its predecessor's state.
pub(crate) struct Spare {
    starting: Starting,
    keeper: Option<LinkEnd>,
    /// The budget it was started with (a later `fsva cache` is applied on takeover).
    cache_budget: Option<u64>,
    /// What it has preloaded of the keeping.
    preloaded: Option<crate::keeper::Mark>,
}

impl Spare {
    /// Stops it (the mount goes away, or it is not wanted).
    pub fn discard(self) {
        self.starting.abandon();
    }

    /// Brings it up to date with the keeping (the last checkpoint and the memfds kept
    /// since its last preload), so that a takeover has little left to do. A spare that
    /// fails at it is discarded.
    pub fn preload(mut self, kept: &Kept) -> Option<Spare> {
        let t0 = Instant::now();
        match self.starting.preload(kept, self.preloaded) {
            Ok(mark) => {
                if self.preloaded != Some(mark) {
                    tracing::debug!(
                        boundary = mark.boundary,
                        took_us = t0.elapsed().as_micros() as u64,
                        "spare preloaded"
                    );
                }
                self.preloaded = Some(mark);
                Some(self)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the spare could not preload; a new one will be started");
                self.discard();
                None
            }
        }
    }
}

/// What a takeover did.
pub(crate) struct TakenOver {
    pub current: Current,
    /// How long requests waited.
    pub downtime: Duration,
    /// The state was lost: the successor started empty.
    pub fresh: bool,
}

/// Everything needed to start appliances for one mount after the first.
pub(crate) struct Successors<'a> {
    pub req: &'a MountRequest,
    pub config: &'a StartConfig,
    pub mountpoint: &'a Path,
    pub devs: &'a [Arc<FuseDev>],
    pub session: BorrowedFd<'a>,
    pub backing_files: &'a Arc<AtomicU64>,
    pub cgroup_procs: Option<&'a Path>,
    pub events: &'a mpsc::Sender<Event>,
    pub kept: Option<&'a Arc<Kept>>,
}

/// How long the keeper link of a dead appliance may take to be read to its end.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

impl Successors<'_> {
    /// Starts an appliance that waits for its predecessor's state.
    pub fn spare(&self, cache_budget: Option<u64>) -> Result<Spare, String> {
        let broker = if crate::supervisor::needs_broker(self.req) {
            let scope =
                crate::supervisor::broker_scope(self.req, self.session, self.backing_files.clone())
                    .map_err(|e| e.to_string())?;
            Some(crate::broker::start(scope).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let keeper = match self.kept {
            Some(k) => Some(
                k.link()
                    .map_err(|e| format!("starting a keeper link: {e}"))?,
            ),
            None => None,
        };
        let mut fds: Vec<_> = self.devs.iter().map(|d| d.as_fd()).collect();
        fds.extend(broker.as_ref().map(|l| l.as_fd()));
        if let (Some((link, _)), Some(kept)) = (&keeper, self.kept) {
            fds.push(link.as_fd());
            fds.push(kept.journal());
        }
        let config = StartConfig {
            restore: true,
            cache_budget,
            ..self.config.clone()
        };
        let starting = Appliance::spawn(
            &self.req.exe,
            &config,
            &fds,
            self.kept.is_some(),
            self.cgroup_procs,
            launch::START_TIMEOUT,
        )
        .map_err(|e| format!("the successor did not start: {e}"))?;
        // Only the successor holds these ends now.
        drop(broker);
        let keeper = keeper.map(|(link, end)| {
            drop(link);
            end
        });
        if let Err(e) = starting.await_state_request() {
            starting.abandon();
            return Err(format!("the successor did not start: {e}"));
        }
        Ok(Spare {
            starting,
            keeper,
            cache_budget,
            preloaded: None,
        })
    }

    /// Replaces a journaled appliance that died: a successor (`spare`, or a new one)
    /// rebuilds its state; if that state cannot be rebuilt, an empty file system takes
    /// over and every node the kernel still holds answers ESTALE.
    /// `since`: when requests stopped being served (the death, or the kill).
    pub fn recover(
        &self,
        dead: &Current,
        spare: Option<Spare>,
        cache_budget: Option<u64>,
        since: Instant,
    ) -> Result<TakenOver, String> {
        let t0 = since;
        let kept = self.kept.ok_or("this mount keeps no recovery journal")?;
        // Dead means every process of it: the one the supervisor started may have died
        // while the sandboxed one still reads requests, which a resend would then
        // leave unanswered or have run twice.
        dead.appliance.kill();
        if !dead.appliance.wait_exit(Duration::from_secs(5)) {
            return Err(
                "the dead appliance's sandboxed process did not exit within 5 s of SIGKILL".into(),
            );
        }
        if let Some(end) = &dead.keeper {
            if !end.wait(DRAIN_LIMIT) {
                return Err("the dead appliance's keeper link did not end".into());
            }
        }
        let drained = t0.elapsed();
        let spare = match spare {
            Some(s) => s,
            None => self.spare(cache_budget)?,
        };
        // A spare that died or timed out says nothing about the state: try a new one
        // (not preloaded) once. Only a successor that refuses the state itself means
        // the state is lost.
        let mut spare = spare;
        let mut tries = 0;
        let (appliance, child, keeper, started_budget) = loop {
            let keeper = spare.keeper.clone();
            let started_budget = spare.cache_budget;
            match spare.starting.recover(kept, spare.preloaded, false) {
                Ok((a, c)) => break (a, c, keeper, started_budget),
                Err(ApplianceError::StateRefused(why)) => {
                    tracing::error!(reason = %why, "the successor could not rebuild the state; starting with an empty file system (old files answer ESTALE)");
                    kept.discard();
                    let spare = self.spare(cache_budget)?;
                    let keeper = spare.keeper.clone();
                    let (a, c) = spare
                        .starting
                        .recover(kept, None, true)
                        .map_err(|e| format!("no appliance could take over: {e}"))?;
                    return self
                        .go(a, c, keeper, t0, cache_budget, spare.cache_budget)
                        .map(|mut t| {
                            t.fresh = true;
                            t
                        });
                }
                Err(e) if tries == 0 => {
                    tracing::warn!(error = %e, "the successor failed; trying a new one");
                    tries += 1;
                    spare = self.spare(cache_budget)?;
                }
                Err(e) => return Err(format!("no successor could take over: {e}")),
            }
        };
        let rebuilt = t0.elapsed();
        let taken = self.go(appliance, child, keeper, t0, cache_budget, started_budget)?;
        tracing::info!(
            drained_us = drained.as_micros() as u64,
            rebuilt_us = rebuilt.as_micros() as u64,
            serving_us = taken.downtime.as_micros() as u64,
            "successor took over"
        );
        Ok(taken)
    }

    /// Replaces a live journaled appliance (`fsva restart`): it stores a fresh
    /// checkpoint while serving, is killed, and a successor recovers as from a crash.
    pub fn restart_journaled(
        &self,
        old: &Current,
        spare: Option<Spare>,
        cache_budget: Option<u64>,
    ) -> Result<TakenOver, String> {
        let spare = match spare {
            Some(s) => s,
            None => self.spare(cache_budget)?,
        };
        // Little journal left to replay. If it fails, the successor replays more.
        match old.appliance.checkpoint_now() {
            Ok(boundary) => {
                if let Some(kept) = self.kept {
                    kept.wait_checkpoint(boundary, Duration::from_secs(2));
                }
            }
            Err(e) => tracing::warn!(error = %e, "no fresh checkpoint before the restart"),
        }
        // The successor restores that checkpoint while the predecessor still serves.
        let spare = match self.kept {
            Some(kept) => match spare.preload(kept) {
                Some(s) => s,
                None => self.spare(cache_budget)?,
            },
            None => spare,
        };
        let since = Instant::now();
        old.appliance.kill();
        if !old.appliance.wait_exit(Duration::from_secs(5)) {
            spare.discard();
            return Err("the old appliance did not exit within 5 s of SIGKILL".into());
        }
        tracing::debug!(
            exit_us = since.elapsed().as_micros() as u64,
            "old appliance gone"
        );
        self.recover(old, Some(spare), cache_budget, since)
    }

    /// The last steps of every takeover: the kernel resends what the predecessor held,
    /// then the successor serves.
    fn go(
        &self,
        appliance: Appliance,
        child: Child,
        keeper: Option<LinkEnd>,
        t0: Instant,
        cache_budget: Option<u64>,
        started_budget: Option<u64>,
    ) -> Result<TakenOver, String> {
        crate::supervisor::watch_appliance(child, self.events, None).map_err(|e| e.to_string())?;
        self.resend();
        if let Err(e) = appliance.resume() {
            // Nothing serves now: once it is gone the event loop answers with EIO.
            appliance.kill();
            return Err(format!("the successor did not begin serving: {e}"));
        }
        let downtime = t0.elapsed();
        if let (Some(bytes), true) = (cache_budget, cache_budget != started_budget) {
            if let Err(e) = appliance.set_cache_budget(bytes) {
                tracing::warn!(error = %e, "the successor did not take the budget in force");
            }
        }
        Ok(TakenOver {
            current: Current { appliance, keeper },
            downtime,
            fresh: false,
        })
    }

    /// Has the kernel queue again what a gone appliance held.
    fn resend(&self) {
        if let Err(e) = crate::fallback::resend_held(self.devs) {
            // The requests the old appliance held would never be answered: end the
            // connection instead of leaving their callers hanging.
            tracing::error!(error = %e, "FUSE_NOTIFY_RESEND failed; aborting the connection");
            if let Err(e) = mount::abort_connection(self.mountpoint) {
                tracing::error!(error = %e, "could not abort the FUSE connection");
            }
        }
    }

    /// Replaces a live appliance that keeps no journal: pause it, take its state with
    /// its descriptors, hand that to a successor, stop it. On failure it serves on.
    pub fn restart_paused(
        &self,
        old: &Current,
        cache_budget: Option<u64>,
    ) -> Result<TakenOver, String> {
        if self.req.vm.is_some() || self.req.channel != ChannelKind::Fusedev {
            return Err(
                "live restart works for process appliances on the fusedev channel so far".into(),
            );
        }
        if !matches!(
            self.req.backend,
            BackendSpec::Mem { .. } | BackendSpec::Passthrough { .. }
        ) {
            return Err("only mem and passthrough can be restarted live so far".into());
        }
        // The successor sets up its sandbox while the predecessor still serves; the
        // downtime is only the handover.
        let spare = self.spare(cache_budget)?;
        let t0 = Instant::now();
        let saved = match old.appliance.checkpoint() {
            Ok(saved) => saved,
            Err(e) => {
                spare.discard();
                // It may have paused before the handover broke: let it go on, or stop
                // it (the event loop then answers with EIO) rather than leave it paused.
                if old.appliance.resume().is_err() {
                    old.appliance.kill();
                }
                return Err(format!("checkpoint failed: {e}"));
            }
        };
        let (appliance, child) = match spare.starting.serve(Some(&saved)) {
            Ok(started) => started,
            Err(e) => {
                let _ = old.appliance.resume();
                return Err(format!(
                    "the successor did not take over ({e}); the appliance serves on"
                ));
            }
        };
        // The successor has restored the state and waits. The predecessor holds requests
        // it read while paused; once it is gone the kernel moves them (everything read
        // and unanswered) back to its queue.
        old.appliance.kill();
        if !old.appliance.wait_exit(Duration::from_secs(5)) {
            tracing::error!(
                pid = old.appliance.pid,
                "the old appliance did not exit within 5 s of SIGKILL"
            );
        }
        tracing::info!(files = saved.fds.len(), "state handed over");
        self.go(
            appliance,
            child,
            spare.keeper,
            t0,
            cache_budget,
            spare.cache_budget,
        )
    }
}
