//! Planner decisions as text: what `refleet up` logs and what the kube backend posts as
//! Events, written once.

use refleet_core::planner::{Decision, RemoveReason};

/// What a decision is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum About {
    /// A concrete session (its planner key).
    Session(String),
    /// A pool (its id).
    Pool(String),
    /// A reflector of the pool being planned (its name).
    Reflector(String),
}

/// How much a decision matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Repeats every round while it holds (a held scaling step): a debug log, no Event.
    Routine,
    /// A normal step.
    Normal,
    /// Something is wrong or degraded.
    Warning,
}

/// One decision (or part of one) as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// What it is about.
    pub about: About,
    /// How much it matters.
    pub level: Level,
    /// A short CamelCase reason (the Event's reason).
    pub reason: &'static str,
    /// What was done, in CamelCase (the Event's action): the reason but for a shard placed
    /// outside its preferred regions (`PlaceShard`) and a degraded session (`Degraded`).
    pub action: &'static str,
    /// The sentence (the Event's note, the log line).
    pub note: String,
    /// Whether the kube backend posts it as an Event on every plan (a degraded session gets
    /// its Event when its condition changes instead).
    pub event: bool,
}

/// The summaries of one decision: one, or two for a shard that opened outside the regions
/// it preferred (`RegionFull`, then `ShardOpened`).
pub fn summarize(decision: &Decision) -> Vec<Summary> {
    let one = |about, level, reason, note| Summary {
        about,
        level,
        reason,
        action: if reason == "RegionFull" {
            "PlaceShard"
        } else {
            reason
        },
        note,
        event: level != Level::Routine,
    };
    let session = |key: &String| About::Session(key.clone());
    match decision {
        Decision::OpenShard {
            session: key,
            shard,
            region,
            reflector,
            fell_back_from,
            ..
        } => {
            let mut out = Vec::new();
            if !fell_back_from.is_empty() {
                out.push(one(
                    session(key),
                    Level::Warning,
                    "RegionFull",
                    format!(
                        "regions {} are full; shard {shard} opens in {region}",
                        fell_back_from.join(", ")
                    ),
                ));
            }
            let note = match reflector {
                Some(r) => format!("shard {shard} opened in region {region} on {r}"),
                None => format!("shard {shard} opened in region {region}; waiting for a reflector"),
            };
            out.push(one(session(key), Level::Normal, "ShardOpened", note));
            out
        }
        Decision::CloseShard {
            session: key,
            shard,
            reason,
        } => vec![one(
            session(key),
            Level::Normal,
            "ShardClosing",
            format!("shard {shard} takes no new users ({reason:?})"),
        )],
        Decision::RemoveShard {
            session: key,
            shard,
            reason,
        } => vec![match reason {
            RemoveReason::ClosedEmpty => one(
                session(key),
                Level::Normal,
                "ShardClosed",
                format!("shard {shard} closed"),
            ),
            RemoveReason::ReflectorGone => one(
                session(key),
                Level::Warning,
                "ShardLost",
                format!("the reflector of shard {shard} is gone"),
            ),
        }],
        Decision::MoveShard {
            session: key,
            shard,
            from,
            to,
            reason,
        } => vec![one(
            session(key),
            Level::Normal,
            "ShardMoving",
            format!("shard {shard} moves from {from} to {to} ({reason:?})"),
        )],
        Decision::MoveAborted {
            session: key,
            shard,
            to,
        } => vec![one(
            session(key),
            Level::Warning,
            "MoveAborted",
            format!("the move of shard {shard} is given up: its target {to} is gone"),
        )],
        Decision::MoveHeld {
            session: key,
            shard,
            reason,
        } => vec![one(
            session(key),
            Level::Warning,
            "MoveHeld",
            format!("the requested move of shard {shard} did not start ({reason:?})"),
        )],
        Decision::ReassignShard {
            session: key,
            shard,
            from,
        } => vec![one(
            session(key),
            Level::Warning,
            "ShardReassigned",
            format!("reflector {from} of shard {shard} is gone; the shard is placed again"),
        )],
        Decision::ScaleUp {
            pool,
            region,
            from,
            to,
            reason,
            ..
        } => vec![one(
            About::Pool(pool.clone()),
            Level::Normal,
            "ScalingUp",
            format!("region {region}: {from} -> {to} reflectors ({reason:?})"),
        )],
        Decision::ScaleHeld {
            pool,
            region,
            direction,
            until,
        } => vec![one(
            About::Pool(pool.clone()),
            Level::Routine,
            "ScalingHeld",
            format!("region {region}: scaling {direction:?} held by the cool-down until {until}"),
        )],
        Decision::DrainReflector {
            reflector, reason, ..
        } => vec![one(
            About::Reflector(reflector.clone()),
            Level::Normal,
            "ReflectorDraining",
            format!("reflector {reflector} drains ({reason:?})"),
        )],
        Decision::RemoveReflector { reflector } => vec![one(
            About::Reflector(reflector.clone()),
            Level::Normal,
            "ReflectorRemoved",
            format!("reflector {reflector} removed"),
        )],
        Decision::SessionDegraded {
            session: key,
            reason,
            message,
        } => vec![Summary {
            about: session(key),
            level: Level::Warning,
            reason: reason.as_str(),
            action: "Degraded",
            note: message.clone(),
            event: false,
        }],
    }
}
