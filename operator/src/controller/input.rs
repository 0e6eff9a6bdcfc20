//! From observed Kubernetes objects and reflector load to a [`PlanInput`] (pure).
//!
//! The planner is scoped to one pool per call: its pool, the Sessions that refer to it, its
//! pods and the shards the previous plan of that pool left (kept in memory by the
//! controller). After a restart or a leadership change the memory is rebuilt from what is
//! observable: `Session.status.shards` and the sessions the reflectors say they host.

use std::borrow::Borrow;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::observe::{LoadByPod, pod_image, pod_region, pod_state};
use refleet_core::shard::parse_shard_name;

use crate::crd::{ReflectorPool, Session, ShardPhase};
use crate::fleet;
use refleet_core::planner::{MoveRequest, PlanInput, ScaleHistory, Seconds, ShardRecord};
// Defined with the planner's SessionInput, whose key they build, so the router can use them
// without depending on the controller.
pub use refleet_core::planner::{session_key, split_session_key};

/// What the controller remembers about one pool between plans.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolMemory {
    /// The shards of the last plan.
    pub shards: Vec<ShardRecord>,
    /// The scaling history of the last plan.
    pub history: ScaleHistory,
    /// Whether `shards` came from a plan (false: rebuild them from Session statuses).
    pub initialised: bool,
    /// The pool's reflectors this operator has not heard from (no report, no read of their
    /// load), each with the first plan that could not hear it: the start of its wait
    /// ([`fleet::REPORT_WAIT`]). Cleared on losing leadership with the rest, so a new
    /// leader waits for every reflector in full.
    pub unheard_since: std::collections::HashMap<String, Seconds>,
    /// When each Session's status (by name) was last written: a change of user counts
    /// alone waits until `status_counts_every` has passed since.
    pub status_written: std::collections::HashMap<String, Seconds>,
}

pub use crate::fleet::pool_id;

/// The public WebSocket base URL a reflector pod was given (`REFLEET_PUBLIC_URL`).
fn pod_public_url(pod: &Pod) -> Option<String> {
    let env = pod.spec.as_ref()?.containers.first()?.env.as_ref()?;
    env.iter()
        .find(|e| e.name == "REFLEET_PUBLIC_URL")?
        .value
        .clone()
}

/// The in-cluster address of a reflector pod (its IP and port), once it has an IP: what the
/// gateway connects to when the pool's gateway is on (clients never see it).
fn pod_internal_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    Some(format!("http://{host}:{}/", super::pod::REFLECTOR_PORT))
}

/// What the kube backend observed for one pool, as the shared [`fleet::Observed`].
pub fn observed(
    namespace: &str,
    pool_name: &str,
    pool: Option<&ReflectorPool>,
    sessions: &[Session],
    pods: &[impl Borrow<Pod>],
    loads: &LoadByPod,
) -> fleet::Observed {
    let id = pool_id(namespace, pool_name);
    // With the gateway on, Route answers the gateway's URL and the gateway reaches each
    // reflector at its pod address; without it, clients get the public URL.
    let gateway = pool.is_some_and(|p| p.spec.gateway.enabled);
    fleet::Observed {
        pools: pool
            .map(|p| fleet::ObservedPool {
                namespace: namespace.to_owned(),
                name: pool_name.to_owned(),
                spec: p.spec.clone(),
                files_url: p.spec.files.public_url.clone(),
            })
            .into_iter()
            .collect(),
        sessions: sessions
            .iter()
            .map(|s| fleet::ObservedSession {
                namespace: namespace.to_owned(),
                name: s.name_any(),
                spec: s.spec.clone(),
                deleted: s.metadata.deletion_timestamp.is_some(),
            })
            .collect(),
        reflectors: pods
            .iter()
            .map(|p| {
                let p: &Pod = p.borrow();
                let name = p.name_any();
                fleet::ObservedHost {
                    pool: id.clone(),
                    region: pod_region(p).map(str::to_owned),
                    image: pod_image(p),
                    state: pod_state(p),
                    url: if gateway {
                        pod_internal_url(p)
                    } else {
                        pod_public_url(p)
                    },
                    hosted: loads.get(&name).map(|l| {
                        l.sessions
                            .iter()
                            .map(|h| fleet::HostedShard {
                                app_id: h.app_id.clone(),
                                name: h.name.clone(),
                                users: h.users,
                            })
                            .collect()
                    }),
                    name,
                }
            })
            .collect(),
    }
}

/// Builds the planner's input for pool `pool_name` in `namespace` (`pool` is `None` when it
/// does not exist: its sessions then come out `PoolNotFound`), with [`fleet::plan_input`];
/// before the first plan the shards are recovered from the Sessions' status.
#[allow(clippy::too_many_arguments)]
pub fn build_input(
    namespace: &str,
    pool_name: &str,
    pool: Option<&ReflectorPool>,
    sessions: &[Session],
    pods: &[Pod],
    loads: &LoadByPod,
    memory: &PoolMemory,
    now: Seconds,
) -> PlanInput {
    let observed = observed(namespace, pool_name, pool, sessions, pods, loads);
    input_for(&observed, namespace, pool_name, sessions, memory, now)
}

/// The planner's input from what [`observed`] returned for pool `pool_name` in `namespace`.
pub fn input_for(
    observed: &fleet::Observed,
    namespace: &str,
    pool_name: &str,
    sessions: &[Session],
    memory: &PoolMemory,
    now: Seconds,
) -> PlanInput {
    let mut shards = memory.shards.clone();
    if !memory.initialised {
        shards.extend(recover_from_status(
            namespace,
            &pool_id(namespace, pool_name),
            sessions,
        ));
    }
    let mut input = fleet::plan_input(observed, &shards, &memory.history, now);
    if !memory.initialised {
        hold_scale_down(&mut input);
    }
    input
}

/// A new leader's first plan of a pool counts every region as grown just now, so no
/// reflector is drained as surplus for a scale-down cool-down after the takeover. The
/// previous leader's history went with it: it may have grown the region a second ago, for
/// shards it opened and join tokens it signed that no status records, and their reflectors
/// would look empty. Run E drained ~300 such reflectors within 8 s of a takeover, with 1 155
/// users on them in one run (docs/scale.md). Scale-ups are not held.
fn hold_scale_down(input: &mut PlanInput) {
    for pool in &input.pools {
        for region in &pool.regions {
            let h = input
                .history
                .entry((pool.id.clone(), region.name.clone()))
                .or_default();
            if h.last_up_at.is_none_or(|t| t < input.now) {
                h.last_up_at = Some(input.now);
            }
        }
    }
}

/// Shards recorded in exact-name Sessions' status (placed ones; pending ones are reopened).
fn recover_from_status(namespace: &str, pool: &str, sessions: &[Session]) -> Vec<ShardRecord> {
    let mut out = Vec::new();
    for session in sessions {
        let spec = &session.spec;
        let Some(name) = &spec.name else { continue };
        let key = session_key(namespace, &spec.app_id, name);
        for s in session.status.iter().flat_map(|st| &st.shards) {
            let Some((base, index)) = parse_shard_name(&s.name) else {
                continue;
            };
            if base != name || s.reflector.is_empty() || s.state == ShardPhase::Pending {
                continue;
            }
            out.push(ShardRecord {
                session: key.clone(),
                name: s.name.clone(),
                index,
                pool: pool.to_owned(),
                region: s.region.clone(),
                reflector: Some(s.reflector.clone()),
                committed_users: spec.max_users_per_shard,
                users: s.users,
                reserved: 0,
                phase: s.state,
                empty_since: None,
                // A move in flight when the previous leader stopped: this leader asks the
                // source again (a source that already handed off answers at once).
                moving_to: s
                    .moving_to
                    .clone()
                    .filter(|_| s.state == ShardPhase::Moving),
                moved_at: None,
            });
        }
    }
    out
}

/// The Session annotation that asks for a move by hand: `<shard>` (the planner picks a
/// reflector of its region) or `<shard>=<reflector>`, optionally followed by ` #<note>`. Each
/// value is acted on once (see `status.handledMoveRequest`).
pub const ANNOTATION_MOVE_SHARD: &str = "refleet.dev/move-shard";

/// The annotation value of `session` not yet acted on, if any.
pub fn pending_move_annotation(session: &Session) -> Option<&str> {
    let value = session.annotations().get(ANNOTATION_MOVE_SHARD)?;
    let handled = session
        .status
        .as_ref()
        .and_then(|s| s.handled_move_request.as_deref());
    (handled != Some(value.as_str())).then_some(value.as_str())
}

/// A move asked for by annotation `value` on `session` in `namespace`; `Err` says why the
/// value is not one (for an Event).
pub fn parse_move_annotation(
    namespace: &str,
    session: &Session,
    value: &str,
) -> Result<MoveRequest, String> {
    let request = value.split(" #").next().unwrap_or_default().trim();
    let (shard, to) = match request.split_once('=') {
        Some((shard, to)) => (shard.trim(), Some(to.trim())),
        None => (request, None),
    };
    let Some((base, _)) = parse_shard_name(shard) else {
        return Err(format!(
            "{ANNOTATION_MOVE_SHARD}: {shard:?} is not a shard name (<session> or <session>~N)"
        ));
    };
    if to.is_some_and(str::is_empty) {
        return Err(format!(
            "{ANNOTATION_MOVE_SHARD}: no reflector after '=' (use <shard> to let the planner pick)"
        ));
    }
    let key = session_key(namespace, &session.spec.app_id, base);
    if !fleet::governs(namespace, &session.spec, &key) {
        return Err(format!(
            "{ANNOTATION_MOVE_SHARD}: shard {shard:?} is not a shard of this Session"
        ));
    }
    Ok(MoveRequest {
        session: key,
        shard: shard.to_owned(),
        to: to.map(str::to_owned),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod move_annotation_tests {
    use super::*;
    use crate::crd::SessionSpec;

    fn session(name: Option<&str>, pattern: Option<&str>, annotation: Option<&str>) -> Session {
        let mut spec: SessionSpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "pool"}, "appId": "app",
        }))
        .unwrap();
        spec.name = name.map(str::to_owned);
        spec.name_pattern = pattern.map(str::to_owned);
        let mut s = Session::new("s", spec);
        if let Some(a) = annotation {
            s.metadata.annotations =
                Some([(ANNOTATION_MOVE_SHARD.to_owned(), a.to_owned())].into());
        }
        s
    }

    #[test]
    fn a_move_annotation_names_a_shard_of_the_session_and_optionally_a_target() {
        let s = session(Some("lobby"), None, None);
        let r = parse_move_annotation("ns", &s, "lobby~2=r-eu-1 #maintenance").unwrap();
        assert_eq!(
            (r.session.as_str(), r.shard.as_str(), r.to.as_deref()),
            ("ns/app/lobby", "lobby~2", Some("r-eu-1"))
        );
        let r = parse_move_annotation("ns", &s, "lobby").unwrap();
        assert_eq!(r.to, None);
        assert!(
            parse_move_annotation("ns", &s, "other").is_err(),
            "another session's shard"
        );
        assert!(
            parse_move_annotation("ns", &s, "lobby~x").is_err(),
            "not a shard name"
        );
        assert!(
            parse_move_annotation("ns", &s, "lobby=").is_err(),
            "empty target"
        );
        // A pattern Session covers the shards of the sessions its pattern matches.
        let p = session(None, Some("room-*"), None);
        assert!(parse_move_annotation("ns", &p, "room-7~1").is_ok());
        assert!(parse_move_annotation("ns", &p, "lobby").is_err());
    }

    #[test]
    fn a_new_leader_recovers_a_move_in_flight_from_the_status() {
        let mut s = session(Some("lobby"), None, None);
        let shard = |name: &str, state, moving_to: Option<&str>| crate::crd::ShardStatus {
            name: name.into(),
            region: "eu".into(),
            reflector: "r-1".into(),
            users: 3,
            state,
            moving_to: moving_to.map(str::to_owned),
        };
        s.status = Some(crate::crd::SessionStatus {
            shards: vec![
                shard("lobby", ShardPhase::Moving, Some("r-2")),
                // A stale movingTo on a shard that is not Moving is not a move.
                shard("lobby~1", ShardPhase::Open, Some("r-2")),
            ],
            ..Default::default()
        });
        let shards = recover_from_status("ns", "ns/pool", &[s]);
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].moving_to.as_deref(), Some("r-2"));
        assert_eq!(shards[0].reflector.as_deref(), Some("r-1"));
        assert_eq!(shards[1].moving_to, None);
    }

    #[test]
    fn each_annotation_value_is_acted_on_once() {
        let mut s = session(Some("lobby"), None, Some("lobby"));
        assert_eq!(pending_move_annotation(&s), Some("lobby"));
        s.status = Some(crate::crd::SessionStatus {
            handled_move_request: Some("lobby".into()),
            ..Default::default()
        });
        assert_eq!(pending_move_annotation(&s), None);
        s.metadata.annotations =
            Some([(ANNOTATION_MOVE_SHARD.to_owned(), "lobby #2".to_owned())].into());
        assert_eq!(pending_move_annotation(&s), Some("lobby #2"));
        assert_eq!(
            pending_move_annotation(&session(Some("lobby"), None, None)),
            None
        );
    }
}
