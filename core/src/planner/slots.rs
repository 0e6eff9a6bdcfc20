//! The capacity ledger: every reflector slot (observed, or one the plan creates) with what it
//! has left, and per region the slots that can take a shard, ordered by free users so a
//! placement is a range lookup rather than a scan (the planner runs over 100 000 sessions).

use std::collections::BTreeSet;

use rustc_hash::FxHashMap as HashMap;

use super::model::*;

/// In [`Slot::region`]: the reflector's pool or region no longer exists.
pub(super) const NO_REGION: usize = usize::MAX;

/// A reflector slot: an observed reflector or one the plan creates.
pub(super) struct Slot {
    /// Index in `SlotTable::regions`, or [`NO_REGION`].
    pub(super) region: usize,
    /// Index into `input.reflectors`, `None` for a reflector to create.
    pub(super) real: Option<usize>,
    /// Takes new shards (current image, not draining).
    pub(super) usable: bool,
    pub(super) ready: bool,
    pub(super) free_users: i64,
    pub(super) free_sessions: i64,
    pub(super) shards: u32,
}

/// One region of one pool, with its placement indexes.
pub(super) struct Region<'a> {
    pub(super) pool: usize,
    pub(super) spec: &'a RegionInput,
    /// Ready usable slots with a free session slot, by free users.
    pub(super) ready: BTreeSet<(i64, usize)>,
    /// Starting or to-create usable slots with a free session slot, by free users.
    pub(super) waiting: BTreeSet<(i64, usize)>,
    pub(super) usable: u32,
    pub(super) to_create: u32,
}

/// The slot table the planner places shards into: its own view of capacity, not the local
/// backend's process fleet (`local::fleet::Fleet`) nor the router's (`router::view::FleetState`).
pub(super) struct SlotTable<'a> {
    pub(super) input: &'a PlanInput,
    pub(super) slots: Vec<Slot>,
    pub(super) regions: Vec<Region<'a>>,
    /// `(pool, region name)` → region index.
    region_ids: HashMap<(&'a str, &'a str), usize>,
    pub(super) pool_ids: HashMap<&'a str, usize>,
}

/// Where a shard went.
pub(super) enum Placed {
    Ready(usize),
    Pending,
}

impl<'a> SlotTable<'a> {
    pub(super) fn new(input: &'a PlanInput) -> Self {
        let mut pool_ids = HashMap::default();
        let mut region_ids = HashMap::default();
        let mut regions = Vec::new();
        for (p, pool) in input.pools.iter().enumerate() {
            pool_ids.insert(pool.id.as_str(), p);
            for spec in &pool.regions {
                region_ids.insert((pool.id.as_str(), spec.name.as_str()), regions.len());
                regions.push(Region {
                    pool: p,
                    spec,
                    ready: BTreeSet::new(),
                    waiting: BTreeSet::new(),
                    usable: 0,
                    to_create: 0,
                });
            }
        }
        let slots = input
            .reflectors
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let region = region_ids
                    .get(&(r.pool.as_str(), r.region.as_str()))
                    .copied()
                    .unwrap_or(NO_REGION);
                let current = region != NO_REGION && r.image == regions[region].spec.image;
                let usable = current && r.state != ReflectorState::Draining;
                if usable {
                    regions[region].usable += 1;
                }
                Slot {
                    region,
                    real: Some(i),
                    usable,
                    ready: r.state == ReflectorState::Ready,
                    free_users: i64::from(r.capacity.users),
                    free_sessions: i64::from(r.capacity.sessions),
                    shards: 0,
                }
            })
            .collect();
        SlotTable {
            input,
            slots,
            regions,
            region_ids,
            pool_ids,
        }
    }

    /// Charges a shard to a slot (no capacity check: used for shards already there).
    pub(super) fn commit(&mut self, slot: usize, users: u32) {
        let s = &mut self.slots[slot];
        s.free_users -= i64::from(users);
        s.free_sessions -= 1;
        s.shards += 1;
    }

    /// Builds the placement indexes once the existing shards are committed.
    pub(super) fn index(&mut self) {
        for (i, s) in self.slots.iter().enumerate() {
            if s.usable && s.free_sessions > 0 && s.free_users > 0 {
                let r = &mut self.regions[s.region];
                if s.ready {
                    r.ready.insert((s.free_users, i));
                } else {
                    r.waiting.insert((s.free_users, i));
                }
            }
        }
    }

    fn pick(
        set: &BTreeSet<(i64, usize)>,
        claim: i64,
        strategy: PlacementStrategy,
    ) -> Option<usize> {
        match strategy {
            PlacementStrategy::Pack => set.range((claim, 0)..).next().map(|&(_, i)| i),
            PlacementStrategy::Spread => set.last().filter(|(f, _)| *f >= claim).map(|&(_, i)| i),
        }
    }

    /// Places a shard committing `claim` users in region `r`, if the region has room now,
    /// soon (a starting reflector), or can grow.
    pub(super) fn place_in(&mut self, r: usize, claim: u32) -> Option<Placed> {
        let strategy = self.input.pools[self.regions[r].pool].placement;
        let c = i64::from(claim);
        let region = &self.regions[r];
        let (slot, ready) = if let Some(s) = Self::pick(&region.ready, c, strategy) {
            (s, true)
        } else if let Some(s) = Self::pick(&region.waiting, c, strategy) {
            (s, false)
        } else {
            let spec = region.spec;
            let fits = i64::from(spec.capacity.users) >= c && spec.capacity.sessions > 0;
            if !fits || region.usable + region.to_create >= spec.max_reflectors {
                return None;
            }
            let s = self.slots.len();
            self.slots.push(Slot {
                region: r,
                real: None,
                usable: true,
                ready: false,
                free_users: i64::from(spec.capacity.users),
                free_sessions: i64::from(spec.capacity.sessions),
                shards: 0,
            });
            let region = &mut self.regions[r];
            region.to_create += 1;
            region.waiting.insert((i64::from(spec.capacity.users), s));
            (s, false)
        };
        self.take(slot, claim);
        Some(if ready {
            Placed::Ready(slot)
        } else {
            Placed::Pending
        })
    }

    /// Commits `claim` users on `slot`, keeping its region's placement index in step (the
    /// caller has checked the room).
    pub(super) fn take(&mut self, slot: usize, claim: u32) {
        let s = &self.slots[slot];
        let (r, ready, key) = (s.region, s.ready, (s.free_users, slot));
        let region = &mut self.regions[r];
        let set = if ready {
            &mut region.ready
        } else {
            &mut region.waiting
        };
        set.remove(&key);
        self.commit(slot, claim);
        let s = &self.slots[slot];
        if s.free_sessions > 0 && s.free_users > 0 {
            let region = &mut self.regions[r];
            let set = if ready {
                &mut region.ready
            } else {
                &mut region.waiting
            };
            set.insert((s.free_users, slot));
        }
    }

    /// Whether ready, usable `slot` can take one more shard committing `claim` users.
    pub(super) fn has_room(&self, slot: usize, claim: u32) -> bool {
        let s = &self.slots[slot];
        s.usable && s.ready && s.free_sessions > 0 && s.free_users >= i64::from(claim)
    }

    /// The ready slots of region `r` that could take a shard committing `claim` users, in
    /// the pool's placement order (packing: fullest first; spreading: emptiest first).
    pub(super) fn ready_candidates(&self, r: usize, claim: u32) -> Vec<usize> {
        let strategy = self.input.pools[self.regions[r].pool].placement;
        let fits = self.regions[r]
            .ready
            .range((i64::from(claim), 0)..)
            .map(|&(_, i)| i);
        match strategy {
            PlacementStrategy::Pack => fits.collect(),
            PlacementStrategy::Spread => fits.rev().collect(),
        }
    }

    /// Index of region `name` of pool `pool`.
    pub(super) fn region_index(&self, pool: &str, name: &str) -> Option<usize> {
        self.region_ids.get(&(pool, name)).copied()
    }

    /// Fills `known` with the regions a session may use, in order, and `unknown` with the
    /// names it lists that the pool lacks (buffers are reused: this runs once per session).
    pub(super) fn allowed_regions(
        &self,
        pool: usize,
        policy: &'a ShardPolicy,
        known: &mut Vec<usize>,
        unknown: &mut Vec<&'a str>,
    ) {
        known.clear();
        unknown.clear();
        let pool_id = self.input.pools[pool].id.as_str();
        if policy.regions.is_empty() {
            known.extend(
                self.input.pools[pool]
                    .regions
                    .iter()
                    .filter_map(|r| self.region_ids.get(&(pool_id, r.name.as_str())).copied()),
            );
            return;
        }
        for name in &policy.regions {
            match self.region_ids.get(&(pool_id, name.as_str())) {
                Some(&r) => known.push(r),
                None => unknown.push(name.as_str()),
            }
        }
    }
}
