//! `refleet-reflector`: see `--help`.

use anyhow::Context as _;
use clap::Parser;
use refleet_reflector::config::LogFormat;
use refleet_reflector::{Config, Reflector, shutdown};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let reflector = Reflector::new(&config, bound).context("opening --storage")?;
    let public = config.public_base(bound);
    tracing::info!(
        listen = %bound,
        files = %config.files_base(bound),
        storage = %config.storage,
        region = %config.region,
        "refleet-reflector ready"
    );
    // The one line on stdout: what to pass to Session.join({ box }).
    println!("box: {public}");
    reflector
        .serve(listener, shutdown::signal())
        .await
        .context("serving")?;
    Ok(())
}
