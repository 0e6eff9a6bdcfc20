//! # The live fleet view
//!
//! A read-only HTML page at the root of `refleet up` and of the operator's router port:
//! regions → reflectors → shards, charts of users per region and of the Route rate, and the
//! recent events, kept up to date over Server-Sent Events.
//!
//! ```text
//!   Status (refleet up: its fleet loop; operator: status::from_router(router.snapshot()))
//!        │ Hub::update — on every change of the fleet
//!        ▼
//!   [Hub] events::diff → recent events, history::sample → chart data
//!        │ watch channel: the latest Snapshot only, so a slow reader skips to the newest
//!        ▼
//!   http: GET /             the page, rendered on the server (works without JavaScript)
//!         GET /view/events  SSE: the same fragments on every change (assets/index.js)
//! ```
//!
//! - [`status`]: the status both backends publish (`GET /v1/status` in `refleet up`).
//! - [`events`]: events told apart by comparing two statuses.
//! - [`history`]: the samples behind the charts.
//! - [`render`]: the HTML (every name escaped).
//! - [`http`]: the routes, the access gate and the bounded event stream.

pub mod events;
pub mod history;
pub mod http;
pub mod render;
pub mod status;

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use self::events::Event;
use self::history::{History, Sample};
use self::status::Status;
use crate::router::Router;

/// What the view shows at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The fleet.
    pub status: Status,
    /// Recent events, oldest first.
    pub events: Vec<Event>,
    /// Chart samples, oldest first.
    pub history: Vec<Sample>,
}

impl Snapshot {
    /// What a reader allowed only `app` sees (`None`: everything): that app's shards and
    /// shard events; reflectors and regions stay, their shard lists cut to that app's.
    pub fn visible_to(&self, app: Option<&str>) -> Snapshot {
        let Some(app) = app else {
            return self.clone();
        };
        let mut snap = self.clone();
        snap.status.shards.retain(|s| s.app_id == app);
        let names: Vec<&str> = snap.status.shards.iter().map(|s| s.name.as_str()).collect();
        let mut regions = snap.status.regions.clone();
        for r in regions.iter_mut().flat_map(|r| r.reflectors.iter_mut()) {
            r.shards.retain(|s| names.contains(&s.as_str()));
        }
        snap.status.regions = regions;
        snap.status.decisions.clear();
        snap.events
            .retain(|e| e.app.as_deref().is_none_or(|a| a == app));
        snap
    }
}

/// What the fleet loop or the router feeds, and what every reader of the view follows.
#[derive(Debug)]
pub struct Hub {
    tracked: Mutex<Tracked>,
    latest: watch::Sender<Arc<Snapshot>>,
    closed: watch::Sender<bool>,
    /// Event streams open now (bounded by [`http::MAX_STREAMS`]).
    streams: AtomicUsize,
    /// The program serving the view, in the page's title.
    title: &'static str,
}

#[derive(Debug, Default)]
struct Tracked {
    status: Status,
    events: VecDeque<Event>,
    history: History,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Hub {
    /// An empty view served by `title` (`refleet up`, `refleet operator`).
    pub fn new(title: &'static str) -> Arc<Self> {
        Arc::new(Self {
            tracked: Mutex::default(),
            latest: watch::channel(Arc::default()).0,
            closed: watch::channel(false).0,
            streams: AtomicUsize::new(0),
            title,
        })
    }

    /// Takes the fleet's status now and the Route counter (it only grows); readers are sent
    /// a new snapshot when the status changed or a chart sample was due.
    pub fn update(&self, status: Status, routes_total: u64) -> bool {
        self.update_at(status, routes_total, unix_ms())
    }

    /// [`Hub::update`] at `at_ms` (Unix milliseconds).
    pub fn update_at(&self, status: Status, routes_total: u64, at_ms: u64) -> bool {
        let mut t = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sampled = t.history.sample(&status, routes_total, at_ms);
        if !sampled && status == t.status {
            return false;
        }
        let happened = events::diff(&t.status, &status, at_ms);
        if !happened.is_empty() {
            tracing::debug!(events = happened.len(), "fleet view: fleet changed");
        }
        events::keep(&mut t.events, happened);
        t.status = status;
        let snap = Snapshot {
            status: t.status.clone(),
            events: t.events.iter().cloned().collect(),
            history: t.history.samples().cloned().collect(),
        };
        drop(t);
        self.latest.send_replace(Arc::new(snap));
        true
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.borrow().clone()
    }

    /// Ends every event stream (shutdown: a server waiting for its connections to finish
    /// would otherwise wait for the readers to leave).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Event streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// How long the operator's view waits after a change for more (reports arrive one
/// reflector at a time) before it builds a snapshot.
const SETTLE: Duration = Duration::from_millis(250);

/// After a snapshot that took `cost` to build, how long the view rests before the next:
/// nine times the cost, so that building snapshots takes at most a tenth of a core however
/// large the fleet, and at most [`MAX_REST`], so the view never lags far behind.
fn rest_after(cost: Duration) -> Duration {
    cost.saturating_mul(9).min(MAX_REST)
}

/// The longest rest between two snapshots of a large fleet.
const MAX_REST: Duration = Duration::from_secs(10);

/// Feeds `hub` from the operator's router until `stop`, then closes it: a snapshot after
/// every published plan or report (at most one per `SETTLE`), and one per chart sample,
/// each followed by a rest in proportion to its cost ([`rest_after`]). Snapshots are built
/// on a blocking thread: for thousands of shards they take milliseconds of CPU, which Routes
/// on the async workers must not wait for.
pub async fn follow_router(
    hub: Arc<Hub>,
    router: Arc<Router>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut changes = router.changes();
    let mut tick = tokio::time::interval(Duration::from_millis(history::EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(SETTLE) => {}
                }
                changes.mark_unchanged();
            }
        }
        let started = std::time::Instant::now();
        let (h, r) = (hub.clone(), router.clone());
        let built = tokio::task::spawn_blocking(move || {
            h.update(status::from_router(&r.snapshot()), r.metrics.routes_total());
        });
        if built.await.is_err() {
            tracing::error!("building the fleet view's snapshot failed; the view stops here");
            break;
        }
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(rest_after(started.elapsed())) => {}
        }
    }
    hub.close();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_view_rests_nine_times_what_a_snapshot_cost_and_at_most_ten_seconds() {
        assert_eq!(rest_after(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            rest_after(Duration::from_millis(20)),
            Duration::from_millis(180)
        );
        assert_eq!(rest_after(Duration::from_secs(5)), MAX_REST);
    }
    use crate::crd::ShardPhase;
    use crate::view::status::ShardView;

    fn shard(name: &str, app: &str) -> ShardView {
        ShardView {
            namespace: "default".into(),
            session: name.into(),
            app_id: app.into(),
            session_name: name.into(),
            name: name.into(),
            index: 0,
            region: "a".into(),
            reflector: Some("a-1".into()),
            url: None,
            files_url: None,
            users: 1,
            max_users: 10,
            threshold_users: 8,
            phase: ShardPhase::Open,
        }
    }

    fn status(users: u32) -> Status {
        Status {
            shards: vec![shard("mine", "io.mine"), shard("theirs", "io.theirs")],
            ..crate::view::status::one_reflector(users, &["mine", "theirs"])
        }
    }

    #[test]
    fn readers_get_a_snapshot_only_when_something_changed() {
        let hub = Hub::new("test");
        let mut rx = hub.latest.subscribe();
        assert!(hub.update_at(status(1), 0, 10_000));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(
            !hub.update_at(status(1), 0, 10_500),
            "same status, no sample due"
        );
        assert!(!rx.has_changed().unwrap());
        assert!(hub.update_at(status(2), 0, 11_000), "users changed");
        assert!(
            hub.update_at(status(2), 4, 13_000),
            "a chart sample was due"
        );
        let snap = hub.latest();
        assert_eq!(snap.history.len(), 2);
        assert_eq!(snap.status.regions[0].reflectors[0].users, 2);
        assert_eq!(
            snap.events.len(),
            3,
            "a-1 started, two shards opened: {:?}",
            snap.events
        );
    }

    #[test]
    fn a_reader_of_one_app_sees_only_its_shards() {
        let hub = Hub::new("test");
        hub.update_at(status(2), 0, 1);
        let all = hub.latest();
        let mine = all.visible_to(Some("io.mine"));
        assert_eq!(mine.status.shards.len(), 1);
        assert_eq!(mine.status.shards[0].name, "mine");
        assert_eq!(mine.status.regions[0].reflectors[0].shards, ["mine"]);
        assert!(mine.events.iter().all(|e| !e.text.contains("theirs")));
        assert!(mine.events.iter().any(|e| e.text.contains("reflector a-1")));
        assert_eq!(all.visible_to(None), *all);
    }
}
