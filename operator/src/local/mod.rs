//! # The local backend: a whole fleet on one machine (`refleet up`)
//!
//! ```text
//!   config (YAML: ReflectorPool, Session, LocalFleet)
//!        │
//!        ▼
//!   [Fleet] ── tick ──► observe (Launcher: processes + their /sessions)
//!        │               plan    (the same pure planner as in a cluster)
//!        │               act     (start / SIGTERM-drain / forget reflectors)
//!        ▼
//!   [Server]  /files/ (shared storage)   /v1/status   + the router's /v1/route, /v1/shards
//!             + the fleet view (/, crate::view)
//! ```
//!
//! Regions are simulated: each is a label (`--region`) on `refleet-reflector` children that
//! listen on loopback, each on its own port. Every child of a pool shares one storage and
//! is given refleet up's own `/files/` as `--files-url`, so the files URLs clients bake into
//! snapshots keep working after the reflector that took them is gone. Load is what the
//! children's `/sessions` report, mapped to shards by the JOIN name (`<appId>/<shard>`).
//!
//! - [`config`]: parsing and checking the YAML stream (and the embedded default).
//! - [`launcher`]: the [`launcher::Launcher`] trait and the child-process launcher.
//! - [`fleet`]: the observe → plan → act loop and the status it publishes.
//! - [`server`]: the HTTP endpoints.
//! - [`prometheus`]: `/metrics`, the Prometheus targets and the printed scrape config.
//! - [`table`]: the table printed on every change.
//! - [`usage`]: the children's CPU and memory, from `/proc`.
//! - [`demo`]: `--demo DIR`, a browser demo's files at `/demo/`.

pub mod config;
pub mod demo;
pub mod fleet;
pub mod launcher;
pub mod prometheus;
pub mod server;
pub mod table;
pub mod usage;
