//! The Routes waiting for a shard, by session, so that a change wakes the Routes it may
//! answer and no others.
//!
//! A Route waits while its session's next shard is opening. A reflector's report can only
//! change what happens on that reflector, yet every report that freed room used to wake
//! every waiting Route: with ~3 000 Routes waiting (16 client connections of 200 calls each)
//! and thousands of reports a second, the leader spent its core retrying them and failed
//! the ramp it met with one connection (docs/scale.md, run H's A/B). Now a report wakes the
//! sessions with a shard on its reflector; a published plan, or a reflector heard again
//! while a new leader catches up, still wakes them all (`Router::routable`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use foldhash::HashMap as FastMap;
use prometheus::IntGauge;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// The sessions some Route waits for, each with the signal that wakes its Routes.
pub(super) struct Waits {
    sessions: Mutex<FastMap<String, Arc<Notify>>>,
    /// Routes waiting now (`refleet_router_waiting_routes`), read without the lock: nearly
    /// every report finds none.
    waiting: IntGauge,
}

/// One Route's place among the waiting ones; leaves on drop.
pub(super) struct Waiting<'a> {
    waits: &'a Waits,
    session: String,
    notify: Arc<Notify>,
}

impl Waits {
    /// No Route waiting; `waiting` counts them from now on.
    pub(super) fn new(waiting: IntGauge) -> Self {
        waiting.set(0);
        Self {
            sessions: Mutex::default(),
            waiting,
        }
    }

    fn sessions(&self) -> MutexGuard<'_, FastMap<String, Arc<Notify>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a Route as waiting for session `session` (a session key).
    pub(super) fn enter(&self, session: &str) -> Waiting<'_> {
        let notify = self
            .sessions()
            .entry(session.to_owned())
            .or_default()
            .clone();
        self.waiting.inc();
        Waiting {
            waits: self,
            session: session.to_owned(),
            notify,
        }
    }

    /// Routes waiting now.
    pub(super) fn count(&self) -> i64 {
        self.waiting.get()
    }

    /// Wakes the Routes waiting for any of `sessions` (keys may repeat); says how many
    /// sessions had some.
    pub(super) fn wake<'k>(&self, sessions: impl IntoIterator<Item = &'k str>) -> usize {
        if self.count() <= 0 {
            return 0;
        }
        let map = self.sessions();
        let mut woken = 0;
        for key in sessions {
            if let Some(n) = map.get(key) {
                n.notify_waiters();
                woken += 1;
            }
        }
        woken
    }
}

impl Waiting<'_> {
    /// The session waited for.
    pub(super) fn session(&self) -> &str {
        &self.session
    }

    /// A future that ends at the next wake of this session. Wakes from the moment it is
    /// created count, so create it before the attempt whose failure it then waits out.
    pub(super) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.waits.waiting.dec();
        let mut map = self.waits.sessions();
        // Every clone is taken under this lock: two owners left are the map and this Route.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.session);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn waits() -> Waits {
        Waits::new(IntGauge::new("waiting", "Routes waiting").unwrap())
    }

    fn ready(f: std::pin::Pin<&mut Notified<'_>>) -> bool {
        matches!(
            f.poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }

    #[test]
    fn a_wake_reaches_the_routes_of_its_sessions_only() {
        let waits = waits();
        let a = waits.enter("ns/app/a");
        let a2 = waits.enter("ns/app/a");
        let b = waits.enter("ns/app/b");
        let (mut fa, mut fa2, mut fb) =
            (pin!(a.notified()), pin!(a2.notified()), pin!(b.notified()));
        assert!(!ready(fa.as_mut()) && !ready(fb.as_mut()));
        assert_eq!(waits.wake(["ns/app/a", "ns/app/a", "ns/app/c"]), 2);
        assert!(ready(fa.as_mut()));
        assert!(ready(fa2.as_mut()));
        assert!(!ready(fb.as_mut()), "b was not named");
        assert_eq!(waits.count(), 3);
    }

    #[test]
    fn a_wake_between_creating_the_future_and_polling_it_is_not_lost() {
        let waits = waits();
        let a = waits.enter("s");
        let f = a.notified();
        waits.wake(["s"]);
        let mut f = pin!(f);
        assert!(ready(f.as_mut()));
    }

    #[test]
    fn a_session_is_forgotten_when_its_last_route_leaves() {
        let waits = waits();
        let a = waits.enter("s");
        let b = waits.enter("s");
        drop(a);
        assert_eq!(waits.sessions().len(), 1, "b still waits");
        drop(b);
        assert!(waits.sessions().is_empty());
        assert_eq!(waits.count(), 0);
        assert_eq!(waits.wake(["s"]), 0);
        // Entering again after the last left gets a fresh signal that still works.
        let c = waits.enter("s");
        let mut f = pin!(c.notified());
        assert_eq!(waits.wake(["s"]), 1);
        assert!(ready(f.as_mut()));
    }
}
