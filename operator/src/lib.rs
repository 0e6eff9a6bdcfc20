//! # Refleet operator
//!
//! The control plane of Refleet: it places Croquet sessions' shards on reflectors, opens a new
//! shard when a session overflows, grows and shrinks each region's reflectors and drains
//! them before removal.
//!
//! # Layout
//!
//! - [`crd`]: the `ReflectorPool` and `Session` custom resources (`refleet.dev/v1alpha1`),
//!   from which the YAML in `crds/` is generated.
//! - [`planner`]: all placement and scaling policy, as a pure function from specs, observed
//!   reflectors, observed load and the time to the desired state, with a reason for every
//!   decision.
//! - [`crdgen`]: renders the CRDs as YAML for `refleet crds`.
//! - [`router`]: routes clients to shards and takes the reflectors' load reports.
//! - [`metrics`]: the operator's Prometheus metrics, recorded by both backends.
//! - [`secrets`]: the operator's own Secrets (join-token signing key, report key).
//! - [`fleet`]: what both backends share between observing and acting: one [`fleet::Observed`]
//!   and the planner's input built from it (no kube types).
//! - [`controller`]: the kube backend (controllers, leader election).
//! - [`local`]: the local backend behind `refleet up`.
//! - [`cli`]: the long-running subcommands of the `refleet` binary.
//!
//! # Layering
//!
//! The top-level modules form layers, and a module depends (`use crate::x`, `crate::x::..`)
//! only on modules in the layers below its own, never on one beside or above it:
//!
//! 1. `crd` (bottom: the CRDs; the planner shares a few of their plain value types);
//! 2. `planner`, `crdgen` (pure: no kube API types in the planner, no I/O);
//! 3. `router`, `metrics`, `secrets` (services the backends share; `router` and `metrics`
//!    name no kube types);
//! 4. `fleet` (what the two backends share: observed state to planner input; no kube types);
//! 5. `controller`, `local` (the two backends: neither names the other);
//! 6. `cli` (the binary's subcommands).
//!
//! Something two modules of one layer both need moves down a layer. So there is no cycle
//! between top-level modules; the same holds in every crate of the workspace (but for the
//! reflector's `KNOWN_BACK_EDGES`, listed in the test until they are gone).
//! `operator/tests/layering.rs` reads the module graph from the source and fails naming the
//! offending edge or cycle.

pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod fleet;
pub mod local;
pub mod metrics;
pub mod planner;
pub mod router;
pub mod secrets;
