//! `refleet-bench`: Refleet's load generator for the reflector protocol.
//!
//! It drives a reflector over WebSockets the way the Multisynq client does and measures what
//! a platform team cares about: delivered messages per second at a latency bound, latency
//! percentiles, loss / duplication / reorder, and the reflector's CPU and memory.
//!
//! # Layout
//! - [`cli`]: command-line flags (clap derive).
//! - [`wire`]: frames sent, and a one-pass reader for frames received.
//! - [`check`]: per-client seq continuity, per-sender order, loss and duplication.
//! - [`client`]: one simulated client (a task owning one WebSocket).
//! - [`load`]: one load run (sessions × clients × rate) and its report.
//! - [`idle`]: idle connections in steps: RSS per connection, tick lateness.
//! - [`modes`]: fixed, ramp, idle, slow-consumer and smoke on top of those.
//! - [`soak`]: a compressed day of churn, then drain, restart and resume.
//! - [`procstat`]: CPU seconds and RSS of a process from `/proc`.
//! - [`target`]: the reflector under test, spawned or external.

pub mod check;
pub mod cli;
pub mod client;
pub mod half_open;
pub mod idle;
pub mod load;
pub mod modes;
pub mod moves;
pub mod procstat;
pub mod soak;
pub mod target;
pub mod wire;
