//! # The planner: all placement and scaling policy, as a pure function
//!
//! ```text
//!   [Session] -> [Shard] -> [Reflector] <- [ReflectorPool/region]
//!    policy      name~N      capacity        image, min/max,
//!                load        state           warm buffer, cool-down
//! ```
//!
//! [`plan`] maps a [`PlanInput`] — pools, sessions, observed reflectors, the shards of the
//! previous plan with their current load, the scaling history and the time — to a [`Plan`]:
//! every shard with its placement and phase, what to do with every reflector, how many
//! reflectors each region should have, and a [`Decision`] with a reason for each change. It
//! does no I/O and reads no clock, so the same input always gives the same plan. The state
//! it needs between runs (shards, `empty_since`, the scaling history) is part of its output
//! and comes back as input; the controllers keep it, the router calls `plan` with its own
//! reservations to open a shard at once.
//!
//! ## Rules
//!
//! - **Commitment.** A shard commits its session's `maxUsersPerShard` (the hard cap its
//!   reflector enforces) and one session slot on its reflector. New placements never exceed
//!   a reflector's capacity, so no reflector can be overfilled however its shards grow.
//! - **Packing** (default): a new shard goes to the fullest ready reflector with room (best
//!   fit); **spreading** picks the emptiest. Existing shards never move.
//! - **Opening.** A session gets a new shard when it has fewer than `minShards`, or when no
//!   shard is below its threshold (`users + reserved >= threshold × maxUsersPerShard` on all
//!   of them), up to `maxShards`. Its lowest free shard number is used. A session with
//!   `minShards: 0` and no shard opens one only when a client waits for a route.
//! - **Regions.** A shard opens in the first allowed region with room; a region without room
//!   that can still grow gets the shard as *pending* (and a new reflector); a region at
//!   `maxReflectors` is skipped for the next one. If every region is full,
//!   `CapacityExhausted`.
//! - **Closing.** A shard empty for `closeIdleShardsAfterSeconds` closes (if the session has
//!   more than `minShards`), except the last shard below the threshold while the session's
//!   other shards are all at it (it is the standby the opening rule would recreate at once);
//!   a closing shard takes no new users and is removed once empty.
//!   A deleted session's shards all close.
//! - **Draining.** Reflectors are never removed while they host a shard: they drain first
//!   (no new shards) and are removed when empty. Reflectors of an old image drain at once,
//!   new ones take the new shards: a rolling update over live sessions.
//! - **Sizing.** A region wants `busy + pending + warmBuffer` reflectors, within
//!   `[minReflectors, maxReflectors]`; surplus empty reflectors drain.
//! - **No flapping.** A region scales down only a cool-down after its last scale-up, and up
//!   only a cool-down after its last scale-down — so two changes of direction are always at
//!   least a cool-down apart — except an *urgent* scale-up (shards pending, or below
//!   `minReflectors`), which is never held because it would refuse users.

mod adopt;
mod drain;
mod fleet;
mod model;
mod sessions;
mod size;
mod state;
#[cfg(test)]
mod tests;

pub use model::*;

use state::PlanState;

// The table tests name shards with it (they see this module's names).
#[cfg(test)]
use crate::crd::shard_name;

/// Whether a shard with this load has reached its session's threshold.
fn at_threshold(load: u64, policy: &ShardPolicy) -> bool {
    load as f64 >= policy.scale_up_threshold * f64::from(policy.max_users_per_shard)
}

/// Computes the desired state. Pure: the same input always gives the same plan.
pub fn plan(input: &PlanInput) -> Plan {
    let mut state = PlanState::new(input);
    state.adopt_shards();
    state.place_pending();
    state.group_by_session();
    for s in 0..input.sessions.len() {
        if state.session_regions(s) {
            state.close_idle(s);
            state.open_shards(s);
        }
    }
    state.set_shard_phases();
    state.drain_stale();
    state.tally_regions();
    for r in 0..state.fleet.regions.len() {
        state.size_region(r);
        state.scale_up(r);
        state.scale_down(r);
    }
    state.finish()
}
