//! Which shard a new user goes to: pure, so the fallback order is tested without a router.

/// A shard the router may send users to, with its load as the router counts it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Index into the caller's list.
    pub index: usize,
    /// Shard number (ties go to the lowest).
    pub number: u32,
    /// Region of its reflector.
    pub region: String,
    /// Users reported plus pending reservations (or the threshold during the warm-up).
    pub load: u64,
}

/// The regions to try, in order: the preferred one (if allowed), then the allowed ones in
/// their order. `Err` names the preferred region when it is not allowed.
pub fn region_order(allowed: &[String], preferred: Option<&str>) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(allowed.len());
    if let Some(p) = preferred.filter(|p| !p.is_empty()) {
        if !allowed.iter().any(|a| a == p) {
            return Err(p.to_owned());
        }
        out.push(p.to_owned());
    }
    out.extend(
        allowed
            .iter()
            .filter(|a| Some(a.as_str()) != preferred)
            .cloned(),
    );
    Ok(out)
}

/// Whether a shard with `load` is below its session's threshold (the planner's rule).
pub fn below_threshold(load: u64, max_users: u32, threshold: f64) -> bool {
    (load as f64) < threshold * f64::from(max_users)
}

/// The smallest load that counts as "at the threshold" (for the post-failover warm-up).
pub fn threshold_load(max_users: u32, threshold: f64) -> u64 {
    (threshold * f64::from(max_users)).ceil().max(0.0) as u64
}

/// Picks a shard: the first region in `order` that has a shard below the threshold, and in
/// it the fullest such shard (so shards fill one after another and empty ones can close),
/// lowest number on ties.
pub fn pick(
    candidates: &[Candidate],
    order: &[String],
    max_users: u32,
    threshold: f64,
) -> Option<usize> {
    order.iter().find_map(|region| {
        candidates
            .iter()
            .filter(|c| &c.region == region && below_threshold(c.load, max_users, threshold))
            .max_by(|a, b| a.load.cmp(&b.load).then(b.number.cmp(&a.number)))
            .map(|c| c.index)
    })
}

/// Picks a shard for an answer that reserves no place (an anonymous caller past its
/// session's share): like [`pick`], else the least loaded shard still below its hard cap,
/// in region order. Never `None` for want of a new shard: such answers open none.
pub fn pick_unreserved(
    candidates: &[Candidate],
    order: &[String],
    max_users: u32,
    threshold: f64,
) -> Option<usize> {
    pick(candidates, order, max_users, threshold).or_else(|| {
        order.iter().find_map(|region| {
            candidates
                .iter()
                .filter(|c| &c.region == region && c.load < u64::from(max_users))
                .min_by(|a, b| a.load.cmp(&b.load).then(a.number.cmp(&b.number)))
                .map(|c| c.index)
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(index: usize, number: u32, region: &str, load: u64) -> Candidate {
        Candidate {
            index,
            number,
            region: region.into(),
            load,
        }
    }

    fn regions(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn preferred_region_first_then_the_allowed_order() {
        let allowed = regions(&["eu", "us", "ap"]);
        assert_eq!(
            region_order(&allowed, Some("us")).unwrap(),
            regions(&["us", "eu", "ap"])
        );
        assert_eq!(region_order(&allowed, None).unwrap(), allowed);
        assert_eq!(region_order(&allowed, Some("")).unwrap(), allowed);
        assert_eq!(region_order(&allowed, Some("mars")), Err("mars".into()));
    }

    #[test]
    fn fills_the_fullest_shard_below_threshold_then_falls_back() {
        let order = regions(&["eu", "us"]);
        let shards = [
            c(0, 0, "eu", 80),
            c(1, 1, "eu", 10),
            c(2, 2, "eu", 79),
            c(3, 3, "us", 0),
        ];
        // 80 is at the threshold (0.8 × 100): skipped; 79 is the fullest below.
        assert_eq!(pick(&shards, &order, 100, 0.8), Some(2));
        let full_eu = [c(0, 0, "eu", 80), c(1, 1, "us", 5), c(2, 2, "us", 5)];
        assert_eq!(
            pick(&full_eu, &order, 100, 0.8),
            Some(1),
            "lowest number on ties"
        );
        assert_eq!(pick(&[c(0, 0, "eu", 80)], &order, 100, 0.8), None);
        assert_eq!(threshold_load(10, 0.8), 8);
        assert_eq!(threshold_load(100, 0.75), 75);
    }

    #[test]
    fn unreserved_answers_use_the_headroom_but_never_past_the_cap() {
        let order = regions(&["eu", "us"]);
        let at_threshold = [c(0, 0, "eu", 8), c(1, 1, "eu", 9), c(2, 2, "us", 10)];
        assert_eq!(pick_unreserved(&at_threshold, &order, 10, 0.8), Some(0));
        let full = [c(0, 0, "eu", 10), c(1, 1, "us", 10)];
        assert_eq!(pick_unreserved(&full, &order, 10, 0.8), None);
        let room = [c(0, 0, "eu", 10), c(1, 1, "us", 3)];
        assert_eq!(pick_unreserved(&room, &order, 10, 0.8), Some(1));
    }

    proptest! {
        /// A picked shard is always below the threshold and in the earliest region that has
        /// any shard below it.
        #[test]
        fn picks_respect_threshold_and_region_order(
            loads in proptest::collection::vec((0u64..12, 0usize..3), 0..20),
        ) {
            let names = ["a", "b", "c"];
            let order = regions(&names);
            let cands: Vec<Candidate> = loads.iter().enumerate()
                .map(|(i, (l, r))| c(i, i as u32, names[*r], *l)).collect();
            match pick(&cands, &order, 10, 0.8) {
                Some(i) => {
                    prop_assert!(cands[i].load < 8);
                    let first = order.iter().position(|r| cands.iter().any(|c| &c.region == r && c.load < 8));
                    prop_assert_eq!(Some(order.iter().position(|r| *r == cands[i].region).unwrap()), first);
                }
                None => prop_assert!(cands.iter().all(|c| c.load >= 8)),
            }
        }
    }
}
