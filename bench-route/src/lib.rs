//! # refleet-route-bench
//!
//! Refleet's load generator for the router: Route and ListShards over gRPC (the generated
//! tonic client of `refleet-api`), many concurrent callers over a few HTTP/2 connections,
//! latencies in HdrHistograms, a human summary and a JSON report. Modes: a sustained rate,
//! a burst for one session (checked against ListShards), the time from a session passing
//! its threshold to a new shard being routable, and a smoke run. See `bench/ROUTING.md`.

pub mod cli;
pub mod load;
pub mod server;
pub mod stats;
pub mod transport;
