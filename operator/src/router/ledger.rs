//! The reservation ledger: places the router promised and that have not yet turned into
//! users at a reflector (or expired).
//!
//! Every Route answer reserves one place on a shard for its claim window (at most the join
//! token's lifetime: a reservation nobody uses soon is released early, so reserving is not
//! a way to lock others out; the token stays valid and the reflector's hard cap still
//! guards the shard). A reservation ends when the reflector reports the view it admitted with that token (its id
//! rides in the token and comes back in the report, so the user appears in the reported
//! count in the same report the reservation disappears from), or, for reflectors without
//! tokens, when the report counts new joins (oldest reservations first), or when it
//! expires. Pure: time is a millisecond count the caller supplies.
//!
//! Costs are what a Route on a hot session can afford: each shard's reservations are kept
//! sorted by expiry, so its pending count is a binary search, and a user's reservation is
//! found through an index by (scope, user) instead of a scan. Lookups take `&str` pairs and
//! allocate nothing.

use std::collections::VecDeque;
use std::net::IpAddr;

use foldhash::HashMap;
use std::sync::Arc;

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Reservation {
    id: u64,
    expires: Millis,
    /// `(scope, user)` when the reservation was made for a user id.
    user: Option<(String, String)>,
    /// `(scope, client)` when an anonymous caller made it.
    anonymous: Option<(String, IpAddr)>,
}

/// Who a reservation is for, beyond its shard.
#[derive(Clone, Copy, Debug, Default)]
pub struct Claim<'a> {
    /// `(scope, user id)`: a later [`Ledger::find_user`] in the scope finds it.
    pub user: Option<(&'a str, &'a str)>,
    /// `(scope, client address)` of an anonymous caller, for the per-caller and
    /// per-scope limits ([`Ledger::anonymous_of`], [`Ledger::anonymous_counted`]).
    pub anonymous: Option<(&'a str, IpAddr)>,
    /// When the join token handed out for it expires (remembered for a repeated Route).
    pub token_expires: Millis,
}

/// One anonymous caller's reservation in a scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AnonHold {
    id: u64,
    expires: Millis,
    /// Holds a place on a shard (else an answer past the scope's anonymous share, which
    /// only counts against its caller's own limit).
    counted: bool,
}

/// Anonymous reservations of one scope (a session).
#[derive(Clone, Debug, Default)]
struct AnonScope {
    by_client: HashMap<IpAddr, Vec<AnonHold>>,
}

/// A user's pending reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The shard's appId.
    pub app: String,
    /// The shard's name.
    pub shard: String,
    /// The reservation id.
    pub id: u64,
    /// When its place is released.
    pub expires: Millis,
    /// When the token handed out for it expires.
    pub token_expires: Millis,
    /// The token handed out for it, once the caller attached one ([`Ledger::attach_token`]).
    pub token: Option<Arc<str>>,
}

/// Outstanding reservations, per shard, in expiry order.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// appId → shard name → reservations sorted by `expires` (ties: reservation order).
    shards: HashMap<String, HashMap<String, VecDeque<Reservation>>>,
    /// scope → user id → that user's pending reservation in the scope.
    users: HashMap<String, HashMap<String, Hold>>,
    /// scope → anonymous callers' reservations.
    anonymous: HashMap<String, AnonScope>,
    next_id: u64,
}

/// One app's reservations (see [`Ledger::of_app`]).
#[derive(Clone, Copy)]
pub struct AppReservations<'a>(Option<&'a HashMap<String, VecDeque<Reservation>>>);

impl AppReservations<'_> {
    /// Reservations on `shard` not yet expired at `now`.
    pub fn pending(&self, shard: &str, now: Millis) -> u32 {
        let Some(q) = self.0.and_then(|m| m.get(shard)) else {
            return 0;
        };
        // Sorted by expiry: nothing has expired unless the oldest has (the common case, O(1)).
        let expired = match q.front() {
            Some(first) if first.expires <= now => q.partition_point(|r| r.expires <= now),
            _ => 0,
        };
        u32::try_from(q.len() - expired).unwrap_or(u32::MAX)
    }
}

impl Ledger {
    /// An empty ledger whose ids start at `first_id` (random per router instance, so ids of
    /// a previous leader's tokens are not mistaken for ours).
    pub fn new(first_id: u64) -> Self {
        Self {
            shards: HashMap::default(),
            users: HashMap::default(),
            anonymous: HashMap::default(),
            next_id: first_id.max(1),
        }
    }

    /// Reserves a place on shard `(app, shard)` until `expires`; returns the reservation id.
    /// `user` is `(scope, user id)`: a later [`Ledger::find_user`] in the same scope (the
    /// router uses the session) finds this reservation while it is pending.
    pub fn reserve(
        &mut self,
        shard: (&str, &str),
        user: Option<(&str, &str)>,
        expires: Millis,
    ) -> u64 {
        let claim = Claim {
            user,
            anonymous: None,
            token_expires: expires,
        };
        self.reserve_for(shard, claim, expires)
    }

    /// [`Ledger::reserve`] with everything about who it is for.
    pub fn reserve_for(
        &mut self,
        (app, shard): (&str, &str),
        claim: Claim<'_>,
        expires: Millis,
    ) -> u64 {
        let id = self.take_id();
        let q = self
            .shards
            .entry(app.to_owned())
            .or_default()
            .entry(shard.to_owned())
            .or_default();
        let r = Reservation {
            id,
            expires,
            user: claim.user.map(|(s, u)| (s.to_owned(), u.to_owned())),
            anonymous: claim.anonymous.map(|(s, c)| (s.to_owned(), c)),
        };
        // Callers reserve with now + a fixed lifetime, so this is nearly always a push.
        if q.back().is_none_or(|b| b.expires <= expires) {
            q.push_back(r);
        } else {
            let at = q.partition_point(|x| x.expires <= expires);
            q.insert(at, r);
        }
        if let Some((scope, user)) = claim.user {
            let hold = Hold {
                app: app.to_owned(),
                shard: shard.to_owned(),
                id,
                expires,
                token_expires: claim.token_expires,
                token: None,
            };
            let by_user = self.users.entry(scope.to_owned()).or_default();
            // A user holds one place per scope: an older hold is replaced (its reservation
            // still counts until it ends).
            by_user.insert(user.to_owned(), hold);
        }
        if let Some((scope, client)) = claim.anonymous {
            self.hold_anonymous(scope, client, id, expires, true);
        }
        id
    }

    /// An answer to an anonymous caller that holds no place (past the scope's anonymous
    /// share): it only counts against that caller's own limit until `expires`.
    pub fn note_unreserved(&mut self, scope: &str, client: IpAddr, expires: Millis) -> u64 {
        let id = self.take_id();
        self.hold_anonymous(scope, client, id, expires, false);
        id
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn hold_anonymous(
        &mut self,
        scope: &str,
        client: IpAddr,
        id: u64,
        expires: Millis,
        counted: bool,
    ) {
        self.anonymous
            .entry(scope.to_owned())
            .or_default()
            .by_client
            .entry(client)
            .or_default()
            .push(AnonHold {
                id,
                expires,
                counted,
            });
    }

    /// Reservations (held places or not) of anonymous `client` in `scope` still in their
    /// claim window at `now`.
    pub fn anonymous_of(&self, scope: &str, client: IpAddr, now: Millis) -> u32 {
        let n = self
            .anonymous
            .get(scope)
            .and_then(|a| a.by_client.get(&client))
            .map_or(0, |v| v.iter().filter(|h| h.expires > now).count());
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Places held by anonymous callers in `scope` at `now`.
    pub fn anonymous_counted(&self, scope: &str, now: Millis) -> u32 {
        let n = self.anonymous.get(scope).map_or(0, |a| {
            a.by_client
                .values()
                .flatten()
                .filter(|h| h.counted && h.expires > now)
                .count()
        });
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Reservations of shard `(app, shard)` still pending at `now`.
    pub fn pending(&self, app: &str, shard: &str, now: Millis) -> u32 {
        self.of_app(app).pending(shard, now)
    }

    /// The reservations of one app, looked up once for a Route that weighs every shard of a
    /// session.
    pub fn of_app(&self, app: &str) -> AppReservations<'_> {
        AppReservations(self.shards.get(app))
    }

    /// The pending reservation of `user` in `scope` (a repeated Route for the same user gets
    /// the same place instead of a second one).
    pub fn find_user(&self, scope: &str, user: &str, now: Millis) -> Option<&Hold> {
        self.users.get(scope)?.get(user).filter(|h| h.expires > now)
    }

    /// Remembers the token handed out for `user`'s reservation `id`, so a repeated Route
    /// answers with the same token. Does nothing if that reservation is no longer the user's.
    pub fn attach_token(&mut self, scope: &str, user: &str, id: u64, token: Arc<str>) {
        if let Some(h) = self
            .users
            .get_mut(scope)
            .and_then(|m| m.get_mut(user))
            .filter(|h| h.id == id)
        {
            h.token = Some(token);
        }
    }

    /// The reflector admitted views on shard `(app, shard)`: `admitted` are the reservation
    /// ids their tokens carried; `joins` counts every new view (with or without a token).
    /// Returns how many reservations ended (expired ones at `now` are dropped first,
    /// uncounted).
    pub fn joined(
        &mut self,
        (app, shard): (&str, &str),
        admitted: &[u64],
        joins: u32,
        now: Millis,
    ) -> u32 {
        let Some(q) = self.shards.get_mut(app).and_then(|m| m.get_mut(shard)) else {
            return 0;
        };
        let mut ended = Vec::new();
        let expired = q.partition_point(|r| r.expires <= now);
        ended.extend(q.drain(..expired));
        let before = q.len();
        if admitted.is_empty() {
            // No token ids (tokens off): each new view takes the oldest reservation.
            let n = (joins as usize).min(q.len());
            ended.extend(q.drain(..n));
        } else {
            let mut kept = VecDeque::with_capacity(q.len());
            for r in q.drain(..) {
                if admitted.contains(&r.id) {
                    ended.push(r);
                } else {
                    kept.push_back(r);
                }
            }
            *q = kept;
        }
        let count = before - q.len();
        if q.is_empty() {
            self.drop_shard(app, shard);
        }
        self.forget_users(&ended);
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Drops expired reservations.
    pub fn expire(&mut self, now: Millis) {
        let mut ended = Vec::new();
        self.shards.retain(|_, shards| {
            shards.retain(|_, q| {
                let expired = q.partition_point(|r| r.expires <= now);
                ended.extend(q.drain(..expired));
                !q.is_empty()
            });
            !shards.is_empty()
        });
        self.forget_users(&ended);
        self.anonymous.retain(|_, a| {
            a.by_client.retain(|_, v| {
                v.retain(|h| h.expires > now);
                !v.is_empty()
            });
            !a.by_client.is_empty()
        });
    }

    /// Every shard with pending reservations: `(app, shard, count)`.
    pub fn totals(&self, now: Millis) -> impl Iterator<Item = (&str, &str, u32)> {
        self.shards.iter().flat_map(move |(app, shards)| {
            shards
                .keys()
                .map(move |s| (app.as_str(), s.as_str(), self.pending(app, s, now)))
        })
    }

    fn drop_shard(&mut self, app: &str, shard: &str) {
        if let Some(m) = self.shards.get_mut(app) {
            m.remove(shard);
            if m.is_empty() {
                self.shards.remove(app);
            }
        }
    }

    fn forget_users(&mut self, ended: &[Reservation]) {
        for r in ended {
            if let Some((scope, client)) = &r.anonymous
                && let Some(a) = self.anonymous.get_mut(scope)
            {
                if let Some(v) = a.by_client.get_mut(client) {
                    v.retain(|h| h.id != r.id);
                    if v.is_empty() {
                        a.by_client.remove(client);
                    }
                }
                if a.by_client.is_empty() {
                    self.anonymous.remove(scope);
                }
            }
            let Some((scope, user)) = &r.user else {
                continue;
            };
            if let Some(m) = self.users.get_mut(scope) {
                if m.get(user).is_some_and(|h| h.id == r.id) {
                    m.remove(user);
                }
                if m.is_empty() {
                    self.users.remove(scope);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: (&str, &str) = ("app", "s");

    #[test]
    fn reservations_end_by_token_id_by_join_count_or_by_expiry() {
        let mut l = Ledger::new(100);
        let r1 = l.reserve(S, Some(("sess", "u1")), 1_000);
        let r2 = l.reserve(S, None, 2_000);
        let _r3 = l.reserve(S, None, 3_000);
        assert_eq!((r1, r2), (100, 101));
        assert_eq!(l.pending("app", "s", 0), 3);
        // The view with token r2 arrived.
        assert_eq!(l.joined(S, &[r2], 1, 0), 1);
        assert_eq!(l.pending("app", "s", 0), 2);
        assert_eq!(l.find_user("sess", "u1", 0).map(|h| h.id), Some(r1));
        // The same user in another scope (session) holds nothing.
        assert_eq!(l.find_user("other", "u1", 0), None);
        // r1 expires at 1000.
        assert_eq!(l.pending("app", "s", 1_000), 1);
        assert_eq!(l.find_user("sess", "u1", 1_000), None);
        // A join without a token takes the oldest (r1 expired and is dropped uncounted).
        assert_eq!(l.joined(S, &[], 1, 1_000), 1);
        assert_eq!(l.pending("app", "s", 0), 0);
        assert!(
            l.users.is_empty(),
            "ended reservations leave no user index entry"
        );
        l.expire(5_000);
        assert_eq!(l.totals(0).count(), 0);
    }

    #[test]
    fn out_of_order_expiries_are_counted_right() {
        let mut l = Ledger::new(1);
        for e in [50, 10, 30, 20, 40] {
            l.reserve(S, None, e);
        }
        assert_eq!(l.pending("app", "s", 0), 5);
        assert_eq!(l.pending("app", "s", 25), 3);
        assert_eq!(l.pending("app", "s", 50), 0);
        l.expire(30);
        assert_eq!(l.totals(0).collect::<Vec<_>>(), vec![("app", "s", 2)]);
    }

    #[test]
    fn an_attached_token_stays_with_its_reservation_only() {
        let mut l = Ledger::new(1);
        let a = l.reserve(S, Some(("sess", "u")), 100);
        l.attach_token("sess", "u", a, "tok-a".into());
        assert_eq!(
            l.find_user("sess", "u", 0).and_then(|h| h.token.clone()),
            Some("tok-a".into())
        );
        // Once the reservation ends, a new one for the user carries no old token.
        l.joined(S, &[a], 1, 0);
        assert_eq!(l.find_user("sess", "u", 0), None);
        let b = l.reserve(S, Some(("sess", "u")), 200);
        l.attach_token("sess", "u", a, "stale".into());
        let h = l.find_user("sess", "u", 0).unwrap();
        assert_eq!((h.id, h.token.clone()), (b, None));
    }

    #[test]
    fn anonymous_reservations_are_counted_per_client_and_end_with_their_place() {
        let mut l = Ledger::new(1);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let anon = |c| Claim {
            user: None,
            anonymous: Some(("sess", c)),
            token_expires: 1_000,
        };
        let r1 = l.reserve_for(S, anon(a), 100);
        l.reserve_for(S, anon(a), 200);
        l.reserve_for(S, anon(b), 100);
        l.note_unreserved("sess", a, 100);
        assert_eq!(l.anonymous_of("sess", a, 0), 3);
        assert_eq!(
            l.anonymous_counted("sess", 0),
            3,
            "the unreserved one holds no place"
        );
        assert_eq!(l.pending("app", "s", 0), 3);
        assert_eq!(l.anonymous_of("other", a, 0), 0);
        // Joining ends the reservation for its client too.
        l.joined(S, &[r1], 1, 0);
        assert_eq!(l.anonymous_of("sess", a, 0), 2);
        // The claim window ends: counted no more, and expire forgets them.
        assert_eq!(l.anonymous_of("sess", a, 100), 1);
        assert_eq!(l.anonymous_counted("sess", 100), 1);
        l.expire(200);
        assert!(l.anonymous.is_empty());
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
            let ids: Vec<u64> = (0..n).map(|i| l.reserve(("app", "x"), None, 10 + i as u64)).collect();
            let mut ended = 0u32;
            for (k, by_id) in joins {
                let admitted: Vec<u64> = if by_id {
                    ids.iter().copied().skip(ended as usize).take(k as usize).collect()
                } else {
                    Vec::new()
                };
                ended += l.joined(("app", "x"), &admitted, k, 0);
                prop_assert_eq!(l.pending("app", "x", 0) as usize, n - ended as usize);
            }
            prop_assert_eq!(l.pending("app", "x", 10 + n as u64), 0);
        }

        /// The binary-searched count equals a plain count of unexpired reservations, and the
        /// user index always points at a live reservation of that user.
        #[test]
        fn counts_and_user_index_match_a_plain_scan(
            ops in proptest::collection::vec((0u64..100, 0u8..4, 0u64..100), 1..80),
        ) {
            let mut l = Ledger::new(1);
            let mut model: Vec<(u64, u64)> = Vec::new(); // (id, expires)
            for (expires, user, now) in ops {
                let u = format!("u{user}");
                let id = l.reserve(S, (user > 0).then_some(("sess", u.as_str())), expires);
                model.push((id, expires));
                let plain = model.iter().filter(|(_, e)| *e > now).count();
                prop_assert_eq!(l.pending("app", "s", now) as usize, plain);
                if let Some(h) = l.find_user("sess", &u, now) {
                    prop_assert!(model.iter().any(|(i, e)| *i == h.id && *e > now));
                }
                if now % 3 == 0 {
                    l.expire(now);
                    model.retain(|(_, e)| *e > now);
                }
            }
        }
    }
}
