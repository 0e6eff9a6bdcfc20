//! What the controllers read: watch caches of ReflectorPools, Sessions, reflector pods and
//! their per-pod Services.
//!
//! ```text
//!   watch pools ────┐             ┌─> Store<ReflectorPool> ─┐
//!   watch sessions  ├─ drivers ───┼─> Store<Session> ───────┼─> sync() reads (no request)
//!   watch pods      │ (own tasks) ├─> Store<Pod> ───────────┤
//!   watch services ─┘             └─> Store<Service> ───────┘
//!                      └─ shared event streams ─> the two Controllers (triggers)
//! ```
//!
//! A sync used to GET its pool and LIST the namespace's Sessions and the pool's pods (and
//! Services, with `perPodService`) on every run; at thousands of Sessions that is the bulk
//! of the operator's traffic and of the apiserver's work. Now one watch per kind fills a
//! store, and a sync only writes.
//!
//! Each watch is driven by a task of its own, never by a controller: a controller that stops
//! polling its trigger (busy, shutting down, waiting for another store) must not freeze what
//! every sync reads. The drivers feed the controllers through kube's shared streams.
//!
//! A store lags the apiserver by a moment. Every write tolerates that: new pod names come
//! from the lowest index the cache does not hold (a server-side apply of an existing name
//! changes nothing), deleting a pod that is gone is success, statuses are server-side
//! applied. A store is read only once it has completed its first list ([`Cache::ready`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::warn;

use super::pod::LABEL_POOL;
use super::{Error, Result};
use crate::crd::{ReflectorPool, Session};

/// The first and the longest wait before a failed watch retries. kube's default grows to
/// 30 s; a sync reads nothing but these caches, so after an apiserver outage they must be
/// back within seconds, and four watches retrying every few seconds cost the apiserver
/// nothing.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LONGEST: Duration = Duration::from_secs(4);

/// Retry delays of a failed watch: exponential from [`RETRY_FIRST`] to [`RETRY_LONGEST`],
/// with jitter, starting over once a retry succeeds (kube's [`Backoff`] resets it).
struct Retry {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
}

impl Retry {
    fn new() -> Self {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(RETRY_FIRST)
            .with_max_delay(RETRY_LONGEST)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: backon::BackoffBuilder::build(builder),
            builder,
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.delays.next()
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.delays = backon::BackoffBuilder::build(self.builder);
    }
}

/// How many object references a shared stream buffers for a slow subscriber before the
/// watch waits for it.
const SHARED_BUFFER: usize = 1024;

/// One kind's store and whether it has completed a list.
#[derive(Clone)]
struct Kind<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    listed: watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Kind<K> {
    /// Waits for the first complete list; fails once the watch behind it has stopped.
    ///
    /// Not `Store::wait_until_ready`: in kube-runtime 5.0.0 its one-shot wake reaches only the
    /// last of several waiters, and each controller's runner is already one of them.
    async fn listed(&self) -> Result<()> {
        let mut listed = self.listed.clone();
        match listed.wait_for(|l| *l).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::CacheClosed),
        }
    }
}

/// The controllers' read side: one store per watched kind.
#[derive(Clone)]
pub struct Cache {
    pools: Kind<ReflectorPool>,
    sessions: Kind<Session>,
    pods: Kind<Pod>,
    services: Kind<Service>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("pools", &self.pools.store.len())
            .field("sessions", &self.sessions.store.len())
            .field("pods", &self.pods.store.len())
            .field("services", &self.services.store.len())
            .finish()
    }
}

/// The running watches behind a [`Cache`] and the streams that trigger the controllers.
/// Dropping it stops the watches (the cache then stays as it was, and waiting for a first
/// list fails with [`Error::CacheClosed`]).
pub struct Watches {
    /// Every ReflectorPool as it changes.
    pub pools: ReflectHandle<ReflectorPool>,
    /// Every Session as it changes.
    pub sessions: ReflectHandle<Session>,
    /// Every reflector pod as it changes.
    pub pods: ReflectHandle<Pod>,
    /// The pool store, for the pool controller.
    pub pool_store: Store<ReflectorPool>,
    /// The Session store, for the Session controller.
    pub session_store: Store<Session>,
    /// The tasks that drive the watches (dropping them stops the watches).
    pub drivers: Vec<AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches")
            .field("drivers", &self.drivers.len())
            .finish_non_exhaustive()
    }
}

/// Starts a watch of `api` into a shared store; returns the store, its listed flag, a
/// subscription and the task that drives it.
fn start<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
) -> (Kind<K>, ReflectHandle<K>, AbortOnDropHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let writer = reflector::store::Writer::<K>::new_shared(SHARED_BUFFER, ());
    let store = writer.as_reader();
    let Some(subscription) = writer.subscribe() else {
        unreachable!("a shared writer always has subscriptions");
    };
    let (listed_tx, listed) = watch::channel(false);
    // Managed fields are the largest part of most objects and nothing here reads them.
    let events = watcher(api, config)
        .modify(|o| o.managed_fields_mut().clear())
        .backoff(Retry::new());
    let driver = drive(reflector::reflector(writer, events), listed_tx, kind);
    let driver = AbortOnDropHandle::new(tokio::spawn(driver));
    (Kind { store, listed }, subscription, driver)
}

/// Polls a reflector stream for as long as it runs: raises `listed` at each completed list,
/// logs errors (the stream's backoff paces the retries).
async fn drive<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    listed: watch::Sender<bool>,
    kind: &'static str,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                listed.send_replace(true);
            }
            Ok(_) => {}
            Err(error) => warn!(%error, kind, "watch failed; retrying with backoff"),
        }
    }
}

impl Cache {
    /// Starts watching `pools`, `sessions`, and the reflector pods among `pods` and their
    /// Services among `services` (those with the pool label).
    pub fn watch(
        pools: Api<ReflectorPool>,
        sessions: Api<Session>,
        pods: Api<Pod>,
        services: Api<Service>,
    ) -> (Self, Watches) {
        let (pools, pool_events, pool_driver) =
            start(pools, watcher::Config::default(), "ReflectorPool");
        let (sessions, session_events, session_driver) =
            start(sessions, watcher::Config::default(), "Session");
        let (pods, pod_events, pod_driver) =
            start(pods, watcher::Config::default().labels(LABEL_POOL), "Pod");
        // Nothing subscribes to Service changes: a sync re-applies a missing one.
        let (services, _, service_driver) = start(
            services,
            watcher::Config::default().labels(LABEL_POOL),
            "Service",
        );
        let watches = Watches {
            pools: pool_events,
            sessions: session_events,
            pods: pod_events,
            pool_store: pools.store.clone(),
            session_store: sessions.store.clone(),
            drivers: vec![pool_driver, session_driver, pod_driver, service_driver],
        };
        (
            Self {
                pools,
                sessions,
                pods,
                services,
            },
            watches,
        )
    }

    /// A cache holding exactly these objects, already listed (tests: the exact request
    /// sequences of a sync without any read).
    pub fn of(pools: Vec<ReflectorPool>, sessions: Vec<Session>, pods: Vec<Pod>) -> Self {
        Self {
            pools: filled(pools),
            sessions: filled(sessions),
            pods: filled(pods),
            services: filled(Vec::new()),
        }
    }

    /// A cache whose watches stopped before their first list (tests).
    pub fn closed() -> Self {
        Self {
            pools: unlisted(),
            sessions: unlisted(),
            pods: unlisted(),
            services: unlisted(),
        }
    }

    /// Waits until every store has completed its first list.
    pub async fn ready(&self) -> Result<()> {
        self.pools.listed().await?;
        self.sessions.listed().await?;
        self.pods.listed().await?;
        self.services.listed().await
    }

    /// Pool `name` of `namespace`.
    pub fn pool(&self, namespace: &str, name: &str) -> Option<ReflectorPool> {
        self.pools
            .store
            .get(&ObjectRef::new(name).within(namespace))
            .map(|p| (*p).clone())
    }

    /// The Sessions of `namespace` that name pool `pool`, by name.
    pub fn sessions_of(&self, namespace: &str, pool: &str) -> Vec<Session> {
        select(&self.sessions.store, namespace, |s| {
            s.spec.pool_ref.name == pool
        })
    }

    /// The reflector pods of pool `pool` in `namespace`, by name.
    pub fn pods_of(&self, namespace: &str, pool: &str) -> Vec<Arc<Pod>> {
        // Shared, not copied: a pool's pods are read by every sync, and copying ~2 000 of
        // them was 7 % of the leader's samples (docs/scale.md, "Ramps").
        select_shared(&self.pods.store, namespace, |p| labelled(p, pool))
    }

    /// The per-pod Services of pool `pool` in `namespace`, by name.
    pub fn services_of(&self, namespace: &str, pool: &str) -> Vec<Service> {
        select(&self.services.store, namespace, |s| labelled(s, pool))
    }
}

/// Whether `object` carries pool `pool`'s label.
fn labelled(object: &impl ResourceExt, pool: &str) -> bool {
    object.labels().get(LABEL_POOL).map(String::as_str) == Some(pool)
}

/// The objects of `store` in `namespace` that `keep`, by name.
fn select<K: Resource<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
    namespace: &str,
    keep: impl Fn(&K) -> bool,
) -> Vec<K> {
    select_shared(store, namespace, keep)
        .into_iter()
        .map(|o| (*o).clone())
        .collect()
}

/// [`select`] without copying the objects out of the store.
fn select_shared<K: Resource<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
    namespace: &str,
    keep: impl Fn(&K) -> bool,
) -> Vec<Arc<K>> {
    let mut out: Vec<Arc<K>> = store
        .state()
        .into_iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace) && keep(o))
        .collect();
    out.sort_by_key(|o| o.name_any());
    out
}

fn filled<K: Resource<DynamicType = ()> + Clone + 'static>(objects: Vec<K>) -> Kind<K> {
    let mut writer = reflector::store::Writer::<K>::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (_, listed) = watch::channel(true);
    Kind {
        store: writer.as_reader(),
        listed,
    }
}

fn unlisted<K: Resource<DynamicType = ()> + Clone + 'static>() -> Kind<K> {
    let writer = reflector::store::Writer::<K>::default();
    let (_, listed) = watch::channel(false);
    Kind {
        store: writer.as_reader(),
        listed,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::controller::fixtures;
    use crate::controller::pod::{pod_name, reflector_pod};

    fn pod_of(pool: &ReflectorPool, index: u32) -> Pod {
        let region = pool.spec.resolved_region("eu").unwrap();
        reflector_pod(pool, &region, &pod_name(&pool.name_any(), "eu", index))
    }

    fn names<K: ResourceExt>(objects: &[K]) -> Vec<String> {
        objects.iter().map(ResourceExt::name_any).collect()
    }

    fn pod_names(pods: &[Arc<Pod>]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[tokio::test]
    async fn the_cache_gives_a_sync_only_its_own_pool_s_sessions_and_pods_by_name() {
        let arena = fixtures::pool("games", "arena", &["eu"]);
        let lounge = fixtures::pool("games", "lounge", &["eu"]);
        // Same pool name in another namespace: another tenant's pool.
        let other = fixtures::pool("other", "arena", &["eu"]);
        let cache = Cache::of(
            vec![arena.clone(), lounge.clone(), other.clone()],
            vec![
                fixtures::session("games", "zoo", "arena"),
                fixtures::session("games", "lobby", "arena"),
                fixtures::session("games", "bar", "lounge"),
                fixtures::session("other", "lobby", "arena"),
            ],
            vec![
                pod_of(&arena, 1),
                pod_of(&arena, 0),
                pod_of(&lounge, 0),
                pod_of(&other, 0),
            ],
        );
        cache.ready().await.unwrap();
        assert_eq!(
            cache.pool("games", "arena").unwrap().namespace().unwrap(),
            "games"
        );
        assert!(cache.pool("games", "missing").is_none());
        assert_eq!(
            names(&cache.sessions_of("games", "arena")),
            ["lobby", "zoo"]
        );
        assert_eq!(names(&cache.sessions_of("other", "arena")), ["lobby"]);
        assert_eq!(
            pod_names(&cache.pods_of("games", "arena")),
            ["arena-eu-0", "arena-eu-1"]
        );
        assert_eq!(
            pod_names(&cache.pods_of("games", "lounge")),
            ["lounge-eu-0"]
        );
        assert_eq!(pod_names(&cache.pods_of("other", "arena")), ["arena-eu-0"]);
        assert!(cache.pods_of("games", "missing").is_empty());
    }

    #[test]
    fn watch_retries_grow_to_a_few_seconds_and_start_over_after_a_success() {
        let mut retry = Retry::new();
        let delays: Vec<Duration> = retry.by_ref().take(12).collect();
        assert!(delays.len() == 12, "retries never end");
        // Jitter adds up to one more delay of the same size.
        assert!(
            delays[0] >= RETRY_FIRST && delays[0] <= RETRY_FIRST * 2,
            "{delays:?}"
        );
        assert!(delays.iter().all(|d| *d <= RETRY_LONGEST * 2), "{delays:?}");
        assert!(delays[11] >= RETRY_LONGEST, "{delays:?}");
        retry.reset();
        assert!(retry.next().unwrap() <= RETRY_FIRST * 2);
    }

    #[tokio::test]
    async fn waiting_on_watches_that_stopped_before_listing_fails() {
        assert!(matches!(
            Cache::closed().ready().await,
            Err(Error::CacheClosed)
        ));
    }
}
