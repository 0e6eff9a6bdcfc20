//! What a plan holds, grouped by planner session key once per sync.
//!
//! A sync works out a status, a problem, gauges and Events for every Session object. Found
//! by scanning the plan for each object, that is O(Session objects × shards): 22 s per sync
//! for 10 000 exact-name Sessions with one shard each (`cargo bench -p refleet-operator
//! --bench sync`). Grouped once, an exact name is a lookup and a `namePattern` a range of
//! keys under its `namespace/appId/` prefix, so each object costs what it governs.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use crate::crd::{Reason, SessionSpec};
use refleet_core::planner::{Decision, Plan, ShardRecord, session_key};

use super::ObservedSession;

/// The name within `namespace`/`app_id` of planner key `key`, when the key is one of theirs.
pub fn name_in<'k>(key: &'k str, namespace: &str, app_id: &str) -> Option<&'k str> {
    key.strip_prefix(namespace)?
        .strip_prefix('/')?
        .strip_prefix(app_id)?
        .strip_prefix('/')
}

/// Values by planner session key, read per Session object.
#[derive(Debug)]
pub struct BySession<'a, T> {
    by_key: BTreeMap<&'a str, T>,
}

impl<'a, T> BySession<'a, T> {
    /// The entries of every concrete session the Session object with `spec` in `namespace`
    /// governs ([`super::governs`]), in key order.
    pub fn governed<'s>(
        &'s self,
        namespace: &str,
        spec: &'s SessionSpec,
    ) -> impl Iterator<Item = (&'a str, &'s T)> + 's {
        let (from, exact) = match &spec.name {
            Some(name) => (session_key(namespace, &spec.app_id, name), true),
            None => (session_key(namespace, &spec.app_id, ""), false),
        };
        let prefix_len = from.len();
        let range = self
            .by_key
            .range::<str, _>((Bound::Included(from.as_str()), Bound::Unbounded));
        // An exact name is the first key of its range or absent; a pattern's keys follow
        // its prefix until the first key without it.
        range
            .take_while(move |(key, _)| {
                if exact {
                    **key == from
                } else {
                    key.starts_with(&from)
                }
            })
            .filter(move |(key, _)| exact || spec.matches(&key[prefix_len..]))
            .map(|(key, value)| (*key, value))
    }
}

/// The shards of a plan by session key.
pub fn shards(shards: &[ShardRecord]) -> BySession<'_, Vec<&ShardRecord>> {
    let mut by_key: BTreeMap<&str, Vec<&ShardRecord>> = BTreeMap::new();
    for shard in shards {
        by_key.entry(&shard.session).or_default().push(shard);
    }
    BySession { by_key }
}

/// A plan's `SessionDegraded` decisions by session key: each key's first, with its place
/// among the plan's decisions (a Session object reports the earliest of its sessions').
pub fn degraded(plan: &Plan) -> BySession<'_, (usize, Reason, &str)> {
    let mut by_key = BTreeMap::new();
    for (i, d) in plan.decisions.iter().enumerate() {
        if let Decision::SessionDegraded {
            session,
            reason,
            message,
        } = d
        {
            by_key
                .entry(session.as_str())
                .or_insert((i, *reason, message.as_str()));
        }
    }
    BySession { by_key }
}

/// Which Session object governs a planner key: the first in the list that does, as
/// [`super::concrete_sessions`] decides.
#[derive(Debug)]
pub struct Owners {
    exact: HashMap<String, usize>,
    patterns: Vec<(usize, String)>,
}

impl Owners {
    /// The owners among `sessions`, given as `(namespace, spec)`.
    pub fn new<'s>(sessions: impl IntoIterator<Item = (&'s str, &'s SessionSpec)>) -> Self {
        let mut exact = HashMap::new();
        let mut patterns = Vec::new();
        for (i, (namespace, spec)) in sessions.into_iter().enumerate() {
            match &spec.name {
                Some(name) => {
                    exact
                        .entry(session_key(namespace, &spec.app_id, name))
                        .or_insert(i);
                }
                None => patterns.push((i, namespace.to_owned())),
            }
        }
        Self { exact, patterns }
    }

    /// The index of the first Session object governing `key`, with `spec_of` giving an
    /// index's spec.
    pub fn of<'s>(&self, key: &str, spec_of: impl Fn(usize) -> &'s SessionSpec) -> Option<usize> {
        let exact = self.exact.get(key).copied();
        let pattern = self.patterns.iter().find_map(|(i, namespace)| {
            let spec = spec_of(*i);
            let name = name_in(key, namespace, &spec.app_id)?;
            spec.matches(name).then_some(*i)
        });
        match (exact, pattern) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Owners of the observed Session objects.
pub fn owners(sessions: &[ObservedSession]) -> Owners {
    Owners::new(sessions.iter().map(|s| (s.namespace.as_str(), &s.spec)))
}
