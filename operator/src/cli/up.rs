//! `refleet up`: a whole fleet on one machine (work in progress).

/// Arguments of `refleet up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {}

/// Runs the local fleet until Ctrl-C.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let UpArgs {} = args;
    anyhow::bail!("refleet up is not implemented yet")
}
