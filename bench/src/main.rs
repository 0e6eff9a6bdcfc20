//! `refleet-bench`: the reflector load generator (work in progress).

fn main() {}
