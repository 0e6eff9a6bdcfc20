//! Subcommands of the `refleet` binary that run long: `operator` (in a cluster) and `up`
//! (a local fleet). Each lives in its own module with its clap arguments and `run`.

pub mod operator;
pub mod routing;
pub mod up;
