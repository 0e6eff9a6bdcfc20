//! # Refleet reflector
//!
//! The data plane of Refleet: a WebSocket server that the unmodified `@multisynq/client`
//! joins, which orders each session's messages, stamps them with time and sequence number,
//! fans them out, and keeps snapshots, persisted data and session state in durable storage.
//!
//! ## Layout
//! - [`config`]: command line and environment (defined in `refleet-api`, with how launchers
//!   write it and the start-up banner, so launchers need not depend on this crate).
//! - [`server`]: the HTTP/WebSocket front door and the drain.
//! - [`connection`]: one task per WebSocket (limits, parsing, the writer).
//! - [`frame`]: client frames in, server frames out.
//! - [`outbox`]: the bounded send queue between a session and a connection.
//! - [`session`]: one task per session; [`session::core`] holds the protocol itself,
//!   [`session::registry`] the table of sessions (touched only at JOIN) and
//!   [`session::files_scope`] which snapshot and persisted-data URLs a session may record.
//! - storage and the `/files/` endpoint come from `refleet-files` (shared with `refleet up`),
//!   shard naming from `refleet-core`; [`session::stored`] is the stored form of a session.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`close`]: every close code the reflector sends.
//! - [`admission`]: join tokens and shard caps, checked at a view's first JOIN.
//! - [`report`]: the load-report stream to the operator.
//!
//! ```text
//!  client ──ws──► connection task ──Command──► session task (Core) ──Outbox──► connection writers
//!                      │                              │
//!                      └── PING/PONG, limits           └── Effects ──► storage (object_store)
//!  client ──http /files/──► files ──► storage
//! ```

pub mod admission;
pub mod close;
pub mod connection;
pub mod frame;
pub mod metrics;
pub mod outbox;
pub mod report;
pub mod server;
pub mod session;

pub use refleet_api::reflector::config::{self, Config};
pub use server::Reflector;
