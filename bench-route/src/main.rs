//! `refleet-route-bench`: see the library docs and `bench/ROUTING.md`.

use std::process::ExitCode;

use clap::Parser;

// The system allocator's malloc/free were ~6 % of the generator's CPU in a 20 000/s run.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = refleet_route_bench::cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
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
