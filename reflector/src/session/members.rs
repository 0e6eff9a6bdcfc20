//! The members of one session and the `users` news about them.
//!
//! ```text
//!   JOIN ──► member (Waiting) ──SYNC──► Active ──socket closed──► Leaving ──leaveDelay──► gone
//!                                          ▲                          │ same user JOINs again
//!                                          └──────────────────────────┘ (no join/leave seen)
//!   resumed from storage: former members start as Ghosts, claimed by their user's next JOIN
//!   drained: Active members become Closing and are kept in the stored state
//! ```
//!
//! The model learns who joined and left from `users` messages. Joins and leaves are gathered
//! for [`USERS_INTERVAL`] so that a reconnect (a leave and a join of the same user) cancels
//! out instead of reaching the model; this module only builds the message, reflecting it is
//! the session's.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;

use super::core::ConnId;
use crate::close;
use crate::outbox::Outbox;

/// How long user joins and leaves are gathered into one `users` message.
pub const USERS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Joined, SYNC not sent yet.
    Waiting,
    /// Receives RECVs and TICKs.
    Active,
    /// Socket closed; still a member until the deadline (leaveDelay).
    Leaving(Instant),
    /// Member restored from stored state; still a member until its user rejoins or the deadline.
    Ghost(Instant),
    /// Closed by a drain; kept as a member in the stored state.
    Closing,
}

impl State {
    /// Admitted and not gone: the user may take the membership over by joining again.
    fn is_admitted(self) -> bool {
        matches!(self, State::Active | State::Leaving(_) | State::Ghost(_))
    }
}

#[derive(Debug)]
pub(crate) struct Member {
    pub conn: Option<ConnId>,
    pub out: Option<Outbox>,
    /// The client's `user` record as JSON text (one per view).
    pub user: Option<Arc<str>>,
    pub state: State,
}

/// What [`Members::disconnect`] did with a member whose connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disconnected {
    /// It never finished joining and is gone without news.
    Dropped,
    /// It stays a member for now (leave delay, ghost, drain).
    Kept,
    /// It leaves at once: the caller removes it with [`Members::remove`].
    LeavesNow,
}

/// The member table and the `users` batch being gathered.
#[derive(Debug, Default)]
pub(crate) struct Members {
    list: Vec<Member>,
    pending_joined: Vec<Arc<str>>,
    pending_left: Vec<Arc<str>>,
    users_due: Option<Instant>,
}

impl Members {
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, i: usize) -> &Member {
        &self.list[i]
    }

    pub fn get_mut(&mut self, i: usize) -> &mut Member {
        &mut self.list[i]
    }

    #[inline]
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Member> {
        self.list.iter_mut()
    }

    /// Whether any member has an open connection.
    pub fn has_connections(&self) -> bool {
        self.list.iter().any(|m| m.conn.is_some())
    }

    /// The admitted, not yet gone member of this user record.
    pub fn admitted(&self, user: &str) -> Option<usize> {
        self.list
            .iter()
            .position(|m| m.user.as_deref() == Some(user) && m.state.is_admitted())
    }

    /// Members counted in `users` (everything but connections still waiting for SYNC).
    pub fn count(&self) -> usize {
        self.list
            .iter()
            .filter(|m| m.state != State::Waiting)
            .count()
    }

    /// Members receiving RECVs.
    pub fn active_count(&self) -> usize {
        self.list
            .iter()
            .filter(|m| m.state == State::Active)
            .count()
    }

    pub fn any_active(&self) -> bool {
        self.list.iter().any(|m| m.state == State::Active)
    }

    /// The member on this connection.
    pub fn by_conn(&self, conn: ConnId) -> Option<usize> {
        self.list.iter().position(|m| m.conn == Some(conn))
    }

    /// The send queue of the member on this connection.
    pub fn outbox_of(&self, conn: ConnId) -> Option<&Outbox> {
        self.list
            .iter()
            .find(|m| m.conn == Some(conn))
            .and_then(|m| m.out.as_ref())
    }

    /// Whether this connection belongs to an active member (one that may act for the session).
    pub fn is_active_conn(&self, conn: ConnId) -> bool {
        self.list
            .iter()
            .any(|m| m.conn == Some(conn) && m.state == State::Active)
    }

    /// A new member on a new connection, waiting for its SYNC; returns its index.
    pub fn add(&mut self, conn: ConnId, out: Outbox, user: Option<Arc<str>>) -> usize {
        self.list.push(Member {
            conn: Some(conn),
            out: Some(out),
            user,
            state: State::Waiting,
        });
        self.list.len() - 1
    }

    /// A member of a stored session, kept until its user joins again or `until`.
    pub fn add_ghost(&mut self, user: Arc<str>, until: Instant) {
        self.list.push(Member {
            conn: None,
            out: None,
            user: Some(user),
            state: State::Ghost(until),
        });
    }

    /// The admitted member `i` is back on a new connection: it takes its membership over, so
    /// the model sees neither a leave nor a join. A different older connection is closed.
    pub fn reconnect(&mut self, i: usize, conn: ConnId, out: Outbox) {
        let m = &mut self.list[i];
        if let Some(old) = m.out.take()
            && !old.same(&out)
        {
            old.close(close::RECONNECT.with_reason("replaced by a newer connection"));
        }
        m.conn = Some(conn);
        m.out = Some(out);
        m.state = State::Waiting;
    }

    /// Member `i` got its SYNC.
    pub fn activate(&mut self, i: usize) {
        self.list[i].state = State::Active;
    }

    /// Member `i`'s connection ended.
    pub fn disconnect(
        &mut self,
        i: usize,
        leave_delay: Duration,
        draining: bool,
        now: Instant,
    ) -> Disconnected {
        let m = &mut self.list[i];
        m.conn = None;
        m.out = None;
        match m.state {
            State::Waiting => {
                self.list.swap_remove(i);
                Disconnected::Dropped
            }
            State::Active if draining => {
                m.state = State::Closing;
                Disconnected::Kept
            }
            State::Active if leave_delay.is_zero() => Disconnected::LeavesNow,
            State::Active => {
                m.state = State::Leaving(now + leave_delay);
                Disconnected::Kept
            }
            State::Leaving(_) | State::Ghost(_) | State::Closing => Disconnected::Kept,
        }
    }

    /// Removes member `i` and queues its leave.
    pub fn remove(&mut self, i: usize, now: Instant) {
        let m = self.list.swap_remove(i);
        if let Some(u) = m.user {
            self.queue_left(u, now);
        }
    }

    /// The first member from index `from` on whose leave delay or ghost grace is over.
    pub fn next_expired(&self, from: usize, now: Instant) -> Option<usize> {
        (from..self.list.len()).find(
            |&i| matches!(self.list[i].state, State::Leaving(t) | State::Ghost(t) if t <= now),
        )
    }

    /// When the earliest leave delay or ghost grace ends.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.list
            .iter()
            .filter_map(|m| match m.state {
                State::Leaving(t) | State::Ghost(t) => Some(t),
                _ => None,
            })
            .min()
    }

    /// Closes every connection for a drain or a hand-off with `reason`; active members stay
    /// as Closing, so the stored state still names them and their rejoin is seamless.
    pub fn close_for_drain(&mut self, reason: &'static str) {
        for m in &mut self.list {
            if let Some(out) = m.out.take() {
                out.close(close::RECONNECT.with_reason(reason));
            }
            if m.state == State::Active {
                m.state = State::Closing;
            }
        }
    }

    /// A hand-off was called off (the state could not be stored): the members closed for it
    /// may claim their places again until `until`, as after a resume from storage.
    pub fn reopen_closing(&mut self, until: Instant) {
        for m in &mut self.list {
            if m.state == State::Closing {
                m.state = State::Ghost(until);
            }
        }
    }

    /// Forgets every member.
    pub fn clear(&mut self) {
        self.list.clear();
    }

    /// The user records to store, once each (views still waiting for SYNC are not members).
    pub fn stored_users(&self) -> Vec<Box<RawValue>> {
        let mut users: Vec<Box<RawValue>> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for m in &self.list {
            if m.state == State::Waiting {
                continue;
            }
            if let Some(u) = &m.user
                && !seen.contains(&u.as_ref())
                && let Ok(raw) = RawValue::from_string(u.to_string())
            {
                seen.push(u);
                users.push(raw);
            }
        }
        users
    }

    // === the users batch ===

    /// When the gathered joins and leaves are due as a `users` message.
    pub fn users_due(&self) -> Option<Instant> {
        self.users_due
    }

    pub fn queue_joined(&mut self, user: Arc<str>, now: Instant) {
        if let Some(i) = self.pending_left.iter().position(|u| *u == user) {
            self.pending_left.remove(i);
        } else {
            self.pending_joined.push(user);
        }
        self.users_due.get_or_insert(now + USERS_INTERVAL);
    }

    pub fn queue_left(&mut self, user: Arc<str>, now: Instant) {
        if let Some(i) = self.pending_joined.iter().position(|u| *u == user) {
            self.pending_joined.remove(i);
        } else {
            self.pending_left.push(user);
        }
        self.users_due.get_or_insert(now + USERS_INTERVAL);
    }

    /// A member is active again: news held while nobody was (see [`Members::take_users`])
    /// becomes due.
    pub fn wake_users(&mut self, now: Instant) {
        if !(self.pending_joined.is_empty() && self.pending_left.is_empty()) {
            self.users_due.get_or_insert(now + USERS_INTERVAL);
        }
    }

    /// The gathered `users` payload to reflect now, if there is news and anyone to tell.
    pub fn take_users(&mut self) -> Option<String> {
        self.users_due = None;
        if self.pending_joined.is_empty() && self.pending_left.is_empty() {
            return None;
        }
        let active = self
            .list
            .iter()
            .filter(|m| m.state == State::Active && m.user.is_some())
            .count();
        if active == 0 {
            // Nobody to tell now. Members within their leave delay may come back (a view
            // whose first connection dropped right after its JOIN): keep the news for them,
            // sent when one is active again. With no member left at all, there is no one.
            if self
                .list
                .iter()
                .all(|m| m.user.is_none() || m.state == State::Waiting)
            {
                self.pending_joined.clear();
                self.pending_left.clear();
            }
            return None;
        }
        let total = self.count();
        let mut payload = format!("{{\"what\":\"users\",\"active\":{active},\"total\":{total}");
        for (key, list) in [
            ("joined", &self.pending_joined),
            ("left", &self.pending_left),
        ] {
            if !list.is_empty() {
                let _ = write!(payload, ",\"{key}\":[");
                for (i, u) in list.iter().enumerate() {
                    if i > 0 {
                        payload.push(',');
                    }
                    payload.push_str(u);
                }
                payload.push(']');
            }
        }
        payload.push('}');
        self.pending_joined.clear();
        self.pending_left.clear();
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox;

    fn u(s: &str) -> Option<Arc<str>> {
        Some(Arc::from(format!("\"{s}\"")))
    }

    /// An active member of user `s` on `conn`.
    fn active(m: &mut Members, conn: ConnId, s: &str, now: Instant) -> usize {
        let (out, _inbox) = outbox::pair(8);
        let i = m.add(conn, out, u(s));
        m.activate(i);
        m.queue_joined(u(s).expect("user"), now);
        i
    }

    fn users(m: &mut Members) -> Option<serde_json::Value> {
        m.take_users()
            .map(|p| serde_json::from_str(&p).expect("json"))
    }

    #[test]
    fn joins_are_batched_into_one_users_message() {
        let now = Instant::now();
        let mut m = Members::default();
        active(&mut m, 1, "a", now);
        active(&mut m, 2, "b", now + Duration::from_millis(50));
        assert_eq!(
            m.users_due(),
            Some(now + USERS_INTERVAL),
            "the first join sets the due time"
        );
        let msg = users(&mut m).expect("news");
        assert_eq!(msg["joined"], serde_json::json!(["a", "b"]));
        assert_eq!(
            (msg["active"].as_u64(), msg["total"].as_u64()),
            (Some(2), Some(2))
        );
        assert!(msg.get("left").is_none());
        assert_eq!(m.users_due(), None);
        assert!(users(&mut m).is_none(), "nothing new");
    }

    #[test]
    fn a_leave_and_a_join_of_the_same_user_cancel_out() {
        let now = Instant::now();
        let mut m = Members::default();
        let i = active(&mut m, 1, "a", now);
        active(&mut m, 2, "b", now);
        users(&mut m);
        assert_eq!(
            m.disconnect(i, Duration::ZERO, false, now),
            Disconnected::LeavesNow
        );
        m.remove(i, now);
        m.queue_joined(u("a").expect("user"), now);
        assert!(users(&mut m).is_none());
        // And the other way round, within one batch.
        m.queue_joined(u("c").expect("user"), now);
        m.queue_left(u("c").expect("user"), now);
        assert!(users(&mut m).is_none());
    }

    #[test]
    fn news_waits_while_nobody_is_active_and_is_dropped_when_nobody_is_left() {
        let now = Instant::now();
        let mut m = Members::default();
        let i = active(&mut m, 1, "a", now);
        // The only member is within its leave delay: keep the news for its return.
        assert_eq!(
            m.disconnect(i, Duration::from_secs(3), false, now),
            Disconnected::Kept
        );
        assert!(users(&mut m).is_none());
        assert_eq!(m.users_due(), None);
        let (out, _inbox) = outbox::pair(8);
        let back = m.admitted("\"a\"").expect("still a member");
        m.reconnect(back, 2, out);
        m.activate(back);
        m.wake_users(now);
        assert_eq!(
            users(&mut m).expect("held news")["joined"],
            serde_json::json!(["a"])
        );
        // With every member gone there is no one to tell, ever.
        m.disconnect(back, Duration::ZERO, false, now);
        m.remove(back, now);
        assert!(users(&mut m).is_none());
        m.wake_users(now);
        assert_eq!(m.users_due(), None, "the news was dropped");
    }

    #[test]
    fn state_transitions_on_disconnect() {
        let now = Instant::now();
        let delay = Duration::from_secs(2);
        let mut m = Members::default();
        let (out, _inbox) = outbox::pair(8);
        let waiting = m.add(1, out, u("w"));
        assert_eq!(m.count(), 0, "waiting views are not counted");
        assert_eq!(
            m.disconnect(waiting, delay, false, now),
            Disconnected::Dropped
        );
        assert!(m.is_empty());

        let i = active(&mut m, 2, "a", now);
        assert!(m.is_active_conn(2));
        assert_eq!(m.disconnect(i, delay, false, now), Disconnected::Kept);
        assert_eq!(m.get(i).state, State::Leaving(now + delay));
        assert!(!m.has_connections());
        assert_eq!(m.next_expiry(), Some(now + delay));
        assert_eq!(
            m.next_expired(0, now + delay - Duration::from_millis(1)),
            None
        );
        assert_eq!(m.next_expired(0, now + delay), Some(i));

        let d = active(&mut m, 3, "d", now);
        assert_eq!(m.disconnect(d, delay, true, now), Disconnected::Kept);
        assert_eq!(m.get(d).state, State::Closing);
        assert_eq!(
            m.admitted("\"d\""),
            None,
            "a drained member is not taken over"
        );
        assert_eq!(m.count(), 2);
    }

    #[test]
    fn ghosts_are_claimed_by_their_user_and_drain_closes_the_rest() {
        let now = Instant::now();
        let mut m = Members::default();
        m.add_ghost(u("g").expect("user"), now + Duration::from_secs(10));
        assert_eq!(m.count(), 1);
        assert!(!m.any_active());
        let i = m.admitted("\"g\"").expect("ghost");
        let (out, mut inbox) = outbox::pair(8);
        m.reconnect(i, 7, out);
        m.activate(i);
        assert_eq!(m.by_conn(7), Some(i));
        assert_eq!(m.active_count(), 1);
        assert!(users(&mut m).is_none(), "a claimed ghost is no news");
        m.close_for_drain("reflector draining, reconnect");
        assert_eq!(m.get(i).state, State::Closing);
        assert!(m.outbox_of(7).is_none());
        assert!(matches!(inbox.try_recv(), Some(outbox::Out::Close(_))));
    }

    #[test]
    fn stored_users_are_unique_and_skip_waiting_views() {
        let now = Instant::now();
        let mut m = Members::default();
        active(&mut m, 1, "a", now);
        active(&mut m, 2, "a", now);
        let (out, _inbox) = outbox::pair(8);
        m.add(3, out, u("w"));
        let stored: Vec<String> = m
            .stored_users()
            .iter()
            .map(|r| r.get().to_owned())
            .collect();
        assert_eq!(stored, ["\"a\""]);
    }
}
