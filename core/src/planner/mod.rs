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
//! and comes back as input; the controllers keep it. The router opens a shard at once with
//! [`plan_shards`] on one session's input ([`session_input`]), its reservations counted.
//!
//! ## Rules
//!
//! - **Commitment.** A shard commits its session's `maxUsersPerShard` (the hard cap its
//!   reflector enforces) and one session slot on its reflector. New placements never exceed
//!   a reflector's capacity, so no reflector can be overfilled however its shards grow.
//! - **Packing** (default): a new shard goes to the fullest ready reflector with room (best
//!   fit); **spreading** picks the emptiest. Existing shards stay where they are unless the
//!   pool's moves are on (below).
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
//! - **Moves** (only for a pool whose [`MovePolicy`] is on; they need the regional gateway,
//!   through which clients reconnect to wherever the shard went). A shard moves to another
//!   ready reflector of its region: when an operator asks ([`MoveRequest`]), when its
//!   reflector drains (instead of waiting for its users to leave; if no reflector has room,
//!   the room is held on a new one and the move starts once it is ready), and to rebalance a
//!   reflector whose connected users pass `rebalance_above` of its capacity (largest shards
//!   first, each to the least loaded reflector that stays at or below `rebalance_target`,
//!   none moved again within the cool-down). At most `max_concurrent` moves per pool are in
//!   flight. A moving shard is `Moving` (not routable) and holds room on both reflectors
//!   until the controllers swap it to its target; a move whose target vanishes is given up,
//!   and a shard whose source vanishes mid-move lands on its target. With moves on, the
//!   shards of a reflector that disappears are placed again (in their own region first)
//!   instead of being dropped, and resume there from storage.
//! - **Sizing.** A region wants `busy + pending + warmBuffer` reflectors, within
//!   `[minReflectors, maxReflectors]`; surplus empty reflectors drain.
//! - **No flapping.** A region scales down only a cool-down after its last scale-up, and up
//!   only a cool-down after its last scale-down — so two changes of direction are always at
//!   least a cool-down apart — except an *urgent* scale-up (shards pending, or below
//!   `minReflectors`), which is never held because it would refuse users.
//!
//! ## Phases
//!
//! `plan` runs these phases in this order over one `PlanState` (the input, the capacity
//! ledger of `slots.rs`, the plan being built and per-session and per-region working data).
//! Each phase only reads what earlier ones wrote, and decisions are appended as the phases
//! run, so a plan's decisions read in this order too.
//!
//! 1. **Index** (`PlanState::new`, `state.rs`): the observed reflectors into the ledger by
//!    region, sessions and reflectors by name.
//! 2. **Adopt** (`adopt_shards`, `adopt.rs`): the previous plan's shards stay where they
//!    are and their commitment is charged (a moving one's on its target too); lost ones drop
//!    (or wait to be placed again, with moves on), a deleted session's close. First, because
//!    nothing new may take the room existing shards hold.
//! 3. **Place pending** (`place_pending`): shards still without a reflector get one, before
//!    any session opens a shard, because the opening rule already counts them as live.
//! 4. **Per session**, in input order (`sessions.rs`), over its shards grouped once
//!    (`group_by_session`): the regions it may use (`session_regions`), then **close idle**
//!    shards (`close_idle`), then **open** shards (`open_shards`). Closing goes first so
//!    opening sees only the shards that stay; sessions go one at a time because each opening
//!    takes room the next one will not find.
//! 5. **Shard phases** (`set_shard_phases`): pending, full or open, once every placement is
//!    final.
//! 6. **Drain stale** (`drain_stale`, `drain.rs`): old images and orphans drain, empty
//!    draining reflectors go. It needs only the adopted shards (nothing new lands on a
//!    reflector that takes no shards) and runs here so that the decisions about shards come
//!    before those about reflectors.
//! 7. **Moves** (`plan_moves`, `moves.rs`): requested moves, then the shards of draining
//!    reflectors, then rebalancing, within each pool's cap. After draining, because a
//!    reflector drained by this plan sends its shards away in this plan too; before sizing,
//!    because the room a move holds (on a reflector to create, when none has room) is demand.
//! 8. **Size**, per region (`size.rs`): count its reflectors (`tally_regions`), the size it
//!    wants (`size_region`: busy + to create + warm buffer), then **scale up** (`scale_up`)
//!    or **down** (`scale_down` in `drain.rs`, which picks the empty reflectors to drain),
//!    each held by the cool-down. Last, because the demand it sizes for is what placement
//!    made of the fleet.
//! 9. **Emit** (`PlanState::finish`): the [`Plan`].
//!
//! [`plan_shards`] runs phases 1 to 5 alone. With [`session_input`] it opens the shards of
//! one session without planning its pool (`narrow.rs`): how the router opens a shard the
//! moment a Route needs one.

mod adopt;
mod drain;
mod model;
mod moves;
mod narrow;
mod sessions;
mod size;
mod slots;
mod state;
#[cfg(test)]
mod tests;

pub use model::*;
pub use narrow::{
    Held, HeldRoom, ShardPlan, holds_room, plan_shards, pool_reflectors, room_left, session_input,
    with_room_left,
};

use state::PlanState;

// The table tests name shards with it (they see this module's names).
#[cfg(test)]
use crate::shard::shard_name;

/// Whether a shard with this load has reached its session's threshold.
fn at_threshold(load: u64, policy: &ShardPolicy) -> bool {
    load as f64 >= policy.scale_up_threshold * f64::from(policy.max_users_per_shard)
}

/// Computes the desired state. Pure: the same input always gives the same plan.
pub fn plan(input: &PlanInput) -> Plan {
    let mut state = PlanState::new(input);
    state.place_shards();
    state.drain_stale();
    state.plan_moves();
    state.tally_regions();
    for r in 0..state.table.regions.len() {
        state.size_region(r);
        state.scale_up(r);
        state.scale_down(r);
    }
    state.finish()
}

impl PlanState<'_> {
    /// Phases 2 to 5: every shard placed and in its phase. [`plan`] goes on with the
    /// reflectors; [`plan_shards`] stops here.
    fn place_shards(&mut self) {
        self.adopt_shards();
        self.place_pending();
        self.group_by_session();
        for s in 0..self.input.sessions.len() {
            if self.session_regions(s) {
                self.close_idle(s);
                self.open_shards(s);
            }
        }
        self.set_shard_phases();
    }
}
