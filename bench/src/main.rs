//! `refleet-bench`: see the library docs and `bench/README.md`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = refleet_bench::cli::Args::parse();
    raise_nofile();
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

/// Thousands of idle connections need more descriptors than the usual soft limit of 1024:
/// raise the hard limit too when allowed (root), else the soft limit up to the hard one. A
/// reflector started with `--spawn` inherits the raised limit.
fn raise_nofile() {
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
    if soft >= want {
        return;
    }
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want.max(hard)).is_ok() {
        return;
    }
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("refleet-bench: could not raise the open-file limit: {e}");
    }
}
