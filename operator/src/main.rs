//! `refleet`: the Refleet control-plane binary.
//!
//! `refleet crds` prints every CRD as one multi-document YAML stream; `refleet crds --write
//! crds/` updates the files in that directory and `--reference docs/crd-reference.md` the
//! Markdown field reference; `refleet operator` runs the controllers in a cluster and
//! `refleet up` a local fleet.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

// The router answers tens of thousands of small requests a second; with the system
// allocator malloc/free were ~7 % of its CPU (bench/ROUTING.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Operator(Box<refleet_operator::cli::operator::OperatorArgs>),
    /// Run a whole fleet on this machine: the planner, simulated regions on loopback and
    /// `refleet-reflector` child processes.
    Up(refleet_operator::cli::up::UpArgs),
    /// Run one region's gateway: a stable WebSocket address that checks the join token and
    /// splices each connection to the reflector hosting its shard (placements from the
    /// router leader's watch stream).
    Gateway(Box<refleet_operator::cli::gateway::GatewayArgs>),
    /// Print every CRD as one multi-document YAML stream, or write one file per CRD and/or
    /// the Markdown field reference.
    Crds {
        /// Write `reflectorpools.yaml` and `sessions.yaml` into this directory instead of
        /// printing.
        #[arg(long, value_name = "DIR", env = "REFLEET_CRDS_DIR")]
        write: Option<PathBuf>,
        /// Write the Markdown reference of every CRD field (generated from the CRDs' schema)
        /// to this file instead of printing, e.g. `docs/crd-reference.md`.
        #[arg(long, value_name = "FILE", env = "REFLEET_CRDS_REFERENCE")]
        reference: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { command } = Args::parse();
    match command {
        Command::Operator(args) => refleet_operator::cli::operator::run(*args).await?,
        Command::Up(args) => refleet_operator::cli::up::run(args).await?,
        Command::Gateway(args) => refleet_operator::cli::gateway::run(*args).await?,
        Command::Crds {
            write: None,
            reference: None,
        } => {
            let yaml = refleet_operator::crdgen::render_stream().context("rendering the CRDs")?;
            std::io::stdout()
                .lock()
                .write_all(yaml.as_bytes())
                .context("writing to stdout")?;
        }
        Command::Crds { write, reference } => {
            if let Some(dir) = write {
                for path in refleet_operator::crdgen::write_all(&dir)
                    .with_context(|| format!("writing the CRDs into {}", dir.display()))?
                {
                    eprintln!("wrote {}", path.display());
                }
            }
            if let Some(file) = reference {
                refleet_operator::crdgen::write_reference(&file)
                    .with_context(|| format!("writing the CRD reference to {}", file.display()))?;
                eprintln!("wrote {}", file.display());
            }
        }
    }
    Ok(())
}
