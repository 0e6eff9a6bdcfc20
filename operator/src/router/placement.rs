//! # Placement: which reflector hosts a shard now
//!
//! The one place the gateway (and anything else that connects clients to a shard's host)
//! learns where a shard lives. It reads the router's published view and nothing else: a
//! shard's host is its published record's `reflector`, the reflector's address is the URL
//! its backend assigned ([`super::FleetView::urls`]). A live move lands by the backend
//! rewriting that record (new `reflector`, `moving_to` cleared) and publishing, so the
//! next lookup after a move answers the new host without this module knowing about moves.
//!
//! Readers resolve a shard at each new connection, never once per session: a client that
//! reconnects after a move reaches the new host. Readers that keep a copy (the gateway's
//! table in another process) refresh it when [`Router::placement_changed`] ticks: every
//! publish, every reflector whose reports expire or resume, and whatever else calls
//! `Router::bump_placement`.

use std::collections::BTreeMap;

use tokio::sync::watch;

use super::{Router, lock};
use crate::crd::ShardPhase;
use refleet_core::planner::{ReflectorState, ShardRecord, split_session_key};

/// Where a shard is hosted now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The hosting reflector's name.
    pub reflector: String,
    /// Its base URL as the backend assigned it (`http://host:port/` locally).
    pub url: String,
    /// The shard's region.
    pub region: String,
}

/// Why a shard cannot be connected to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No published shard of that app has that name.
    #[error("no such shard")]
    Unknown,
    /// The shard waits for a reflector, or its reflector is starting, has no address yet
    /// or went silent on its report stream.
    #[error("the shard's reflector is not ready")]
    NotReady,
    /// The shard is being handed to another reflector; retry shortly.
    #[error("the shard is moving to another reflector")]
    Moving,
}

impl PlacementError {
    /// A short label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unknown => "not_found",
            Self::NotReady => "not_ready",
            Self::Moving => "moving",
        }
    }
}

/// A shard's placement or why it has none; what a table entry holds.
pub type Resolved = Result<Placement, PlacementError>;

impl Router {
    /// Where shard `shard` of app `app_id` is hosted now.
    pub fn placement(&self, app_id: &str, shard: &str) -> Resolved {
        let now = self.now();
        let grace = self.grace();
        let inner = lock(&self.inner);
        let published = inner.fleet.published().find_map(|view| {
            view.shards_named(shard)
                .find(|sh| app_of(sh) == Some(app_id))
                .map(|sh| (Some(view), sh))
        });
        // A shard this router opened between two plans is hosted on a reflector some
        // published view knows (the Route that opened it answered only once it was ready).
        let (view, sh) = published
            .or_else(|| {
                inner
                    .opened
                    .named(shard)
                    .find(|s| app_of(s) == Some(app_id))
                    .map(|sh| {
                        let view = sh.reflector.as_deref().and_then(|r| {
                            inner.fleet.published().find(|v| v.reflector(r).is_some())
                        });
                        (view, sh)
                    })
            })
            .ok_or(PlacementError::Unknown)?;
        resolve(sh, |r| {
            let view = view?;
            let observed = view.reflector(r)?;
            // Draining reflectors still host their live shards (they refuse only new
            // sessions themselves), so their returning clients must reach them.
            if observed.state == ReflectorState::Starting || inner.fleet.silent(r, now, grace) {
                return None;
            }
            view.fleet.urls.get(r).cloned()
        })
    }

    /// Every published shard's placement, by `(app id, shard)`: what a gateway's table holds.
    pub fn placements(&self) -> BTreeMap<(String, String), Resolved> {
        let now = self.now();
        let grace = self.grace();
        let inner = lock(&self.inner);
        let mut out = BTreeMap::new();
        for view in inner.fleet.published() {
            for sh in &view.fleet.input.shards {
                let Some(app) = app_of(sh) else { continue };
                let resolved = resolve(sh, |r| {
                    let observed = view.reflector(r)?;
                    if observed.state == ReflectorState::Starting
                        || inner.fleet.silent(r, now, grace)
                    {
                        return None;
                    }
                    view.fleet.urls.get(r).cloned()
                });
                out.insert((app.to_owned(), sh.name.clone()), resolved);
            }
        }
        out
    }

    /// A receiver that ticks whenever a placement may have changed.
    pub fn placement_changed(&self) -> watch::Receiver<u64> {
        self.placement.subscribe()
    }

    /// Tells placement readers to look again (after anything that changes where a shard is
    /// hosted, e.g. a landed move).
    pub(crate) fn bump_placement(&self) {
        self.placement.send_modify(|g| *g = g.wrapping_add(1));
    }
}

fn app_of(sh: &ShardRecord) -> Option<&str> {
    split_session_key(&sh.session).map(|(_, app, _)| app)
}

/// A shard's placement given how to find a ready reflector's URL (`None`: not ready).
fn resolve(sh: &ShardRecord, ready_url: impl FnOnce(&str) -> Option<String>) -> Resolved {
    if sh.phase == ShardPhase::Moving || sh.moving_to.is_some() {
        return Err(PlacementError::Moving);
    }
    let reflector = sh.reflector.as_deref().ok_or(PlacementError::NotReady)?;
    let url = ready_url(reflector).ok_or(PlacementError::NotReady)?;
    Ok(Placement {
        reflector: reflector.to_owned(),
        url,
        region: sh.region.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::router::metrics::RouterMetrics;
    use crate::router::view::tests::{reflector, shard};
    use crate::router::{FleetView, RouterConfig};
    use refleet_api::report::ReflectorReport;
    use refleet_core::planner::PlanInput;

    fn router() -> std::sync::Arc<Router> {
        Router::new(
            RouterConfig {
                report_grace: std::time::Duration::from_millis(500),
                ..RouterConfig::default()
            },
            None,
            RouterMetrics::new(&prometheus::Registry::new()),
        )
    }

    fn view(shards: Vec<ShardRecord>) -> FleetView {
        FleetView {
            input: PlanInput {
                shards,
                reflectors: vec![
                    reflector("r1", ReflectorState::Ready),
                    reflector("r2", ReflectorState::Starting),
                    reflector("r3", ReflectorState::Draining),
                ],
                ..PlanInput::default()
            },
            sessions: vec![],
            urls: HashMap::from([
                ("r1".into(), "http://r1/".into()),
                ("r3".into(), "http://r3/".into()),
            ]),
            ..FleetView::default()
        }
    }

    #[test]
    fn a_shard_resolves_to_its_published_reflector_url() {
        let r = router();
        let changed = r.placement_changed();
        r.publish(
            "local",
            view(vec![shard("a", 0, "r1"), shard("b", 0, "r3")]),
        );
        assert!(changed.has_changed().unwrap(), "a publish ticks");
        let p = r.placement("app", "a").unwrap();
        assert_eq!(
            (p.reflector.as_str(), p.url.as_str(), p.region.as_str()),
            ("r1", "http://r1/", "eu")
        );
        assert_eq!(
            r.placement("app", "b").unwrap().url,
            "http://r3/",
            "draining still hosts"
        );
        assert_eq!(r.placement("other", "a"), Err(PlacementError::Unknown));
        assert_eq!(r.placement("app", "zz"), Err(PlacementError::Unknown));
        assert_eq!(r.placements().len(), 2);
    }

    #[test]
    fn starting_unplaced_and_moving_shards_are_not_connectable() {
        let r = router();
        let mut pending = shard("p", 0, "r1");
        pending.reflector = None;
        pending.phase = ShardPhase::Pending;
        let mut moving = shard("m", 0, "r1");
        moving.moving_to = Some("r3".into());
        moving.phase = ShardPhase::Moving;
        r.publish(
            "local",
            view(vec![
                shard("s", 0, "r2"),
                pending,
                moving,
                shard("x", 0, "gone"),
            ]),
        );
        assert_eq!(r.placement("app", "s"), Err(PlacementError::NotReady));
        assert_eq!(r.placement("app", "p"), Err(PlacementError::NotReady));
        assert_eq!(r.placement("app", "m"), Err(PlacementError::Moving));
        assert_eq!(r.placement("app", "x"), Err(PlacementError::NotReady));
    }

    #[test]
    fn a_landed_move_answers_the_new_host_at_the_next_lookup() {
        let r = router();
        let mut moving = shard("a", 0, "r3");
        moving.moving_to = Some("r1".into());
        r.publish("local", view(vec![moving]));
        assert_eq!(r.placement("app", "a"), Err(PlacementError::Moving));
        let changed = r.placement_changed();
        r.publish("local", view(vec![shard("a", 0, "r1")]));
        assert!(changed.has_changed().unwrap());
        assert_eq!(r.placement("app", "a").unwrap().reflector, "r1");
    }

    #[test]
    fn a_silent_reflector_is_not_ready_and_its_return_ticks() {
        let r = router();
        r.publish("local", view(vec![shard("a", 0, "r1")]));
        let report = ReflectorReport {
            reflector: "r1".into(),
            region: "eu".into(),
            ..ReflectorReport::default()
        };
        let mut changed = r.placement_changed();
        r.observe_report(&report);
        assert!(changed.has_changed().unwrap(), "a first report ticks");
        changed.mark_unchanged();
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert_eq!(r.placement("app", "a"), Err(PlacementError::NotReady));
        r.observe_report(&report);
        assert!(changed.has_changed().unwrap(), "it came back");
        assert!(r.placement("app", "a").is_ok());
        changed.mark_unchanged();
        r.observe_report(&report);
        assert!(
            !changed.has_changed().unwrap(),
            "a routine report does not tick"
        );
    }
}
