//! The reservation ledger: places the router promised and that have not yet turned into
//! users at a reflector (or expired).
//!
//! Every Route answer reserves one place on a shard until its join token expires. A
//! reservation ends when the reflector reports the view it admitted with that token (its id
//! rides in the token and comes back in the report, so the user appears in the reported
//! count in the same report the reservation disappears from), or, for reflectors without
//! tokens, when the report counts new joins (oldest reservations first), or when it
//! expires. Pure: time is a millisecond count the caller supplies.

use std::collections::{HashMap, VecDeque};

/// A shard as reflectors report it: (appId, shard name).
pub type ShardId = (String, String);

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Reservation {
    id: u64,
    user: Option<String>,
    expires: Millis,
}

/// Outstanding reservations, per shard, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    shards: HashMap<ShardId, VecDeque<Reservation>>,
    next_id: u64,
}

impl Ledger {
    /// An empty ledger whose ids start at `first_id` (random per router instance, so ids of
    /// a previous leader's tokens are not mistaken for ours).
    pub fn new(first_id: u64) -> Self {
        Self {
            shards: HashMap::new(),
            next_id: first_id.max(1),
        }
    }

    /// Reserves a place on `shard` until `expires`; returns the reservation id.
    pub fn reserve(&mut self, shard: &ShardId, user: Option<&str>, expires: Millis) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.shards
            .entry(shard.clone())
            .or_default()
            .push_back(Reservation {
                id,
                user: user.map(str::to_owned),
                expires,
            });
        id
    }

    /// Reservations of `shard` still pending at `now`.
    pub fn pending(&self, shard: &ShardId, now: Millis) -> u32 {
        self.shards.get(shard).map_or(0, |q| {
            u32::try_from(q.iter().filter(|r| r.expires > now).count()).unwrap_or(u32::MAX)
        })
    }

    /// A pending reservation of `user` on one of `shards` (a repeated Route for the same
    /// user gets the same place instead of a second one).
    pub fn find_user<'a>(
        &self,
        shards: impl IntoIterator<Item = &'a ShardId>,
        user: &str,
        now: Millis,
    ) -> Option<(&'a ShardId, u64, Millis)> {
        shards.into_iter().find_map(|s| {
            self.shards.get(s)?.iter().find_map(|r| {
                (r.expires > now && r.user.as_deref() == Some(user)).then_some((s, r.id, r.expires))
            })
        })
    }

    /// The reflector admitted views on `shard`: `admitted` are the reservation ids their
    /// tokens carried; `joins` counts every new view (with or without a token). Returns how
    /// many reservations ended (expired ones at `now` are dropped first, uncounted).
    pub fn joined(&mut self, shard: &ShardId, admitted: &[u64], joins: u32, now: Millis) -> u32 {
        let Some(q) = self.shards.get_mut(shard) else {
            return 0;
        };
        q.retain(|r| r.expires > now);
        let before = q.len();
        if admitted.is_empty() {
            // No token ids (tokens off): each new view takes the oldest reservation.
            let n = (joins as usize).min(q.len());
            q.drain(..n);
        } else {
            q.retain(|r| !admitted.contains(&r.id));
        }
        let ended = before - q.len();
        if q.is_empty() {
            self.shards.remove(shard);
        }
        u32::try_from(ended).unwrap_or(u32::MAX)
    }

    /// Drops expired reservations.
    pub fn expire(&mut self, now: Millis) {
        self.shards.retain(|_, q| {
            q.retain(|r| r.expires > now);
            !q.is_empty()
        });
    }

    /// Every pending reservation, per shard.
    pub fn totals(&self, now: Millis) -> impl Iterator<Item = (&ShardId, u32)> {
        self.shards.keys().map(move |s| (s, self.pending(s, now)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shard(n: &str) -> ShardId {
        ("app".into(), n.into())
    }

    #[test]
    fn reservations_end_by_token_id_by_join_count_or_by_expiry() {
        let mut l = Ledger::new(100);
        let a = shard("s");
        let r1 = l.reserve(&a, Some("u1"), 1_000);
        let r2 = l.reserve(&a, None, 2_000);
        let _r3 = l.reserve(&a, None, 3_000);
        assert_eq!((r1, r2), (100, 101));
        assert_eq!(l.pending(&a, 0), 3);
        // The view with token r2 arrived.
        assert_eq!(l.joined(&a, &[r2], 1, 0), 1);
        assert_eq!(l.pending(&a, 0), 2);
        assert_eq!(l.find_user([&a], "u1", 0).map(|(_, id, _)| id), Some(r1));
        // r1 expires at 1000.
        assert_eq!(l.pending(&a, 1_000), 1);
        assert_eq!(l.find_user([&a], "u1", 1_000), None);
        // A join without a token takes the oldest.
        assert_eq!(l.joined(&a, &[], 1, 1_000), 1);
        assert_eq!(l.pending(&a, 0), 0);
        l.expire(5_000);
        assert_eq!(l.totals(0).count(), 0);
    }

    proptest! {
        /// Whatever arrives, the pending count never exceeds what was reserved, never goes
        /// negative, and reaches 0 once every reservation joined or expired.
        #[test]
        fn pending_is_reserved_minus_ended(
            n in 0usize..50,
            joins in proptest::collection::vec((0u32..5, any::<bool>()), 0..30),
        ) {
            let mut l = Ledger::new(1);
            let s = shard("x");
            let ids: Vec<u64> = (0..n).map(|i| l.reserve(&s, None, 10 + i as u64)).collect();
            let mut ended = 0u32;
            for (k, by_id) in joins {
                let admitted: Vec<u64> = if by_id {
                    ids.iter().copied().skip(ended as usize).take(k as usize).collect()
                } else {
                    Vec::new()
                };
                ended += l.joined(&s, &admitted, k, 0);
                prop_assert_eq!(l.pending(&s, 0) as usize, n - ended as usize);
            }
            prop_assert_eq!(l.pending(&s, 10 + n as u64), 0);
        }
    }
}
