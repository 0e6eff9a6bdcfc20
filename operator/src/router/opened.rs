//! The shards this router opened that no published plan holds yet, indexed.
//!
//! They live until the backend's next plan records them, so a plan that takes seconds lets
//! them pile up: at ~100 000 shards a sync took ~4 s and a ramp opened ~1 500 shards a
//! second, and every Route scanned all of them for its session's, every opening charged all
//! of its pool's to the room left, and every report looked each of its shards up in them
//! (run G3 in docs/scale.md: ~40 % of the leader's samples, on a core it no longer had). So
//! they are indexed by session and by name, and the room they hold is kept per pool as
//! they come and go.

use foldhash::HashMap as FastMap;
use refleet_core::planner::{Held, HeldRoom, ShardRecord};

#[derive(Default)]
pub(super) struct Opened {
    shards: Vec<ShardRecord>,
    /// Session key → positions in `shards`.
    by_session: FastMap<String, Vec<usize>>,
    /// Shard name → positions in `shards` (names repeat across apps and sessions).
    by_name: FastMap<String, Vec<usize>>,
    /// Reflector → positions in `shards` of the shards opened on it.
    by_host: FastMap<String, Vec<usize>>,
    /// Pool id → the room its opened shards hold, by reflector.
    held: FastMap<String, HeldRoom>,
}

impl Opened {
    pub(super) fn push(&mut self, shard: ShardRecord) {
        let i = self.shards.len();
        self.by_session
            .entry(shard.session.clone())
            .or_default()
            .push(i);
        self.by_name.entry(shard.name.clone()).or_default().push(i);
        for host in shard.hosts() {
            self.by_host.entry(host.to_owned()).or_default().push(i);
        }
        self.held
            .entry(shard.pool.clone())
            .or_default()
            .charge(&shard);
        self.shards.push(shard);
    }

    /// Keeps the shards `keep` says to keep (a plan was published: those it holds go).
    pub(super) fn retain(&mut self, keep: impl FnMut(&ShardRecord) -> bool) {
        let before = self.shards.len();
        self.shards.retain(keep);
        if self.shards.len() != before {
            let shards = std::mem::take(&mut self.shards);
            self.clear();
            for sh in shards {
                self.push(sh);
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.shards.clear();
        self.by_session.clear();
        self.by_name.clear();
        self.by_host.clear();
        self.held.clear();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, ShardRecord> {
        self.shards.iter()
    }

    /// The opened shards of session `key`.
    pub(super) fn of_session<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a ShardRecord> {
        self.at(self.by_session.get(key))
    }

    /// The opened shards named `name` (of any app and session).
    pub(super) fn named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a ShardRecord> {
        self.at(self.by_name.get(name))
    }

    /// The opened shards on reflector `reflector`.
    pub(super) fn on<'a>(&'a self, reflector: &str) -> impl Iterator<Item = &'a ShardRecord> {
        self.at(self.by_host.get(reflector))
    }

    fn at<'a>(&'a self, at: Option<&'a Vec<usize>>) -> impl Iterator<Item = &'a ShardRecord> {
        at.into_iter().flatten().map(|&i| &self.shards[i])
    }

    /// The room the opened shards of pool `pool` hold on `reflector`.
    pub(super) fn held_on(&self, pool: &str, reflector: &str) -> Held {
        self.held
            .get(pool)
            .map(|room| room.of(reflector))
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn shard(pool: &str, session: &str, name: &str, reflector: &str, users: u32) -> ShardRecord {
        ShardRecord {
            session: session.into(),
            name: name.into(),
            index: 0,
            pool: pool.into(),
            region: "eu".into(),
            reflector: Some(reflector.into()),
            committed_users: users,
            users: 0,
            reserved: 0,
            phase: crate::crd::ShardPhase::Open,
            empty_since: None,
            moving_to: None,
            moved_at: None,
        }
    }

    fn names<'a>(it: impl Iterator<Item = &'a ShardRecord>) -> Vec<&'a str> {
        it.map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn shards_are_found_by_session_and_name_and_their_room_follows_them() {
        let mut opened = Opened::default();
        opened.push(shard("p", "ns/a/room-1", "room-1", "r1", 16));
        opened.push(shard("p", "ns/a/room-2", "room-2", "r1", 16));
        opened.push(shard("p", "ns/a/room-1", "room-1~1", "r2", 16));
        opened.push(shard("q", "ns/b/room-1", "room-1", "r1", 5));
        assert_eq!(
            names(opened.of_session("ns/a/room-1")),
            ["room-1", "room-1~1"]
        );
        assert_eq!(
            opened.named("room-1").count(),
            2,
            "two apps' shards of one name"
        );
        assert_eq!(
            opened.held_on("p", "r1"),
            Held {
                users: 32,
                sessions: 2
            }
        );
        assert_eq!(opened.held_on("q", "r1").sessions, 1, "per pool");
        assert_eq!(opened.held_on("p", "r9"), Held::default());
        assert_eq!(names(opened.on("r1")), ["room-1", "room-2", "room-1"]);
        assert_eq!(names(opened.on("r2")), ["room-1~1"]);

        // A plan holds room-1 of app a now: it leaves, with its room and its index entries.
        opened.retain(|s| !(s.session == "ns/a/room-1" && s.name == "room-1"));
        assert_eq!(names(opened.of_session("ns/a/room-1")), ["room-1~1"]);
        assert_eq!(names(opened.named("room-1")), ["room-1"]);
        assert_eq!(opened.named("room-1").next().unwrap().pool, "q");
        assert_eq!(
            opened.held_on("p", "r1"),
            Held {
                users: 16,
                sessions: 1
            }
        );
        assert_eq!(names(opened.iter()), ["room-2", "room-1~1", "room-1"]);
        assert_eq!(names(opened.on("r1")), ["room-2", "room-1"]);
        opened.clear();
        assert_eq!(opened.on("r1").count(), 0);
        assert!(opened.is_empty());
        assert_eq!(opened.held_on("p", "r2"), Held::default());
        assert_eq!(opened.of_session("ns/a/room-1").count(), 0);
    }
}
