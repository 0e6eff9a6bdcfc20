//! The last minutes of the fleet for the view's charts: users per region and the Route
//! rate, one sample every [`EVERY_MS`], at most [`KEPT`] of them.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::status::Status;

/// Time between two samples.
pub const EVERY_MS: u64 = 2_000;
/// Samples kept: five minutes.
pub const KEPT: usize = 150;

/// One sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// Users connected in each region.
    pub users: BTreeMap<String, u32>,
    /// Route calls per second since the previous sample.
    pub routes_per_sec: f64,
}

fn region_users(status: &Status) -> BTreeMap<String, u32> {
    status
        .regions
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.reflectors
                    .iter()
                    .fold(0u32, |a, x| a.saturating_add(x.users)),
            )
        })
        .collect()
}

/// The samples and what the next one is measured against.
#[derive(Clone, Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// The Route counter at the last sample.
    last_routes: Option<u64>,
}

impl History {
    /// Takes a sample at `at_ms` unless the last one is younger than [`EVERY_MS`], in which
    /// case the last sample's users are brought up to date instead (the charts' latest
    /// values then agree with the tables). True when the samples changed. `routes_total` is
    /// the Route counter now (it only grows).
    pub fn sample(&mut self, status: &Status, routes_total: u64, at_ms: u64) -> bool {
        let users = region_users(status);
        let last = self.samples.back_mut();
        if let Some(last) = last
            && at_ms.saturating_sub(last.at_ms) < EVERY_MS
        {
            let changed = last.users != users;
            last.users = users;
            return changed;
        }
        let last = self.samples.back().map(|s| s.at_ms);
        let routes_per_sec = match (last, self.last_routes) {
            (Some(t), Some(r)) if at_ms > t => {
                routes_total.saturating_sub(r) as f64 * 1000.0 / (at_ms - t) as f64
            }
            _ => 0.0,
        };
        if self.samples.len() == KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            at_ms,
            users,
            routes_per_sec,
        });
        self.last_routes = Some(routes_total);
        true
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> + '_ {
        self.samples.iter()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(users: u32) -> Status {
        crate::view::status::one_reflector(users, &[])
    }

    #[test]
    fn samples_are_spaced_bounded_and_measure_the_route_rate() {
        let mut h = History::default();
        assert!(h.sample(&status(1), 100, 0));
        assert!(
            !h.sample(&status(1), 150, EVERY_MS - 1),
            "too soon, nothing new"
        );
        assert!(
            h.sample(&status(2), 150, EVERY_MS - 1),
            "too soon, newer users"
        );
        assert_eq!(h.samples().count(), 1);
        assert_eq!(h.samples().next().unwrap().users["a"], 2);
        assert!(h.sample(&status(3), 110, EVERY_MS));
        let s: Vec<_> = h.samples().collect();
        assert_eq!(
            s[0].routes_per_sec, 0.0,
            "nothing to compare the first with"
        );
        assert_eq!(s[1].users["a"], 3);
        // 10 Route calls in 2 s.
        assert!(
            (s[1].routes_per_sec - 5.0).abs() < 1e-9,
            "{}",
            s[1].routes_per_sec
        );
        for i in 2..(KEPT as u64 + 10) {
            h.sample(&status(0), 110, i * EVERY_MS);
        }
        assert_eq!(h.samples().count(), KEPT);
        assert_eq!(h.samples().next().unwrap().at_ms, 10 * EVERY_MS);
    }
}
