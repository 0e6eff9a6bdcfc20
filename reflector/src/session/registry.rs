//! The reflector's table of sessions, consulted only when a connection joins.
//!
//! The table is the one structure all sessions share, and nothing on the per-message path
//! touches it: a connection looks its session up once, at JOIN, and then talks to the
//! session's task directly. It also knows which sessions have connected clients, which is
//! what the files endpoint checks before it accepts an upload.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::core::{ConnId, Identity};
use super::{Command, Context, SessionHandle};

/// Commands queued per session before senders wait (back-pressure onto the sockets).
const SESSION_QUEUE: usize = 4096;
/// How long a handed-off shard's JOINs are refused here. Its clients reconnect through the
/// gateway, which points at the new host once the router has the outcome (a report or two);
/// past this a JOIN that still arrives here starts the session afresh from storage.
const FENCE_TTL: Duration = Duration::from_secs(60);
/// How long a hand-off may take: the clients' close (up to the drain's wait) plus the store.
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a JOIN cannot get a session here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The reflector is draining and takes no new sessions.
    Draining,
}

pub use refleet_api::reflector::sessions::{SessionSummary, SessionsReport};

/// Activity of one session since the previous load report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// New views admitted.
    pub joins: u32,
    /// Members that left.
    pub leaves: u32,
    /// Highest member count seen.
    pub peak_users: u32,
    /// Messages reflected.
    pub reflected: u64,
    /// Bytes queued to clients.
    pub bytes: u64,
    /// Router reservations (from join tokens) the admitted views used.
    pub admitted: Vec<u64>,
    /// Hard cap learnt from a token (0: none).
    pub max_users: u32,
}

/// An admitted connection of a session and its peer address.
type Attached = (ConnId, IpAddr);

/// All sessions of this reflector.
#[derive(Debug)]
pub struct Registry {
    summaries: Mutex<HashMap<Arc<str>, SessionSummary>>,
    activity: Mutex<HashMap<Arc<str>, Activity>>,
    /// Woken when a session's membership changes, so the load report goes out at once.
    changed: tokio::sync::Notify,
    sessions: Mutex<HashMap<Arc<str>, SessionHandle>>,
    live: Mutex<HashMap<Arc<str>, Identity>>,
    /// The peer address of every open WebSocket connection.
    conn_peers: Mutex<HashMap<ConnId, IpAddr>>,
    /// The connections each session admitted, with their peer addresses.
    attached: Mutex<HashMap<Arc<str>, Vec<Attached>>>,
    draining: AtomicBool,
    /// Shards handed off (or being handed off) to another reflector, by (appId, shard), and
    /// until when their JOINs are refused here.
    fenced: Mutex<HashMap<(String, String), Instant>>,
    tracker: TaskTracker,
    ctx: Arc<Context>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way that
    // matters more than refusing all further work, so keep going with the data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Registry {
    /// An empty registry whose sessions use `ctx`.
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Self {
            summaries: Mutex::default(),
            activity: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            sessions: Mutex::default(),
            live: Mutex::default(),
            conn_peers: Mutex::default(),
            attached: Mutex::default(),
            draining: AtomicBool::new(false),
            fenced: Mutex::default(),
            tracker: TaskTracker::new(),
            ctx,
        })
    }

    /// The shared session context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The session with this id, started if it is not running (unless draining).
    pub fn join(self: &Arc<Self>, id: &str) -> Result<SessionHandle, Refused> {
        let mut sessions = lock(&self.sessions);
        if let Some(h) = sessions.get(id) {
            if !h.tx.is_closed() {
                return Ok(h.clone());
            }
            // Its task is gone without removing itself (it failed): start a new one.
            sessions.remove(id);
        }
        if self.is_draining() {
            return Err(Refused::Draining);
        }
        let id: Arc<str> = Arc::from(id);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let handle = SessionHandle { tx };
        sessions.insert(id.clone(), handle.clone());
        self.tracker
            .spawn(super::run(id, rx, self.ctx.clone(), self.clone()));
        Ok(handle)
    }

    /// Whether the session is in memory here.
    pub fn contains(&self, id: &str) -> bool {
        lock(&self.sessions).contains_key(id)
    }

    /// Number of sessions in memory.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Removes a session whose queue is empty, closing the queue so that late senders
    /// notice; false (and nothing changes) when commands are still waiting.
    pub(crate) fn remove_if_quiet(&self, id: &str, rx: &mut mpsc::Receiver<Command>) -> bool {
        let mut sessions = lock(&self.sessions);
        if !rx.is_empty() {
            return false;
        }
        sessions.remove(id);
        rx.close();
        true
    }

    /// Removes the handle of a session whose task failed, so that the next JOIN of that id
    /// starts a new task instead of queueing to a dead one.
    pub(crate) fn remove_failed(&self, id: &str) {
        let mut sessions = lock(&self.sessions);
        if sessions.get(id).is_some_and(|h| h.tx.is_closed()) {
            sessions.remove(id);
        }
    }

    /// Records whether a session has connected clients (and under which identity).
    pub(crate) fn set_live(&self, id: &Arc<str>, identity: Option<Identity>) {
        let mut live = lock(&self.live);
        match identity {
            Some(i) => {
                live.insert(id.clone(), i);
            }
            None => {
                live.remove(id);
            }
        }
    }

    /// Records a session's member count (called by its task when the count changes).
    pub(crate) fn set_users(&self, id: &Arc<str>, identity: &Identity, users: usize) {
        lock(&self.summaries).insert(
            id.clone(),
            SessionSummary {
                session_id: id.to_string(),
                name: identity.name.clone(),
                app_id: identity.app_id.clone(),
                persistent_id: identity.persistent_id.clone(),
                users: u32::try_from(users).unwrap_or(u32::MAX),
                peers: Vec::new(),
            },
        );
        let users = u32::try_from(users).unwrap_or(u32::MAX);
        let mut activity = lock(&self.activity);
        let a = activity.entry(id.clone()).or_default();
        a.peak_users = a.peak_users.max(users);
        drop(activity);
        self.changed.notify_one();
    }

    /// Records the peer address of a new WebSocket connection.
    pub(crate) fn connection_opened(&self, conn: ConnId, peer: IpAddr) {
        lock(&self.conn_peers).insert(conn, peer);
    }

    /// Forgets a WebSocket connection's peer address.
    pub(crate) fn connection_closed(&self, conn: ConnId) {
        lock(&self.conn_peers).remove(&conn);
    }

    /// Records that a session admitted `conn`: uploads from its address may go to the
    /// session's paths while it stays connected.
    pub(crate) fn attach(&self, id: &Arc<str>, conn: ConnId) {
        let Some(peer) = lock(&self.conn_peers).get(&conn).copied() else {
            return;
        };
        let mut attached = lock(&self.attached);
        let conns = attached.entry(id.clone()).or_default();
        if !conns.iter().any(|(c, _)| *c == conn) {
            conns.push((conn, peer));
        }
    }

    /// Records that an admitted connection of a session has ended.
    pub(crate) fn detach(&self, id: &str, conn: ConnId) {
        let mut attached = lock(&self.attached);
        if let Some(conns) = attached.get_mut(id) {
            conns.retain(|(c, _)| *c != conn);
            if conns.is_empty() {
                attached.remove(id);
            }
        }
    }

    /// Whether a session has an admitted member connected from `peer`.
    pub fn has_member_from(&self, session_id: &str, peer: IpAddr) -> bool {
        lock(&self.attached)
            .get(session_id)
            .is_some_and(|conns| conns.iter().any(|(_, p)| *p == peer))
    }

    /// Forgets a session that left memory.
    pub(crate) fn forget(&self, id: &str) {
        lock(&self.attached).remove(id);
        lock(&self.summaries).remove(id);
        self.changed.notify_one();
    }

    /// Records a view admitted to a session (for the load report).
    pub(crate) fn record_admission(&self, id: &Arc<str>, admitted: crate::admission::Admitted) {
        let mut all = lock(&self.activity);
        let a = all.entry(id.clone()).or_default();
        a.joins += 1;
        a.admitted.extend(admitted.reservation);
        if admitted.max_users > 0 {
            a.max_users = admitted.max_users;
        }
    }

    /// Records traffic and leaves of a session (for the load report).
    pub(crate) fn record_traffic(&self, id: &Arc<str>, f: super::core::Flushed) {
        let mut all = lock(&self.activity);
        let a = all.entry(id.clone()).or_default();
        a.reflected += f.reflected;
        a.bytes += f.bytes;
        a.leaves += u32::try_from(f.leaves).unwrap_or(u32::MAX);
    }

    /// Takes every session's activity since the previous call.
    pub fn take_activity(&self) -> HashMap<Arc<str>, Activity> {
        std::mem::take(&mut *lock(&self.activity))
    }

    /// Wakes the load report (something it carries changed outside any session).
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    /// Resolves when a session's membership changed since the last wake-up.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Every session in memory with its member count, busiest first.
    pub fn summaries(&self) -> Vec<SessionSummary> {
        let mut all: Vec<SessionSummary> = lock(&self.summaries).values().cloned().collect();
        let attached = lock(&self.attached);
        for s in &mut all {
            if let Some(conns) = attached.get(s.session_id.as_str()) {
                s.peers = conns.iter().map(|(_, p)| *p).collect();
                s.peers.sort_unstable();
                s.peers.dedup();
            }
        }
        drop(attached);
        all.sort_by(|a, b| {
            b.users
                .cmp(&a.users)
                .then_with(|| a.session_id.cmp(&b.session_id))
        });
        all
    }

    /// Whether a session with connected clients has this appId and persistentId (and, when
    /// given, this session id), and an admitted member connected from `peer`.
    pub fn has_live(
        &self,
        app_id: &str,
        persistent_id: &str,
        session_id: Option<&str>,
        peer: IpAddr,
    ) -> bool {
        let owns = |i: &Identity| {
            i.app_id.as_deref() == Some(app_id) && i.persistent_id.as_deref() == Some(persistent_id)
        };
        let live = lock(&self.live);
        match session_id {
            Some(sid) => live.get(sid).is_some_and(owns) && self.has_member_from(sid, peer),
            None => live
                .iter()
                .any(|(sid, i)| owns(i) && self.has_member_from(sid, peer)),
        }
    }

    /// Whether a session with this id has connected clients, one of them from `peer`.
    pub fn is_live(&self, session_id: &str, peer: IpAddr) -> bool {
        lock(&self.live).contains_key(session_id) && self.has_member_from(session_id, peer)
    }

    /// Stops taking new sessions, and ends the sessions that have no connected client now.
    pub async fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.ctx.metrics.draining.set(1);
        self.broadcast(|| Command::EndIfIdle).await;
    }

    /// Whether the reflector is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Tells every session to close its clients and store itself.
    pub async fn drain_all(&self) {
        self.broadcast(|| Command::Drain).await;
    }

    async fn broadcast(&self, command: impl Fn() -> Command) {
        let handles: Vec<SessionHandle> = lock(&self.sessions).values().cloned().collect();
        for h in handles {
            let _ = h.tx.send(command()).await;
        }
    }

    /// Whether JOINs of this shard are refused here because it was handed off.
    pub fn is_fenced(&self, app_id: &str, shard: &str) -> bool {
        let mut fenced = lock(&self.fenced);
        // Every JOIN asks; almost always nothing is fenced.
        if fenced.is_empty() {
            return false;
        }
        let now = Instant::now();
        fenced.retain(|_, until| *until > now);
        fenced.contains_key(&(app_id.to_owned(), shard.to_owned()))
    }

    /// Takes the shard's JOINs again (this reflector is a move's target); true when it was
    /// refused here after an earlier hand-off.
    pub fn unfence(&self, app_id: &str, shard: &str) -> bool {
        lock(&self.fenced)
            .remove(&(app_id.to_owned(), shard.to_owned()))
            .is_some()
    }

    /// Hands every session of shard `shard` of app `app_id` over to another reflector: its
    /// JOINs are refused here from now on (4003, so clients retry), each session closes its
    /// clients with 4003, stores its state and ends. `Ok(n)`: the `n` sessions were stored
    /// (none may have been live). `Err`: a session could not be stored; those that could were
    /// ended, the others carry on here and the shard takes JOINs again.
    pub async fn hand_off(&self, app_id: &str, shard: &str) -> Result<usize, String> {
        let key = (app_id.to_owned(), shard.to_owned());
        lock(&self.fenced).insert(key.clone(), Instant::now() + FENCE_TTL);
        let of_shard: Vec<Arc<str>> = lock(&self.summaries)
            .iter()
            .filter(|(_, s)| {
                s.app_id.as_deref() == Some(app_id)
                    && s.name
                        .as_deref()
                        .and_then(|n| refleet_core::shard::join_shard(n, app_id))
                        == Some(shard)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let handles: Vec<SessionHandle> = {
            let sessions = lock(&self.sessions);
            of_shard
                .iter()
                .filter_map(|id| sessions.get(id).cloned())
                .collect()
        };
        let mut waiting = Vec::with_capacity(handles.len());
        for h in handles {
            let (done, outcome) = oneshot::channel();
            // A closed queue: the session just ended, and ending stores it.
            if h.tx.send(Command::HandOff { done }).await.is_ok() {
                waiting.push(outcome);
            }
        }
        let count = waiting.len();
        let outcomes =
            tokio::time::timeout(HAND_OFF_TIMEOUT, futures_util::future::join_all(waiting)).await;
        let failure = match outcomes {
            Err(_) => Some(format!("not stored within {HAND_OFF_TIMEOUT:?}")),
            Ok(all) => all.into_iter().find_map(|o| match o {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("the session task failed before storing".to_owned()),
            }),
        };
        self.ctx.metrics.hand_off(failure.is_none());
        match failure {
            Some(e) => {
                lock(&self.fenced).remove(&key);
                Err(e)
            }
            None => Ok(count),
        }
    }

    /// Completes when every session task has ended (call after [`Registry::begin_drain`]).
    pub async fn wait_all(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// A reflector lets an upload in when one of its own sessions owns the path.
impl refleet_files::endpoint::UploadGate for Registry {
    fn allows<'a>(
        &'a self,
        upload: &'a refleet_files::endpoint::Upload<'a>,
        peer: IpAddr,
    ) -> futures_util::future::BoxFuture<'a, bool> {
        let allowed = match upload {
            refleet_files::endpoint::Upload::Snapshot {
                app_id,
                persistent_id,
                session_id,
            } => self.has_live(app_id, persistent_id, Some(session_id), peer),
            refleet_files::endpoint::Upload::Persisted {
                app_id,
                persistent_id,
            } => self.has_live(app_id, persistent_id, None, peer),
            refleet_files::endpoint::Upload::KeylessSnapshot { session_id } => {
                self.is_live(session_id, peer)
            }
        };
        Box::pin(std::future::ready(allowed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn registry() -> Arc<Registry> {
        let settings = super::super::core::Settings {
            reflector_name: "t".into(),
            default_tick: Duration::from_millis(200),
            empty_session_ttl: Duration::from_secs(10),
            rejoin_grace: Duration::from_secs(10),
            requ_messages: 10,
            max_messages: 10,
            max_retained_bytes: 1000,
            files_base: "http://f".into(),
        };
        Registry::new(Arc::new(Context {
            storage: refleet_files::storage::Storage::open("memory://").unwrap(),
            metrics: crate::metrics::Metrics::new("t"),
            settings: Arc::new(settings),
            files_base: "http://f".into(),
            snapshot_retention: 1,
            former_views: 1024,
            admission: crate::admission::Admission::new(false, Default::default()),
            host: "test".into(),
            checkpoint_interval: None,
        }))
    }

    #[tokio::test]
    async fn a_session_whose_task_died_is_replaced_at_the_next_join() {
        let r = registry();
        // A handle whose task is gone (its receiver dropped), as after a panic.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        lock(&r.sessions).insert(Arc::from("s"), SessionHandle { tx });
        let h = r.join("s").unwrap();
        assert!(!h.tx.is_closed(), "a new session task took its place");
        // remove_failed leaves a live session alone.
        r.remove_failed("s");
        assert!(r.contains("s"));
    }
}

#[cfg(test)]
mod wire_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_sessions_report_keeps_its_json_names_and_reads_back() {
        let report = SessionsReport {
            region: "eu".into(),
            draining: false,
            sessions: vec![SessionSummary {
                session_id: "s1".into(),
                name: Some("app/lobby~1".into()),
                app_id: Some("app".into()),
                persistent_id: None,
                users: 3,
                peers: vec!["127.0.0.1".parse().unwrap()],
            }],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "region": "eu", "draining": false,
                "sessions": [{"sessionId": "s1", "name": "app/lobby~1", "appId": "app",
                              "persistentId": null, "users": 3, "peers": ["127.0.0.1"]}]
            })
        );
        assert_eq!(
            serde_json::from_value::<SessionsReport>(json).unwrap(),
            report
        );
        assert_eq!(report.sessions[0].shard(), Some("lobby~1"));
        // Absent fields take defaults.
        let sparse: SessionsReport =
            serde_json::from_str(r#"{"sessions": [{"sessionId": "s2"}]}"#).unwrap();
        assert_eq!(sparse.sessions[0].users, 0);
        assert!(!sparse.draining);
    }
}
