//! `refleet`: the Refleet control-plane binary.
//!
//! `refleet crds` prints every CRD as one multi-document YAML stream; `refleet crds --write
//! crds/` updates the files in that directory; `refleet operator` runs the controllers in a
//! cluster and `refleet up` a local fleet.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Refleet control plane.
#[derive(Debug, Parser)]
#[command(name = "refleet", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers in a cluster (leader-elected; watches Sessions and ReflectorPools).
    Operator(refleet_operator::cli::operator::OperatorArgs),
    /// Run a whole fleet on this machine: the planner, simulated regions on loopback and
    /// `refleet-reflector` child processes.
    Up(refleet_operator::cli::up::UpArgs),
    /// Print every CRD as one multi-document YAML stream, or write one file per CRD.
    Crds {
        /// Write `reflectorpools.yaml` and `sessions.yaml` into this directory instead of
        /// printing.
        #[arg(long, value_name = "DIR", env = "REFLEET_CRDS_DIR")]
        write: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { command } = Args::parse();
    match command {
        Command::Operator(args) => refleet_operator::cli::operator::run(args).await?,
        Command::Up(args) => refleet_operator::cli::up::run(args).await?,
        Command::Crds { write: None } => {
            let yaml = refleet_operator::crdgen::render_stream().context("rendering the CRDs")?;
            std::io::stdout()
                .lock()
                .write_all(yaml.as_bytes())
                .context("writing to stdout")?;
        }
        Command::Crds { write: Some(dir) } => {
            for path in refleet_operator::crdgen::write_all(&dir)
                .with_context(|| format!("writing the CRDs into {}", dir.display()))?
            {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
