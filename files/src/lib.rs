//! # Refleet files
//!
//! Durable storage and the files endpoint, shared by the reflector (each pod serves its pool's
//! `/files/`) and `refleet up` (which serves one `/files/` for its whole local fleet):
//!
//! - [`storage`]: the object store (a local directory, memory, or S3 and the like by URL)
//!   behind files, persisted-data records and stored sessions.
//! - [`endpoint`]: `/files/`: downloads open, uploads only for a live session's members
//!   (asked through an [`endpoint::UploadGate`] each server provides), written once, streamed
//!   with size, idle-time and concurrency caps.
//! - [`upload_slots`]: the cap on concurrent uploads, per peer address and in total.
//! - [`metrics`]: the endpoint's Prometheus metrics.
//!
//! It knows nothing of sessions' protocol: a stored session is JSON of the reflector's format,
//! and whether an upload belongs to a live session is the gate's answer.

pub mod endpoint;
pub mod metrics;
pub mod storage;
pub mod upload_slots;
