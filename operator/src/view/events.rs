//! The fleet's recent events, told apart by comparing two statuses: reflectors started,
//! ready, draining and gone; shards opened, placed, moved, full and closed. Both backends
//! publish whole statuses, so a comparison gives the same events in `refleet up` and in the
//! operator, whatever made the change (a plan, a report, a move).

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::status::{ReflectorView, ShardView, Status};

/// How many events the view keeps (the oldest go first).
pub const KEPT: usize = 100;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// When it was seen, in Unix milliseconds.
    pub at_ms: u64,
    /// The appId of the shard it is about (`None`: a reflector's event), so that a reader
    /// allowed one app sees only that app's shards.
    pub app: Option<String>,
    /// What happened, in words.
    pub text: String,
}

/// A shard's identity across statuses.
fn shard_key(s: &ShardView) -> ShardKey<'_> {
    (&s.namespace, &s.app_id, &s.session, &s.name)
}

type Reflectors<'a> = BTreeMap<&'a str, (&'a str, &'a ReflectorView)>;

fn reflectors(s: &Status) -> Reflectors<'_> {
    s.regions
        .iter()
        .flat_map(|r| {
            r.reflectors
                .iter()
                .map(move |x| (x.name.as_str(), (r.name.as_str(), x)))
        })
        .collect()
}

type ShardKey<'a> = (&'a str, &'a str, &'a str, &'a str);

fn shards(s: &Status) -> BTreeMap<ShardKey<'_>, &ShardView> {
    s.shards.iter().map(|x| (shard_key(x), x)).collect()
}

/// The events between `before` and `after`, seen at `at_ms`, in a stable order (reflectors
/// first, then shards, each by name).
pub fn diff(before: &Status, after: &Status, at_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut say = |app: Option<&str>, text: String| {
        out.push(Event {
            at_ms,
            app: app.map(str::to_owned),
            text,
        });
    };
    let (old, new) = (reflectors(before), reflectors(after));
    for (name, (region, r)) in &new {
        match old.get(name) {
            None => say(
                None,
                format!("reflector {name} started in {region} ({})", r.state),
            ),
            Some((_, o)) if o.state != r.state => {
                say(
                    None,
                    format!("reflector {name} is {}", r.state.to_lowercase()),
                );
            }
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        say(None, format!("reflector {name} stopped"));
    }
    let (old, new) = (shards(before), shards(after));
    for (key, s) in &new {
        let app = Some(s.app_id.as_str());
        let name = format!("shard {} of {}/{}", s.name, s.namespace, s.session);
        let Some(o) = old.get(key) else {
            let place = s
                .reflector
                .as_deref()
                .map_or_else(String::new, |r| format!(" on {r}"));
            say(app, format!("{name} opened in {}{place}", s.region));
            continue;
        };
        match (&o.reflector, &s.reflector) {
            (None, Some(r)) => say(app, format!("{name} placed on {r}")),
            (Some(a), Some(b)) if a != b => say(app, format!("{name} moved from {a} to {b}")),
            (Some(a), None) => say(app, format!("{name} lost its reflector {a}")),
            _ => {}
        }
        if o.phase != s.phase {
            say(app, format!("{name} is {:?}", s.phase));
        }
    }
    for (key, s) in &old {
        if !new.contains_key(key) {
            say(
                Some(s.app_id.as_str()),
                format!("shard {} of {}/{} closed", s.name, s.namespace, s.session),
            );
        }
    }
    out
}

/// Appends `events`, dropping the oldest beyond [`KEPT`].
pub fn keep(log: &mut VecDeque<Event>, events: Vec<Event>) {
    for e in events {
        if log.len() == KEPT {
            log.pop_front();
        }
        log.push_back(e);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crd::ShardPhase;
    use crate::view::status::{ReflectorView, RegionView};

    fn reflector(name: &str, state: &'static str) -> ReflectorView {
        ReflectorView {
            name: name.into(),
            state,
            pid: None,
            cpu_percent: None,
            rss_bytes: None,
            url: None,
            files_url: String::new(),
            users: 0,
            shards: vec![],
        }
    }

    pub(crate) fn shard(name: &str, reflector: Option<&str>, phase: ShardPhase) -> ShardView {
        ShardView {
            namespace: "default".into(),
            session: "lobby".into(),
            app_id: "io.app".into(),
            session_name: "lobby".into(),
            name: name.into(),
            index: 0,
            region: "a".into(),
            reflector: reflector.map(str::to_owned),
            url: None,
            files_url: None,
            users: 0,
            max_users: 10,
            threshold_users: 8,
            phase,
        }
    }

    fn status(reflectors: Vec<ReflectorView>, shards: Vec<ShardView>) -> Status {
        Status {
            regions: vec![RegionView {
                pool: "default/p".into(),
                name: "a".into(),
                desired: 1,
                reflectors,
            }],
            shards,
            ..Status::default()
        }
    }

    fn texts(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.text.as_str()).collect()
    }

    #[test]
    fn reflectors_and_shards_changing_are_told_in_words() {
        let empty = status(vec![], vec![]);
        let one = status(
            vec![reflector("a-1", "Starting")],
            vec![shard("lobby", None, ShardPhase::Pending)],
        );
        let events = diff(&empty, &one, 5);
        assert_eq!(
            texts(&events),
            [
                "reflector a-1 started in a (Starting)",
                "shard lobby of default/lobby opened in a"
            ]
        );
        assert_eq!(events[0].app, None);
        assert_eq!(events[1].app.as_deref(), Some("io.app"));
        assert_eq!(events[1].at_ms, 5);
        let placed = status(
            vec![reflector("a-1", "Ready"), reflector("a-2", "Ready")],
            vec![shard("lobby", Some("a-1"), ShardPhase::Open)],
        );
        assert_eq!(
            texts(&diff(&one, &placed, 6)),
            [
                "reflector a-1 is ready",
                "reflector a-2 started in a (Ready)",
                "shard lobby of default/lobby placed on a-1",
                "shard lobby of default/lobby is Open"
            ]
        );
        let moved = status(
            vec![reflector("a-1", "Draining"), reflector("a-2", "Ready")],
            vec![shard("lobby", Some("a-2"), ShardPhase::Full)],
        );
        assert_eq!(
            texts(&diff(&placed, &moved, 7)),
            [
                "reflector a-1 is draining",
                "shard lobby of default/lobby moved from a-1 to a-2",
                "shard lobby of default/lobby is Full"
            ]
        );
        let gone = status(vec![reflector("a-2", "Ready")], vec![]);
        assert_eq!(
            texts(&diff(&moved, &gone, 8)),
            [
                "reflector a-1 stopped",
                "shard lobby of default/lobby closed"
            ]
        );
        assert!(diff(&gone, &gone, 9).is_empty(), "no change, no event");
    }

    #[test]
    fn the_log_keeps_only_the_newest() {
        let mut log = VecDeque::new();
        let e = |i: u64| Event {
            at_ms: i,
            app: None,
            text: format!("e{i}"),
        };
        keep(&mut log, (0..(KEPT as u64 + 5)).map(e).collect());
        assert_eq!(log.len(), KEPT);
        assert_eq!(log.front().unwrap().at_ms, 5);
        assert_eq!(log.back().unwrap().at_ms, KEPT as u64 + 4);
    }
}
