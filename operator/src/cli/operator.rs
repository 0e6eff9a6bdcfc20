//! `refleet operator`: the controllers in a cluster (work in progress).

/// Arguments of `refleet operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {}

/// Runs the operator until it is stopped.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let OperatorArgs {} = args;
    anyhow::bail!("refleet operator is not implemented yet")
}
