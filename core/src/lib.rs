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
//!   refleet-core   refleet-api          (no Refleet dependency)
//!        ▲    ▲    ▲      ▲
//!        │  refleet-files  │          (storage and the files endpoint)
//!        │    ▲   ▲        │
//!   refleet-reflector   refleet-operator (`refleet`: controllers, router, local backend, CLI)
//! ```
//!
//! A crate names only crates below it, and the two binaries never name each other: the
//! operator starts reflectors through the command line `refleet-api` describes. Inside a
//! crate, no two top-level modules depend on each other (directly or through others).
//! `operator/tests/layering.rs` checks both (the crate graph from `cargo metadata`, the module
//! graph from the sources).

pub mod planner;
pub mod shard;
