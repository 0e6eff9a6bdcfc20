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
//!
//! - [`controller`]: the kube backend (controllers, leader election).
//! - [`local`]: the local backend behind `refleet up`.
//! - [`cli`]: the long-running subcommands of the `refleet` binary.

pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod local;
pub mod metrics;
pub mod planner;
pub mod router;
pub mod secrets;
