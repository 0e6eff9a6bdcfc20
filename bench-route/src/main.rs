//! `refleet-route-bench`: see the library docs and `bench/ROUTING.md`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = refleet_route_bench::cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("refleet-route-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(refleet_route_bench::cli::run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("refleet-route-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
