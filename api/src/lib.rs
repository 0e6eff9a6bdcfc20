//! # Refleet's wire APIs
//!
//! - [`routing`]: `refleet.routing.v1`, the Route service clients ask where to join.
//! - [`report`]: `refleet.report.v1`, the stream each reflector keeps open to the operator.
//! - [`token`]: signed join tokens, issued by the router and checked by reflectors.
//! - [`report_credential`]: each reflector's own credential for its report stream.
//! - [`reconnect`]: how clients of the operator's streams wait between reconnects.
//! - [`reflector`]: the reflector's command line, start-up banner and `/sessions` report, which
//!   launchers write and read.
//! - [`shutdown`]: the stop signal every Refleet binary waits for.
//!
//! The `.proto` files under `proto/` are the reference; this crate is generated from them
//! by `build.rs` (protox + tonic-prost-build, no `protoc` needed).

pub mod reconnect;
pub mod reflector;
pub mod report_credential;
pub mod shutdown;
pub mod token;

/// `refleet.routing.v1`: generated messages, client and server.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod routing {
    tonic::include_proto!("refleet.routing.v1");
}

/// `refleet.report.v1`: generated messages, client and server.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod report {
    tonic::include_proto!("refleet.report.v1");
}

/// `refleet.placement.v1`: the placement watch (router → gateways).
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod placement {
    tonic::include_proto!("refleet.placement.v1");
}

/// `refleet.token.v1`: the join-token claims message.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod token_proto {
    tonic::include_proto!("refleet.token.v1");
}

/// The encoded `FileDescriptorSet` of every Refleet service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/refleet_descriptor.bin"));
