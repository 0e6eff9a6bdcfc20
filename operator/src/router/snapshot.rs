//! What the router knows of the fleet at one moment, as plain data: every published plan
//! (pools, Sessions, reflectors, shards) with the users the reflectors report now. The
//! fleet view reads it ([`Router::snapshot`]) and is woken by [`Router::changes`], so it
//! shows the operator's fleet without a second copy of the router's state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use foldhash::HashSet as FastSet;

use refleet_core::planner::{
    ObservedReflector, PoolInput, SessionInput, ShardRecord, split_session_key,
};
use tokio::sync::watch;

use super::view::Published;
use super::{Router, SessionDef, lock};

/// What a reflector's report stream says now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Users on all its shards.
    pub users: u32,
    /// It reports draining.
    pub draining: bool,
}

/// The router's fleet at one moment, every published view merged.
#[derive(Clone, Debug, Default)]
pub struct FleetSnapshot {
    /// Every published pool.
    pub pools: Vec<PoolInput>,
    /// Every concrete session of those pools.
    pub sessions: Vec<SessionInput>,
    /// The Session objects (for the pools' files URLs).
    pub defs: Vec<SessionDef>,
    /// Every reflector the plans know.
    pub reflectors: Vec<ObservedReflector>,
    /// Public URL of each reflector that has one.
    pub urls: HashMap<String, String>,
    /// Each region's gateway URL, for pools whose gateway is on.
    pub gateways: HashMap<String, String>,
    /// Every shard, including those this router opened that no plan holds yet; `users` is
    /// what live reflectors report now, else what the plan had.
    pub shards: Vec<ShardRecord>,
    /// Reflectors whose report stream counts (not silent past the grace period).
    pub reported: BTreeMap<String, Reported>,
}

impl Router {
    /// The fleet as this router knows it now. Under the router's lock it only takes the
    /// published views (shared, not copied), the shards opened since and the reported
    /// users per shard; the copying happens after, so Routes do not wait for it.
    pub fn snapshot(&self) -> FleetSnapshot {
        let now = self.now();
        let (views, opened, users, reported) = {
            let mut inner = lock(&self.inner);
            self.expire_reports(&mut inner.fleet, now);
            let views: Vec<Arc<Published>> = inner.fleet.published_shared().collect();
            let planned: FastSet<(&str, &str)> = views
                .iter()
                .flat_map(|v| v.fleet.input.shards.iter())
                .map(|s| (s.session.as_str(), s.name.as_str()))
                .collect();
            let opened: Vec<ShardRecord> = inner
                .opened
                .iter()
                .filter(|o| !planned.contains(&(o.session.as_str(), o.name.as_str())))
                .cloned()
                .collect();
            drop(planned);
            let users: Vec<Option<u32>> = views
                .iter()
                .flat_map(|v| v.fleet.input.shards.iter())
                .chain(&opened)
                .map(|sh| {
                    let (_, app, _) = split_session_key(&sh.session)?;
                    inner.fleet.users(app, &sh.name)
                })
                .collect();
            let reported = inner
                .fleet
                .reported()
                .map(|(name, users, draining)| (name.to_owned(), Reported { users, draining }))
                .collect();
            (views, opened, users, reported)
        };
        let mut snap = FleetSnapshot {
            reported,
            ..FleetSnapshot::default()
        };
        for view in &views {
            let f = &view.fleet;
            snap.pools.extend(f.input.pools.iter().cloned());
            snap.sessions.extend(f.input.sessions.iter().cloned());
            snap.defs.extend(f.sessions.iter().cloned());
            snap.reflectors.extend(f.input.reflectors.iter().cloned());
            snap.urls
                .extend(f.urls.iter().map(|(k, v)| (k.clone(), v.clone())));
            snap.gateways
                .extend(f.gateways.iter().map(|(k, v)| (k.clone(), v.clone())));
            snap.shards.extend(f.input.shards.iter().cloned());
        }
        snap.shards.extend(opened);
        for (sh, n) in snap.shards.iter_mut().zip(users) {
            if let Some(n) = n {
                sh.users = n;
            }
        }
        snap
    }

    /// Ticks whenever a plan is published or a reflector reports: when [`Router::snapshot`]
    /// may have changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
