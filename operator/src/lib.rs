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
//! - [`crdgen`]: renders the CRDs as YAML for `refleet crds`.
//! - [`router`]: routes clients to shards and takes the reflectors' load reports.
//! - [`metrics`]: the operator's Prometheus metrics, recorded by both backends.
//! - [`secrets`]: the operator's own Secrets (join-token signing key, report key).
//! - [`fleet`]: what both backends share between observing and acting: one [`fleet::Observed`]
//!   and the planner's input built from it (no kube types).
//! - [`gateway`]: the regional WebSocket gateway (`refleet gateway`, and one per region in
//!   `refleet up`): checks the join token, finds the shard's host, splices the bytes.
//! - [`controller`]: the kube backend (controllers, leader election).
//! - [`local`]: the local backend behind `refleet up`.
//! - [`view`]: the live fleet view (an HTML page with Server-Sent Events) both backends serve,
//!   and the status it and `GET /v1/status` show.
//! - [`cli`]: the long-running subcommands of the `refleet` binary.
//!
//! # Layering
//!
//! The top-level modules form layers, and a module depends (`use crate::x`, `crate::x::..`)
//! only on modules in the layers below its own, never on one beside or above it:
//!
//! 1. `crd` (bottom: the CRDs, which take a few plain value types from the planner in
//!    `refleet-core`);
//! 2. `crdgen` (pure);
//! 3. `router`, `metrics`, `secrets` (services the backends share; `router` and `metrics`
//!    name no kube types);
//! 4. `fleet` (what the two backends share: observed state to planner input; no kube types),
//!    `gateway` (the proxy, on the router's placements), `view` (the fleet view, on the
//!    router's state);
//! 5. `controller`, `local` (the two backends: neither names the other);
//! 6. `cli` (the binary's subcommands).
//!
//! Something two modules of one layer both need moves down a layer. So there is no cycle
//! between top-level modules; the same holds in every crate of the workspace.
//! `operator/tests/layering.rs` reads the module graph from the source and fails naming the
//! offending edge or cycle, and checks the crate graph (see `refleet-core`'s docs): the
//! planner and shard naming live in `refleet-core`, storage and the files endpoint in
//! `refleet-files`, the reflector's command line and `/sessions` report in `refleet-api`; this
//! crate does not depend on `refleet-reflector`.

pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod fleet;
pub mod gateway;
pub mod local;
pub mod metrics;
pub mod router;
pub mod secrets;
pub mod view;
