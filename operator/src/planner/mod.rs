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

mod fleet;
mod model;
#[cfg(test)]
mod tests;

use rustc_hash::FxHashMap as HashMap;

pub use model::*;

use fleet::{Fleet, Placed};

use crate::crd::shard_name;

/// Whether a shard with this load has reached its session's threshold.
fn at_threshold(load: u64, policy: &ShardPolicy) -> bool {
    load as f64 >= policy.scale_up_threshold * f64::from(policy.max_users_per_shard)
}

/// Computes the desired state. Pure: the same input always gives the same plan.
pub fn plan(input: &PlanInput) -> Plan {
    let now = input.now;
    let mut fleet = Fleet::new(input);
    let mut decisions = Vec::new();

    const NONE: usize = usize::MAX;
    let session_ids: HashMap<&str, usize> = input
        .sessions
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key.as_str(), i))
        .collect();
    let reflector_ids: HashMap<&str, usize> = input
        .reflectors
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();

    // 1. Existing shards: drop lost and emptied ones, commit the rest where they are.
    let mut shards: Vec<ShardRecord> =
        Vec::with_capacity(input.shards.len() + input.sessions.len());
    // The session index of each shard in `shards` (NONE: its session is gone).
    let mut owner: Vec<usize> = Vec::with_capacity(shards.capacity());
    let mut pending: Vec<usize> = Vec::new();
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for shard in &input.shards {
        let sid = session_ids
            .get(shard.session.as_str())
            .copied()
            .unwrap_or(NONE);
        let session = input.sessions.get(sid).filter(|s| !s.deleted);
        let empty = shard.load() == 0;
        if shard.phase == ShardPhase::Closing && empty {
            decisions.push(Decision::RemoveShard {
                session: shard.session.clone(),
                shard: shard.name.clone(),
                reason: RemoveReason::ClosedEmpty,
            });
            continue;
        }
        let slot = match &shard.reflector {
            Some(name) => match reflector_ids.get(name.as_str()) {
                Some(&slot) => Some(slot),
                None => {
                    decisions.push(Decision::RemoveShard {
                        session: shard.session.clone(),
                        shard: shard.name.clone(),
                        reason: RemoveReason::ReflectorGone,
                    });
                    continue;
                }
            },
            None => None,
        };
        let mut out = shard.clone();
        out.empty_since = if empty {
            Some(shard.empty_since.unwrap_or(now))
        } else {
            None
        };
        if session.is_none() && out.phase != ShardPhase::Closing {
            out.phase = ShardPhase::Closing;
            decisions.push(Decision::CloseShard {
                session: shard.session.clone(),
                shard: shard.name.clone(),
                reason: CloseReason::SessionDeleted,
            });
        }
        match slot {
            Some(slot) => fleet.commit(slot, shard.committed_users),
            None if out.phase == ShardPhase::Closing => {
                // A closing shard that never got a reflector has nobody on it.
                decisions.push(Decision::RemoveShard {
                    session: shard.session.clone(),
                    shard: shard.name.clone(),
                    reason: RemoveReason::ClosedEmpty,
                });
                continue;
            }
            None => pending.push(shards.len()),
        }
        shards.push(out);
        owner.push(sid);
    }
    fleet.index();

    // 2. Pending shards wait for (or get) a reflector again, in their session's regions.
    for &i in &pending {
        let shard = &mut shards[i];
        let Some(session) = input.sessions.get(owner[i]) else {
            continue;
        };
        let Some(&pool) = fleet.pool_ids.get(session.pool.as_str()) else {
            continue;
        };
        fleet.allowed_regions(pool, &session.policy, &mut known, &mut unknown);
        let claim = session.policy.max_users_per_shard;
        shard.reflector = None;
        for &r in &known {
            if let Some(placed) = fleet.place_in(r, claim) {
                shard.region = fleet.regions[r].spec.name.clone();
                shard.committed_users = claim;
                if let Placed::Ready(slot) = placed {
                    let real = fleet.slots[slot]
                        .real
                        .map(|x| input.reflectors[x].name.clone());
                    shard.reflector = real;
                }
                break;
            }
        }
    }

    // 3. Per session: close idle shards, open new ones, set phases.
    // Shards grouped by session, as one flat array: session s owns
    // `grouped[start[s]..start[s + 1]]`.
    let mut start = vec![0usize; input.sessions.len() + 1];
    for &s in &owner {
        if s != NONE {
            start[s + 1] += 1;
        }
    }
    for s in 0..input.sessions.len() {
        start[s + 1] += start[s];
    }
    let mut grouped = vec![0usize; start[input.sessions.len()]];
    let mut fill = start.clone();
    for (i, &s) in owner.iter().enumerate() {
        if s != NONE {
            grouped[fill[s]] = i;
            fill[s] += 1;
        }
    }
    for (s, session) in input.sessions.iter().enumerate() {
        if session.deleted {
            continue;
        }
        let policy = &session.policy;
        let Some(&pool) = fleet.pool_ids.get(session.pool.as_str()) else {
            decisions.push(Decision::SessionDegraded {
                session: session.key.clone(),
                reason: Reason::PoolNotFound,
                message: format!("no ReflectorPool {} in this namespace", session.pool),
            });
            continue;
        };
        fleet.allowed_regions(pool, policy, &mut known, &mut unknown);
        let allowed = &known;
        if !unknown.is_empty() {
            decisions.push(Decision::SessionDegraded {
                session: session.key.clone(),
                reason: Reason::UnknownRegion,
                message: format!("pool {} has no region {}", session.pool, unknown.join(", ")),
            });
        }
        let mine = &mut grouped[start[s]..start[s + 1]];
        // Close idle shards beyond minShards, highest numbers first.
        let mut live = mine
            .iter()
            .filter(|&&i| shards[i].phase != ShardPhase::Closing)
            .count();
        mine.sort_by_key(|&i| std::cmp::Reverse(shards[i].index));
        // Live shards below the threshold: the last of them is kept even when idle, as long as
        // other shards are live (all at their threshold): closing it would only make the rule
        // below open another one at once.
        let mut below_live = mine
            .iter()
            .filter(|&&i| {
                shards[i].phase != ShardPhase::Closing && !at_threshold(shards[i].load(), policy)
            })
            .count();
        for &i in mine.iter() {
            let shard = &mut shards[i];
            if shard.phase == ShardPhase::Closing || live <= policy.min_shards as usize {
                continue;
            }
            let is_below = !at_threshold(shard.load(), policy);
            if is_below && below_live == 1 && live > 1 {
                continue;
            }
            if let Some(since) = shard.empty_since
                && now.saturating_sub(since) >= policy.close_idle_after
            {
                shard.phase = ShardPhase::Closing;
                live -= 1;
                below_live -= usize::from(is_below);
                decisions.push(Decision::CloseShard {
                    session: session.key.clone(),
                    shard: shard.name.clone(),
                    reason: CloseReason::Idle,
                });
            }
        }
        // Open shards while below minShards, or while every live shard is at its threshold.
        let mut used: Vec<u32> = mine.iter().map(|&i| shards[i].index).collect();
        let mut below = mine.iter().any(|&i| {
            shards[i].phase != ShardPhase::Closing && !at_threshold(shards[i].load(), policy)
        });
        loop {
            let reason = if live < policy.min_shards as usize {
                OpenReason::MinShards
            } else if !below && live < policy.max_shards as usize && (live > 0 || session.waiting) {
                OpenReason::AllShardsAtThreshold
            } else {
                if !below && live > 0 && live >= policy.max_shards as usize {
                    decisions.push(Decision::SessionDegraded {
                        session: session.key.clone(),
                        reason: Reason::MaxShardsReached,
                        message: format!(
                            "all {live} shards are at the scale-up threshold and maxShards is {}",
                            policy.max_shards
                        ),
                    });
                }
                break;
            };
            let mut tried = Vec::new();
            let mut placed = None;
            for &r in allowed {
                if let Some(p) = fleet.place_in(r, policy.max_users_per_shard) {
                    placed = Some((r, p));
                    break;
                }
                tried.push(fleet.regions[r].spec.name.clone());
            }
            let Some((r, p)) = placed else {
                decisions.push(Decision::SessionDegraded {
                    session: session.key.clone(),
                    reason: Reason::CapacityExhausted,
                    message: "every allowed region is at maxReflectors with no room for a shard"
                        .to_owned(),
                });
                break;
            };
            let index = (0..).find(|n| !used.contains(n)).unwrap_or(0);
            used.push(index);
            let reflector = match p {
                Placed::Ready(slot) => fleet.slots[slot]
                    .real
                    .map(|x| input.reflectors[x].name.clone()),
                Placed::Pending => None,
            };
            let name = shard_name(&session.name, index);
            let region = fleet.regions[r].spec.name.clone();
            decisions.push(Decision::OpenShard {
                session: session.key.clone(),
                shard: name.clone(),
                region: region.clone(),
                reflector: reflector.clone(),
                reason,
                fell_back_from: tried,
            });
            shards.push(ShardRecord {
                session: session.key.clone(),
                name,
                index,
                pool: session.pool.clone(),
                region,
                reflector,
                committed_users: policy.max_users_per_shard,
                users: 0,
                reserved: 0,
                phase: ShardPhase::Open,
                empty_since: Some(now),
            });
            owner.push(s);
            live += 1;
            below = true;
        }
    }

    // Phases of the shards that are not closing.
    for (shard, &s) in shards.iter_mut().zip(&owner) {
        if shard.phase == ShardPhase::Closing {
            continue;
        }
        let policy = input.sessions.get(s).map(|s| &s.policy);
        shard.phase = match (&shard.reflector, policy) {
            (None, _) => ShardPhase::Pending,
            (Some(_), Some(p)) if at_threshold(shard.load(), p) => ShardPhase::Full,
            (Some(_), _) => ShardPhase::Open,
        };
    }

    // 4. Reflectors: drain old images and orphans, remove drained empty ones, size regions.
    let mut actions: Vec<ReflectorAction> = vec![ReflectorAction::Keep; input.reflectors.len()];
    let grace = |region: usize| {
        fleet
            .regions
            .get(region)
            .map(|r| input.pools[r.pool].drain_grace)
            .unwrap_or(0)
    };
    for (slot, s) in fleet.slots.iter().enumerate() {
        let Some(i) = s.real else { continue };
        let r = &input.reflectors[i];
        if r.state == ReflectorState::Draining {
            if s.shards == 0 {
                actions[i] = ReflectorAction::Remove;
                decisions.push(Decision::RemoveReflector {
                    reflector: r.name.clone(),
                });
            }
        } else if !s.usable {
            let reason = if s.region == usize::MAX {
                DrainReason::RegionRemoved
            } else {
                DrainReason::ImageChanged
            };
            let deadline = now + grace(fleet.slots[slot].region);
            actions[i] = ReflectorAction::Drain { deadline };
            decisions.push(Decision::DrainReflector {
                reflector: r.name.clone(),
                reason,
                deadline,
            });
        }
    }

    let mut history = input.history.clone();
    let mut regions_out = Vec::with_capacity(fleet.regions.len());
    // Empty usable reflectors per region, as drain candidates.
    let mut empties: Vec<Vec<usize>> = vec![Vec::new(); fleet.regions.len()];
    let mut busy = vec![0u32; fleet.regions.len()];
    let mut ready = vec![0u32; fleet.regions.len()];
    let mut starting = vec![0u32; fleet.regions.len()];
    let mut draining = vec![0u32; fleet.regions.len()];
    let mut committed = vec![(0u64, 0u64); fleet.regions.len()];
    for s in &fleet.slots {
        if s.region == usize::MAX {
            continue;
        }
        let cap = s
            .real
            .map(|i| input.reflectors[i].capacity)
            .unwrap_or(fleet.regions[s.region].spec.capacity);
        let c = &mut committed[s.region];
        c.0 += u64::from(s.shards);
        c.1 += (i64::from(cap.users) - s.free_users).max(0) as u64;
        match s.real {
            Some(i) if s.usable => {
                if s.shards == 0 {
                    empties[s.region].push(i);
                } else {
                    busy[s.region] += 1;
                }
                if s.ready {
                    ready[s.region] += 1;
                } else {
                    starting[s.region] += 1;
                }
            }
            Some(_) => draining[s.region] += 1,
            None => {}
        }
    }
    for (r, region) in fleet.regions.iter().enumerate() {
        let pool = &input.pools[region.pool];
        let spec = region.spec;
        let key = (pool.id.clone(), spec.name.clone());
        let h = history.entry(key).or_default();
        let wanted = busy[r] + region.to_create + spec.warm_buffer;
        let desired = wanted.clamp(
            spec.min_reflectors,
            spec.max_reflectors.max(spec.min_reflectors),
        );
        let usable = region.usable;
        let mut create = 0;
        if desired > usable {
            let urgent = region.to_create > 0 || usable < spec.min_reflectors;
            let reason = if region.to_create > 0 {
                ScaleUpReason::PendingShards
            } else if usable < spec.min_reflectors {
                ScaleUpReason::MinReflectors
            } else {
                ScaleUpReason::WarmBuffer
            };
            let held_until = h
                .last_down_at
                .map(|t| t + pool.cooldown)
                .filter(|&t| now < t);
            match held_until {
                Some(until) if !urgent => decisions.push(Decision::ScaleHeld {
                    pool: pool.id.clone(),
                    region: spec.name.clone(),
                    direction: ScaleDirection::Up,
                    until,
                }),
                _ => {
                    create = (desired - usable).max(region.to_create);
                    decisions.push(Decision::ScaleUp {
                        pool: pool.id.clone(),
                        region: spec.name.clone(),
                        from: usable,
                        to: usable + create,
                        reason,
                        urgent,
                    });
                    if h.last_direction != Some(ScaleDirection::Up) {
                        h.last_change_at = now;
                    }
                    h.last_direction = Some(ScaleDirection::Up);
                    h.last_up_at = Some(now);
                }
            }
        } else if desired < usable && !empties[r].is_empty() {
            let held_until = h.last_up_at.map(|t| t + pool.cooldown).filter(|&t| now < t);
            if let Some(until) = held_until {
                decisions.push(Decision::ScaleHeld {
                    pool: pool.id.clone(),
                    region: spec.name.clone(),
                    direction: ScaleDirection::Down,
                    until,
                });
            } else {
                let candidates = &mut empties[r];
                // Starting reflectors first, then the highest names.
                candidates.sort_by(|&a, &b| {
                    let (a, b) = (&input.reflectors[a], &input.reflectors[b]);
                    (a.state != ReflectorState::Starting, &b.name)
                        .cmp(&(b.state != ReflectorState::Starting, &a.name))
                });
                let n = (usable - desired).min(candidates.len() as u32);
                let deadline = now + pool.drain_grace;
                for &i in candidates.iter().take(n as usize) {
                    actions[i] = ReflectorAction::Drain { deadline };
                    decisions.push(Decision::DrainReflector {
                        reflector: input.reflectors[i].name.clone(),
                        reason: DrainReason::Surplus,
                        deadline,
                    });
                    if input.reflectors[i].state == ReflectorState::Ready {
                        ready[r] -= 1;
                    } else {
                        starting[r] -= 1;
                    }
                    draining[r] += 1;
                }
                if h.last_direction != Some(ScaleDirection::Down) {
                    h.last_change_at = now;
                }
                h.last_direction = Some(ScaleDirection::Down);
                h.last_down_at = Some(now);
            }
        }
        regions_out.push(RegionPlan {
            pool: pool.id.clone(),
            region: spec.name.clone(),
            image: spec.image.clone(),
            ready: ready[r],
            starting: starting[r],
            draining: draining[r],
            desired,
            create,
            committed_shards: committed[r].0,
            committed_users: committed[r].1,
        });
    }

    Plan {
        shards,
        reflectors: input
            .reflectors
            .iter()
            .zip(actions)
            .map(|(r, action)| ReflectorPlan {
                name: r.name.clone(),
                action,
            })
            .collect(),
        regions: regions_out,
        decisions,
        history,
    }
}
