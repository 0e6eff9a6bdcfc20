//! One task per session.
//!
//! A session's state is owned by exactly one task, so no lock is shared by all sessions and
//! the ordering of a session's messages is simply the order its task handles them. Connection
//! tasks parse frames and send [`Command`]s; the task drives [`core::Core`] and performs its
//! storage effects on a per-session writer that keeps them in order.
//!
//! Lifecycle: created by the first JOIN (looking up stored state, then persisted data);
//! kept while it has members and for `--empty-session-ttl` after the last one left; then
//! stored (so the next JOIN resumes it) and removed. A drain closes the clients with 4003,
//! keeps reading what they had already sent until they are gone, stores, and removes. A
//! hand-off (a planned move of its shard to another reflector) does the same for one
//! session, except that when storing fails the session carries on here and the clients it
//! closed may rejoin it.
//!
//! **Crashes and fencing.** While it runs, a session's state is also stored every
//! `--checkpoint-interval` when it changed (a checkpoint, marked not clean), so a crash
//! loses at most that much; a session resumed from a checkpoint starts a fresh timeline
//! (clients may have seen messages the checkpoint lacks, and must not continue a forked
//! history). The first JOIN claims the session in storage; every store presents that claim,
//! and a host whose claim was superseded (another reflector resumed the session while this
//! one was cut off) is fenced: it closes the session's clients and ends without storing.

mod chunk;
pub mod clock;
pub mod core;
mod debounce;
pub mod files_scope;
mod gate;
mod members;
pub mod registry;
mod retained;
pub mod stored;
mod tallies;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;

use self::core::{ConnId, Core, Effect, Settings};
use self::gate::Gate;
use crate::admission::{self, Admission, Presented, Refusal, Requested};
use crate::close;
use crate::frame::{ClientMsg, Join};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use refleet_core::shard::join_shard;
use refleet_files::storage::{Storage, StorageError};
use registry::Registry;

/// How long a storage look-up at JOIN may take: the client gives up after 5 s without SYNC.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a drained session waits for its clients' sides of the close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Commands handled per wake-up.
const BATCH: usize = 256;

/// What a connection tells its session.
#[derive(Debug)]
pub enum Command {
    /// A JOIN; the session answers through `out`.
    Join {
        conn: ConnId,
        out: Outbox,
        join: Box<Join>,
        /// The connection's verified join token, when it carried one or tokens are required.
        token: Option<Arc<Presented>>,
    },
    /// A SEND, TUTTI, SNAP, SAVE or TICKS from a joined connection.
    Message { conn: ConnId, msg: ClientMsg },
    /// The connection has ended.
    Closed { conn: ConnId },
    /// Close every client and store the session (the reflector is draining).
    Drain,
    /// The reflector began draining: a session without connected clients is stored and
    /// ended now instead of after its TTL, so the drain does not wait for it.
    EndIfIdle,
    /// Hand the session over to another reflector (a planned move): close the clients with
    /// 4003 as a drain does, store, and end; `done` gets the outcome. When storing fails the
    /// session carries on here and its clients may rejoin it.
    HandOff {
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// Where a session task sends its commands.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub(crate) tx: mpsc::Sender<Command>,
}

/// What every session task needs.
#[derive(Debug)]
pub struct Context {
    pub storage: Storage,
    pub metrics: Metrics,
    pub settings: Arc<Settings>,
    /// Public files base URL (no trailing slash), to map snapshot URLs to storage keys.
    pub files_base: String,
    /// Snapshots kept per session.
    pub snapshot_retention: usize,
    /// Admitted views a session remembers beyond its members (`--former-views`).
    pub former_views: usize,
    /// Join tokens and hard caps.
    pub admission: Arc<Admission>,
    /// This process's instance id: whose claim on a session is whose (see
    /// [`refleet_files::storage::SessionOwner`]).
    pub host: String,
    /// How often a live session's state is checkpointed (`None`: never).
    pub checkpoint_interval: Option<Duration>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs one session until it ends. `rx` is closed by the registry when the session is removed.
pub(crate) async fn run(
    id: Arc<str>,
    rx: mpsc::Receiver<Command>,
    ctx: Arc<Context>,
    registry: Arc<Registry>,
) {
    ctx.metrics.sessions.inc();
    // Whatever way this task ends, a panic included, the registry must not keep its handle:
    // a dead handle would refuse every later JOIN of this session id.
    let mut guard = EndGuard {
        rx,
        id: id.clone(),
        registry: registry.clone(),
        ctx: ctx.clone(),
        ended: false,
    };
    let mut core = Core::new(
        id.clone(),
        ctx.settings.clone(),
        ctx.metrics.clone(),
        Instant::now(),
    );
    let mut writer = Writer::new(ctx.clone());
    let mut live = false;
    let mut reported_users = usize::MAX;
    let mut gate = Gate::default();
    let mut drain_deadline: Option<Instant> = None;
    let mut end_when_idle = false;
    // Checkpoints: the one being stored, when the next is due, and what the last one had.
    let mut checkpoint: Option<tokio::sync::oneshot::Receiver<Result<(), StorageError>>> = None;
    let mut next_checkpoint: Option<Instant> = None;
    let mut checkpointed = (core.seq(), 0usize);
    // Another host took the session over: end without storing.
    let mut fenced = false;
    // Hand-offs waiting for this session's store.
    let mut handing_off: Vec<tokio::sync::oneshot::Sender<Result<(), String>>> = Vec::new();
    // Grows up to BATCH under load; small for the many quiet sessions.
    let mut buf: Vec<Command> = Vec::with_capacity(8);
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let drained = loop {
        let deadline = [core.next_deadline(), drain_deadline, next_checkpoint]
            .into_iter()
            .flatten()
            .min();
        sleep
            .as_mut()
            .reset(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)));
        tokio::select! {
            n = guard.rx.recv_many(&mut buf, BATCH) => {
                if n == 0 {
                    break false;
                }
                for cmd in buf.drain(..) {
                    match cmd {
                        Command::Join { conn, out, join, token } => {
                            on_join(&mut core, &mut gate, &ctx, &registry, &id, Joining { conn, out, join, token }).await;
                        }
                        Command::Message { conn, msg } => core.message(conn, msg, Instant::now()),
                        Command::Closed { conn } => {
                            registry.detach(&id, conn);
                            core.closed(conn, Instant::now());
                        }
                        Command::EndIfIdle => end_when_idle = true,
                        Command::Drain => {
                            if !core.is_draining() {
                                core.begin_drain(Instant::now());
                                drain_deadline = Some(Instant::now() + CLOSE_WAIT);
                            }
                        }
                        Command::HandOff { done } => {
                            handing_off.push(done);
                            if !core.is_draining() {
                                tracing::info!(session = %id, "handing the session off");
                                core.begin_hand_off(Instant::now());
                                drain_deadline = Some(Instant::now() + CLOSE_WAIT);
                            }
                        }
                    }
                }
            }
            () = &mut sleep => core.on_timers(Instant::now()),
            done = async { checkpoint.as_mut().expect("guarded").await }, if checkpoint.is_some() => {
                checkpoint = None;
                if let Ok(Err(e @ StorageError::Fenced { .. })) = done {
                    tracing::warn!(session = %id, error = %e, "another reflector took this session over: closing its clients here");
                    ctx.metrics.checkpoint("fenced");
                    fenced = true;
                    if !core.is_draining() {
                        core.begin_hand_off(Instant::now());
                        drain_deadline = Some(Instant::now());
                    }
                }
            }
        }
        for effect in core.take_effects() {
            if matches!(effect, Effect::SavePersisted { .. }) && !persists(&ctx, &gate) {
                ctx.metrics.persistence("skipped");
                tracing::debug!(session = %id, "SAVE dropped: the Session has persistence off");
                continue;
            }
            writer.submit(effect);
        }
        let flushed = core.flush_stats();
        if flushed.reflected > 0 || flushed.leaves > 0 {
            registry.record_traffic(&id, flushed);
        }
        if core.has_connections() != live {
            live = !live;
            registry.set_live(&id, live.then(|| core.identity().clone()));
        }
        let users = core.member_count();
        if users != reported_users {
            reported_users = users;
            registry.set_users(&id, core.identity(), users);
        }
        let now = Instant::now();
        if let Some(every) = ctx.checkpoint_interval
            && gate.resumed
            && !core.is_draining()
            && !fenced
        {
            let due = *next_checkpoint.get_or_insert(now + every);
            let state = (core.seq(), core.member_count());
            if due <= now && checkpoint.is_none() {
                next_checkpoint = Some(now + every);
                if state != checkpointed && core.has_state() {
                    checkpointed = state;
                    checkpoint = Some(start_checkpoint(&mut core, &gate, &ctx, now));
                }
            }
        }
        let drain_done = core.is_draining()
            && (!core.has_connections() || drain_deadline.is_some_and(|d| d <= now));
        let idle_done = !core.is_draining()
            && (core.end_due().is_some_and(|d| d <= now)
                || (end_when_idle && !core.has_connections()));
        if drain_done || idle_done {
            core.settle(now);
            // The end store must land after any checkpoint, never under it.
            if let Some(pending) = checkpoint.take() {
                let _ = pending.await;
            }
            let stored = if fenced {
                Err("another reflector runs this session".to_owned())
            } else if gate.resumed && core.has_state() {
                store(&mut core, &gate, &ctx).await.map_err(|e| {
                    // Superseded at the last moment: the session is the other host's.
                    fenced = matches!(e, StorageError::Fenced { .. });
                    e.to_string()
                })
            } else {
                Ok(())
            };
            if !handing_off.is_empty() {
                match stored {
                    // A reflector drain also needs the store; only a hand-off may give up
                    // (not when fenced: the session is the other host's now).
                    Err(e) if !registry.is_draining() && !fenced => {
                        tracing::warn!(session = %id, error = %e, "hand-off called off: the session stays here");
                        core.abort_hand_off(now);
                        drain_deadline = None;
                        for done in handing_off.drain(..) {
                            let _ = done.send(Err(e.clone()));
                        }
                        continue;
                    }
                    // Answered once the session is out of the registry (below): a JOIN
                    // that comes after the answer must not find this ending session.
                    _ => {}
                }
            }
            if registry.remove_if_quiet(&id, &mut guard.rx) {
                break drain_done;
            }
        }
    };
    for done in handing_off.drain(..) {
        let _ = done.send(Ok(()));
    }
    // Anything that reached the queue after the session was removed: ask to come back, the
    // next JOIN finds the state just stored.
    while let Ok(cmd) = guard.rx.try_recv() {
        match cmd {
            Command::Join { out, .. } => {
                out.close(close::RECONNECT.with_reason("session restarting, reconnect"));
            }
            // It was stored just now, on its way out.
            Command::HandOff { done } => {
                let _ = done.send(Ok(()));
            }
            _ => {}
        }
    }
    registry.set_live(&id, None);
    registry.forget(&id);
    writer.finish().await;
    core.release();
    guard.ended = true;
    ctx.metrics.sessions.dec();
    ctx.metrics.session_end(drained);
    tracing::info!(session = %id, drained, "session ended");
}

/// Cleans up after a session task that did not reach its normal end (it panicked): removes
/// its handle so the next JOIN starts afresh (from its last stored state), and takes it out
/// of the reports and gauges. The panic itself ends only this task.
struct EndGuard {
    /// The session's queue; closed first, so that the registry can tell its handle is dead.
    rx: mpsc::Receiver<Command>,
    id: Arc<str>,
    registry: Arc<Registry>,
    ctx: Arc<Context>,
    ended: bool,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.rx.close();
        self.registry.remove_failed(&self.id);
        self.registry.set_live(&self.id, None);
        self.registry.forget(&self.id);
        self.ctx.metrics.sessions.dec();
        // Otherwise the task was cancelled: the runtime is shutting down.
        if std::thread::panicking() {
            tracing::error!(session = %self.id, "session task failed; its clients are disconnected and the session restarts from its stored state");
            self.ctx.metrics.session_failed();
        }
    }
}

/// A JOIN handed to its session.
struct Joining {
    conn: ConnId,
    out: Outbox,
    join: Box<Join>,
    token: Option<Arc<Presented>>,
}

/// Whether this session keeps persistent data: the operator's shard settings, else its
/// binding's token claim, else on.
fn persists(ctx: &Context, gate: &Gate) -> bool {
    let b = gate.binding();
    ctx.admission.persistence(
        b.map_or("", |b| b.shard.as_str()),
        b.and_then(|b| b.persistence),
    )
}

/// Admits (or refuses) a JOIN and hands it to the core. Order matters: nothing is looked up
/// or remembered for a JOIN before it showed a token for the identity it names, the
/// session's stored state is read before deciding (it holds the binding and the views that
/// may return), and persisted data is looked up only for an admitted JOIN.
async fn on_join(
    core: &mut Core,
    gate: &mut Gate,
    ctx: &Context,
    registry: &Registry,
    id: &Arc<str>,
    j: Joining,
) {
    let Joining {
        conn,
        out,
        join,
        token,
    } = j;
    let presented = token.as_deref();
    let req = Requested {
        app_id: join.app_id.as_deref().unwrap_or(""),
        shard: shard_of(&join),
    };
    let refuse = |r: Refusal| {
        ctx.metrics.join_refusals(r.reason);
        tracing::warn!(session = %id, reason = r.reason, detail = %r.detail, "JOIN refused");
        out.close(r.close.clone());
    };
    // The connection ran `Admission::precheck` before it could start this session or queue
    // the JOIN: what reaches here names the identity its token was signed for.
    if let Some(b) = gate.binding()
        && !b.admits(req.app_id, req.shard)
    {
        return refuse(admission::wrong_session(b, req));
    }
    if !gate.resumed {
        match resume(core, gate, ctx, req).await {
            Ok(()) => gate.resumed = true,
            Err(Resume::Refused(r)) => return refuse(r),
            Err(Resume::Storage(e)) => {
                tracing::error!(session = %id, error = %e, "storage look-up failed; client asked to retry");
                out.close(close::RECONNECT.with_reason("storage unavailable, retry"));
                return;
            }
        }
    }
    let user = join.user.as_deref();
    let view = gate::view_of(user);
    let known = gate.known(&ctx.admission, view, core.is_member(user), presented);
    if !known && gate.taken(&ctx.admission, view, presented) {
        return refuse(Refusal {
            close: close::BAD_API_KEY.with_reason("this view joined with another token"),
            reason: "view_taken",
            detail: format!(
                "user {} was admitted with another token",
                user.unwrap_or("")
            ),
        });
    }
    let now_unix = i64::try_from(wall_ms() / 1000).unwrap_or(i64::MAX);
    let admitted = match ctx.admission.decide(
        presented,
        req,
        gate.binding(),
        known,
        core.member_count(),
        now_unix,
    ) {
        Ok(a) => a,
        Err(r) => return refuse(r),
    };
    if !known {
        gate.admit(
            view,
            presented,
            admitted,
            req,
            core.member_count(),
            ctx.former_views,
        );
        registry.record_admission(id, admitted);
    }
    if !gate.loaded {
        if let Err(e) = look_up_persisted(core, &join, ctx, persists(ctx, gate)).await {
            tracing::error!(session = %id, error = %e, "persisted-data look-up failed; client asked to retry");
            out.close(close::RECONNECT.with_reason("storage unavailable, retry"));
            return;
        }
        gate.loaded = true;
    }
    core.join(conn, out, *join, Instant::now());
    // Uploads into the session's paths are accepted from this connection's address now.
    registry.attach(id, conn);
}

/// Why a session could not be resumed for a JOIN.
enum Resume {
    /// The stored session belongs to another identity.
    Refused(Refusal),
    Storage(StorageError),
}

/// Before the first JOIN is decided: continues the session's stored state when there is
/// one (refusing a JOIN that names another identity than the one it was stored under).
async fn resume(
    core: &mut Core,
    gate: &mut Gate,
    ctx: &Context,
    req: Requested<'_>,
) -> Result<(), Resume> {
    let id = core.id().clone();
    let timed_out = |_| Resume::Storage(StorageError::Timeout(LOOKUP_TIMEOUT));
    let stored = tokio::time::timeout(LOOKUP_TIMEOUT, ctx.storage.load_session(&id))
        .await
        .map_err(timed_out)?;
    // Claimed before anything is served: from now on a host that ran it before is fenced.
    let epoch = tokio::time::timeout(LOOKUP_TIMEOUT, ctx.storage.claim_session(&id, &ctx.host))
        .await
        .map_err(timed_out)?
        .map_err(Resume::Storage)?;
    gate.epoch = epoch;
    match stored {
        Ok(Some(state)) => {
            let mut restored = Gate::default();
            restored.restore(&state);
            if let Some(b) = restored.binding()
                && !b.admits(req.app_id, req.shard)
            {
                return Err(Resume::Refused(admission::wrong_session(b, req)));
            }
            tracing::info!(session = %id, timeline = %state.timeline, messages = state.messages.len(), clean = state.clean, epoch, "session resumed from storage");
            ctx.metrics.session_state("resume", true);
            *gate = restored;
            gate.epoch = epoch;
            // A resumed session has its persisted data (or snapshot) already.
            gate.loaded = true;
            let clean = state.clean;
            core.restore(state, Instant::now());
            if !clean {
                core.fresh_timeline();
                ctx.metrics.checkpoint("resumed");
                tracing::warn!(session = %id, timeline = %core.timeline(), "resumed from a checkpoint (its reflector did not end it): clients rebuild on a fresh timeline");
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(StorageError::Corrupt { key, source }) => {
            // A record we cannot read would block the session forever; start fresh instead.
            tracing::error!(session = %id, key, error = %source, "stored session unreadable, starting fresh");
            ctx.metrics.session_state("resume", false);
            Ok(())
        }
        Err(e) => {
            ctx.metrics.session_state("resume", false);
            Err(Resume::Storage(e))
        }
    }
}

/// After the first admitted JOIN of a fresh session: when the shard `persists`, finds
/// persisted data for that JOIN's identity.
async fn look_up_persisted(
    core: &mut Core,
    join: &Join,
    ctx: &Context,
    persists: bool,
) -> Result<(), StorageError> {
    let id = core.id().clone();
    let identity = Core::identity_from(join);
    if !persists {
        ctx.metrics.persistence("skipped");
        return Ok(());
    }
    if let (Some(app), Some(pid)) = (&identity.app_id, &identity.persistent_id) {
        let dev = identity.developer_id.as_deref().unwrap_or("unknown_dev_id");
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, ctx.storage.load_persisted(dev, app, pid))
            .await
            .map_err(|_| StorageError::Timeout(LOOKUP_TIMEOUT))?;
        match found {
            Ok(Some(url)) => {
                tracing::info!(session = %id, app, persistent_id = %pid, "persisted data found");
                ctx.metrics.persistence("lookup_hit");
                core.set_persisted_url(url);
            }
            Ok(None) => ctx.metrics.persistence("lookup_miss"),
            Err(e) => {
                ctx.metrics.persistence("error");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Stores a checkpoint of the running session off its task; the receiver gets the outcome.
fn start_checkpoint(
    core: &mut Core,
    gate: &Gate,
    ctx: &Arc<Context>,
    now: Instant,
) -> tokio::sync::oneshot::Receiver<Result<(), StorageError>> {
    // Only reference counts here: the messages are copied into the record off this task.
    let (mut state, shared) = core.checkpoint(now, wall_ms());
    gate.fill(&mut state);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (ctx, epoch) = (ctx.clone(), gate.epoch);
    tokio::spawn(async move {
        let outcome = match state.to_json_with(shared.iter().map(|m| m.as_str())) {
            Ok(body) => {
                ctx.storage
                    .store_owned_json(&state.session_id, body, &ctx.host, epoch)
                    .await
            }
            Err(source) => Err(StorageError::Corrupt {
                key: state.session_id.clone(),
                source,
            }),
        };
        match &outcome {
            Ok(()) => ctx.metrics.checkpoint("stored"),
            // Counted by the session, which acts on it.
            Err(StorageError::Fenced { .. }) => {}
            Err(e) => {
                ctx.metrics.checkpoint("failed");
                tracing::warn!(session = %state.session_id, error = %e, "checkpoint failed; the next one retries");
            }
        }
        let _ = tx.send(outcome);
    });
    rx
}

/// Stores the session's state.
async fn store(core: &mut Core, gate: &Gate, ctx: &Context) -> Result<(), StorageError> {
    let mut state = core.to_stored(Instant::now(), wall_ms());
    gate.fill(&mut state);
    let (messages, seq) = (state.messages.len(), state.seq);
    match ctx
        .storage
        .store_owned(&state.session_id, &state, &ctx.host, gate.epoch)
        .await
    {
        Ok(()) => {
            ctx.metrics.session_state("store", true);
            tracing::info!(session = %core.id(), seq, messages, "session state stored");
            Ok(())
        }
        Err(e @ StorageError::Fenced { .. }) => {
            ctx.metrics.session_state("store", false);
            tracing::warn!(session = %core.id(), error = %e, "not stored: another reflector runs this session now");
            Err(e)
        }
        Err(e) => {
            ctx.metrics.session_state("store", false);
            tracing::error!(session = %core.id(), error = %e, "storing session state failed");
            Err(e)
        }
    }
}

/// Carries out a session's storage effects one after another, off the session's hot path.
/// Its task and channel start with the first effect: most sessions never have one, and an
/// unbounded channel allocates a block of 32 slots (~3 KB) up front.
struct Writer {
    ctx: Arc<Context>,
    running: Option<(mpsc::UnboundedSender<Effect>, tokio::task::JoinHandle<()>)>,
}

impl Writer {
    fn new(ctx: Arc<Context>) -> Self {
        Self { ctx, running: None }
    }

    fn submit(&mut self, effect: Effect) {
        let (tx, _) = self.running.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Effect>();
            let ctx = self.ctx.clone();
            let task = tokio::spawn(async move {
                while let Some(effect) = rx.recv().await {
                    apply(&ctx, effect).await;
                }
            });
            (tx, task)
        });
        let _ = tx.send(effect);
    }

    async fn finish(self) {
        if let Some((tx, task)) = self.running {
            drop(tx);
            let _ = task.await;
        }
    }
}

async fn apply(ctx: &Context, effect: Effect) {
    match effect {
        Effect::SavePersisted {
            developer_id,
            app_id,
            persistent_id,
            url,
        } => {
            match ctx
                .storage
                .save_persisted(&developer_id, &app_id, &persistent_id, &url)
                .await
            {
                Ok(()) => {
                    ctx.metrics.persistence("save");
                    tracing::info!(app = %app_id, persistent_id = %persistent_id, "persisted data recorded");
                }
                Err(e) => {
                    ctx.metrics.persistence("error");
                    tracing::error!(app = %app_id, persistent_id = %persistent_id, error = %e, "recording persisted data failed");
                }
            }
        }
        Effect::PruneSnapshots { url } => {
            let Some(key) = url
                .strip_prefix(&ctx.files_base)
                .and_then(|k| k.strip_prefix('/'))
            else {
                return;
            };
            let segments: Vec<&str> = key.split('/').collect();
            if refleet_files::endpoint::valid_segments(&segments).is_err() {
                return;
            }
            match ctx
                .storage
                .prune_snapshots(&segments, ctx.snapshot_retention)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "old snapshots pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning old snapshots failed"),
            }
        }
    }
}

/// The shard name a JOIN asks for: its `name` is `<appId>/<shard>`.
pub fn shard_of(join: &Join) -> &str {
    let name = join.name.as_deref().unwrap_or("");
    join.app_id
        .as_deref()
        .and_then(|app| join_shard(name, app))
        .unwrap_or(name)
}
