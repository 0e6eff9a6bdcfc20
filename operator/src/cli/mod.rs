//! Subcommands of the `refleet` binary that run long: `operator` (in a cluster), `up` (a
//! local fleet) and `gateway` (one region's gateway). Each lives in its own module with its clap arguments and `run`.

pub mod gateway;
pub mod operator;
pub mod routing;
pub mod up;
