//! `refleet-bench`: see the library docs and `bench/README.md`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = refleet_bench::cli::Args::parse();
    // Thousands of idle connections need more descriptors than the usual soft limit of 1024;
    // a reflector started with --spawn inherits the raised limit.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("refleet-bench: could not raise the open-file limit: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("refleet-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(refleet_bench::modes::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("refleet-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
