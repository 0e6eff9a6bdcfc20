//! TUTTI tallies: the votes of open ones and the keys of recently completed ones.
//!
//! Every client sends the same TUTTI (a snapshot vote, say); the first opens a tally that
//! waits for one vote per active client or [`TALLY_INTERVAL`], whichever comes first. The
//! completed keys are remembered so that a vote arriving after its tally closed does not
//! open a second one. Both tables are bounded: clients choose the keys.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use super::core::js_number;
use crate::frame::json_string;

/// How long a TUTTI tally waits for every client's vote.
pub const TALLY_INTERVAL: Duration = Duration::from_millis(1000);
/// Completed tallies older than this (teatime) are forgotten.
const TALLY_HISTORY_MS: f64 = 60_000.0;
/// At most this many completed tallies are remembered.
const MAX_COMPLETED_TALLIES: usize = 20;
/// Tallies open at once per session; TUTTIs for further keys are ignored.
pub const MAX_OPEN_TALLIES: usize = 64;

/// One open tally.
#[derive(Debug)]
pub(crate) struct Tally {
    send_time: f64,
    /// Votes still missing.
    expecting: usize,
    votes: Vec<(String, u32)>,
    wants_vote: bool,
    target: String,
    due: Instant,
}

impl Tally {
    /// The `tally` message to reflect, or `None` when there is nothing to tell (a TUTTI that
    /// wants no vote and on which every client agreed).
    pub fn result(&self, key: &str) -> Option<String> {
        if !self.wants_vote && self.votes.len() <= 1 {
            return None;
        }
        let mut payload = String::from("{\"what\":\"tally\",\"sendTime\":");
        js_number(&mut payload, self.send_time);
        payload.push_str(",\"tally\":{");
        for (i, (vote, n)) in self.votes.iter().enumerate() {
            if i > 0 {
                payload.push(',');
            }
            let _ = write!(payload, "{}:{n}", json_string(vote));
        }
        let _ = write!(
            payload,
            "}},\"tallyTarget\":{},\"tuttiKey\":{},\"missingClients\":{}}}",
            self.target,
            json_string(key),
            self.expecting
        );
        Some(payload)
    }
}

/// Why a TUTTI for a key without an open tally opens none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its tally completed already, or it was sent longer ago than the history reaches.
    LateOrRepeated,
    /// [`MAX_OPEN_TALLIES`] are open.
    TooMany,
}

/// The open and recently completed tallies of one session.
#[derive(Debug, Default)]
pub(crate) struct Tallies {
    open: HashMap<String, Tally>,
    /// Completed keys with their send time, oldest first.
    completed: VecDeque<(String, f64)>,
}

impl Tallies {
    /// The completed tallies of a stored session.
    pub fn restore(completed: Vec<(String, f64)>) -> Self {
        Self {
            open: HashMap::new(),
            completed: completed.into(),
        }
    }

    /// The completed tallies, to store.
    pub fn completed(&self) -> impl Iterator<Item = &(String, f64)> {
        self.completed.iter()
    }

    pub fn is_open(&self, key: &str) -> bool {
        self.open.contains_key(key)
    }

    #[cfg(test)]
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Whether a TUTTI sent at `send_time` may open a tally for `key` at session time `time`.
    pub fn may_open(&self, key: &str, send_time: f64, time: f64) -> Result<(), Refused> {
        if self.completed.iter().any(|(k, _)| k == key) || send_time < time - TALLY_HISTORY_MS {
            return Err(Refused::LateOrRepeated);
        }
        if self.open.len() >= MAX_OPEN_TALLIES {
            return Err(Refused::TooMany);
        }
        Ok(())
    }

    /// Opens a tally for `key` that waits for `expecting` votes until `now` + [`TALLY_INTERVAL`].
    pub fn open(
        &mut self,
        key: String,
        send_time: f64,
        expecting: usize,
        wants_vote: bool,
        target: String,
        now: Instant,
    ) {
        self.open.insert(
            key,
            Tally {
                send_time,
                expecting,
                votes: Vec::new(),
                wants_vote,
                target,
                due: now + TALLY_INTERVAL,
            },
        );
    }

    /// Counts one vote for the open tally `key`; true when it was the last one expected.
    pub fn vote(&mut self, key: &str, payload: String, wants_vote: bool) -> bool {
        let Some(tally) = self.open.get_mut(key) else {
            return false;
        };
        match tally.votes.iter_mut().find(|(p, _)| *p == payload) {
            Some((_, n)) => *n += 1,
            None => tally.votes.push((payload, 1)),
        }
        tally.wants_vote = wants_vote;
        tally.expecting = tally.expecting.saturating_sub(1);
        tally.expecting == 0
    }

    /// Closes the open tally `key` at session time `time` and remembers it as completed
    /// (forgetting completed ones past the history's age or count).
    pub fn close(&mut self, key: &str, time: f64) -> Option<Tally> {
        let tally = self.open.remove(key)?;
        self.completed.push_back((key.to_string(), tally.send_time));
        self.completed
            .retain(|(_, t)| *t >= time - TALLY_HISTORY_MS);
        while self.completed.len() > MAX_COMPLETED_TALLIES {
            self.completed.pop_front();
        }
        Some(tally)
    }

    /// Keys of the open tallies whose window has passed at `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        self.open
            .iter()
            .filter(|(_, t)| t.due <= now)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Keys of every open tally.
    pub fn keys(&self) -> Vec<String> {
        self.open.keys().cloned().collect()
    }

    /// When the earliest open tally is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.open.values().map(|t| t.due).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(t: &mut Tallies, key: &str, expecting: usize, now: Instant) {
        t.open(key.into(), 1000.0, expecting, true, "[\"t\"]".into(), now);
    }

    #[test]
    fn a_tally_completes_with_its_last_expected_vote() {
        let now = Instant::now();
        let mut t = Tallies::default();
        open(&mut t, "k", 3, now);
        assert!(!t.vote("k", "\"a\"".into(), true));
        assert!(!t.vote("k", "\"b\"".into(), true));
        assert!(t.vote("k", "\"a\"".into(), true));
        let tally = t.close("k", 1000.0).expect("open");
        let result: serde_json::Value =
            serde_json::from_str(&tally.result("k").expect("result")).expect("json");
        assert_eq!(result["tally"], serde_json::json!({"\"a\"": 2, "\"b\"": 1}));
        assert_eq!(result["missingClients"], 0);
        assert_eq!(result["tuttiKey"], "k");
        assert!(!t.is_open("k"));
        assert_eq!(
            t.may_open("k", 1000.0, 1000.0),
            Err(Refused::LateOrRepeated)
        );
    }

    #[test]
    fn an_agreed_tally_without_a_wanted_vote_reflects_nothing() {
        let now = Instant::now();
        let mut t = Tallies::default();
        open(&mut t, "k", 2, now);
        t.vote("k", "\"same\"".into(), false);
        t.vote("k", "\"same\"".into(), false);
        assert!(t.close("k", 0.0).expect("open").result("k").is_none());
        // A vote for a tally that is not open counts nowhere.
        assert!(!t.vote("k", "\"same\"".into(), false));
    }

    #[test]
    fn tallies_expire_after_their_window_with_the_missing_votes_counted() {
        let now = Instant::now();
        let mut t = Tallies::default();
        open(&mut t, "early", 2, now);
        open(&mut t, "late", 2, now + Duration::from_millis(500));
        assert_eq!(t.next_due(), Some(now + TALLY_INTERVAL));
        assert!(
            t.due(now + TALLY_INTERVAL - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(t.due(now + TALLY_INTERVAL), ["early"]);
        t.vote("early", "\"v\"".into(), true);
        let tally = t.close("early", 0.0).expect("open");
        assert!(
            tally
                .result("early")
                .expect("result")
                .contains("\"missingClients\":1")
        );
        assert_eq!(t.keys(), ["late"]);
    }

    #[test]
    fn open_tallies_are_bounded_and_stale_tuttis_refused() {
        let now = Instant::now();
        let mut t = Tallies::default();
        for i in 0..MAX_OPEN_TALLIES {
            assert_eq!(t.may_open(&format!("k{i}"), 0.0, 0.0), Ok(()));
            open(&mut t, &format!("k{i}"), 2, now);
        }
        assert_eq!(t.may_open("one more", 0.0, 0.0), Err(Refused::TooMany));
        assert_eq!(t.open_count(), MAX_OPEN_TALLIES);
        // Sent longer ago than the history reaches: it could repeat a forgotten key.
        let mut fresh = Tallies::default();
        assert_eq!(
            fresh.may_open("old", 0.0, TALLY_HISTORY_MS + 1.0),
            Err(Refused::LateOrRepeated)
        );
        assert_eq!(fresh.may_open("old", 1.0, TALLY_HISTORY_MS + 1.0), Ok(()));
        open(&mut fresh, "old", 1, now);
        fresh.close("old", 0.0);
        assert_eq!(fresh.completed().count(), 1);
    }

    #[test]
    fn completed_history_is_bounded_by_count_and_age() {
        let now = Instant::now();
        let mut t = Tallies::default();
        for i in 0..MAX_COMPLETED_TALLIES + 5 {
            let key = format!("k{i}");
            t.open(key.clone(), i as f64, 1, true, "[]".into(), now);
            t.close(&key, 0.0);
        }
        assert_eq!(t.completed().count(), MAX_COMPLETED_TALLIES);
        assert_eq!(t.completed().next().map(|(k, _)| k.as_str()), Some("k5"));
        // Much later, closing one more forgets every tally sent before the history's reach.
        open(&mut t, "new", 1, now);
        t.close("new", 1000.0 + TALLY_HISTORY_MS);
        let keys: Vec<&str> = t.completed().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["new"]);
        // Restored history refuses repeats just the same.
        let restored = Tallies::restore(vec![("r".into(), 5.0)]);
        assert_eq!(
            restored.may_open("r", 5.0, 5.0),
            Err(Refused::LateOrRepeated)
        );
    }
}
