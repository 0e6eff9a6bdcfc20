//! # Refleet core
//!
//! The words and the policy that the reflector, the router, the Kubernetes controllers and
//! `refleet up` share. Nothing here does I/O, reads a clock or names a kube type, so all of it
//! is tested without a cluster, a socket or a runtime.
//!
//! - [`shard`]: shard and session naming (`room~2`, the shard a JOIN name addresses).
//! - [`planner`]: all placement and scaling policy, as one pure function `plan`.
//!
//! ## Crate layering
//!
//! ```text
//!   refleet-route-bench ─► refleet-bench            (load generators)
//!   refleet-reflector   refleet-operator            (the two binaries; neither names the other)
//!        │    │    │      │    │    │
//!        │    │    └──────┼────┼──► refleet-files   (storage, the /files/ endpoint)
//!        │    └───────────┼────┴──► refleet-api     (protos, tokens, the reflector's command
//!        │                │         │                line and /sessions report, shutdown)
//!        └────────────────┴─────────┴──► refleet-core (naming, the planner)
//! ```
//!
//! A crate names only crates in layers below its own (bottom first: core, api, files, the
//! binaries, the load generators). The operator starts reflectors through the command line
//! `refleet-api` describes, so it never depends on `refleet-reflector`. Inside a crate, no two
//! top-level modules depend on each other, directly or through others.
//! `operator/tests/layering.rs` checks all three (the crate graph from `cargo metadata`, the
//! module graphs from the sources).

pub mod planner;
pub mod shard;
