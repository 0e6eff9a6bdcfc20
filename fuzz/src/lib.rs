//! # Refleet's fuzz driver, on stable Rust
//!
//! The fuzz targets live in `fuzz/tests/` (one file per parser, see `docs/fuzzing.md`). Each
//! one is a closure that builds its input from an [`arbitrary::Unstructured`] byte buffer and
//! asserts properties; [`run`] feeds it buffers of random bytes, as many as asked:
//!
//! - `REFLEET_FUZZ_CASES=N`: inputs per target (the default is a short run, a few seconds in a
//!   debug build, so that `cargo test` runs every target).
//! - `REFLEET_FUZZ_SECS=S`: stop after S seconds even if fewer inputs ran.
//! - `REFLEET_FUZZ_SEED=X`: the seed (decimal, or `random`); a fixed one by default, so a
//!   plain `cargo test` is repeatable.
//! - `REFLEET_FUZZ_INPUT=<hex>`: replays one input (printed when a case fails).
//!
//! No coverage guidance: inputs are random bytes, which the targets shape with `arbitrary`
//! (dictionaries of the words each parser cares about, structured messages, then byte-level
//! mutations). The same closures could be handed to `cargo fuzz` on nightly unchanged.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

pub use arbitrary::{self, Arbitrary, Unstructured};

/// The seed a run uses unless `REFLEET_FUZZ_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5eed_f00d_cafe_0015;

/// SplitMix64: a tiny, fast generator for the input bytes (not for anything secret).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Inputs run.
    pub cases: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The seed.
    pub seed: u64,
}

impl Summary {
    /// Inputs per second.
    pub fn rate(&self) -> f64 {
        self.cases as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

fn seed() -> u64 {
    match std::env::var("REFLEET_FUZZ_SEED")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        None | Some("") => DEFAULT_SEED,
        Some("random") => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            Rng::new(t ^ u64::from(std::process::id())).next_u64()
        }
        Some(s) => s
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("REFLEET_FUZZ_SEED={s:?} is not a number or `random`")),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Vec<u8> {
    let text = text.trim();
    assert!(
        text.len().is_multiple_of(2) && text.is_ascii(),
        "REFLEET_FUZZ_INPUT is not hex"
    );
    (0..text.len() / 2)
        .map(|i| {
            u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("REFLEET_FUZZ_INPUT is not hex")
        })
        .collect()
}

/// How long a case's byte buffer is: mostly short, sometimes up to 4 KiB.
fn input_len(rng: &mut Rng) -> usize {
    let r = rng.next_u64();
    let bound = match r & 7 {
        0..=3 => 64,
        4 | 5 => 256,
        6 => 1024,
        _ => 4096,
    };
    ((r >> 8) % bound) as usize
}

/// Runs `target` on `default_cases` random inputs (or as `REFLEET_FUZZ_*` say), failing the
/// calling test on the first panic after printing the input that caused it. A target that
/// runs out of bytes (`arbitrary::Error`) simply ends its case.
pub fn run<F>(name: &str, default_cases: u64, mut target: F) -> Summary
where
    F: FnMut(&mut Unstructured<'_>) -> arbitrary::Result<()>,
{
    if let Ok(input) = std::env::var("REFLEET_FUZZ_INPUT") {
        let bytes = unhex(&input);
        eprintln!("fuzz {name}: replaying one input of {} bytes", bytes.len());
        let _ = target(&mut Unstructured::new(&bytes));
        return Summary {
            cases: 1,
            elapsed: Duration::ZERO,
            seed: 0,
        };
    }
    let cases = env_u64("REFLEET_FUZZ_CASES").unwrap_or(default_cases);
    let deadline = env_u64("REFLEET_FUZZ_SECS").map(Duration::from_secs);
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let mut done = 0u64;
    while done < cases {
        // Checking the clock every 1024 cases keeps it off the per-input cost.
        if done.is_multiple_of(1024)
            && let Some(limit) = deadline
            && start.elapsed() >= limit
        {
            break;
        }
        let len = input_len(&mut rng);
        let input = &mut buf[..len];
        rng.fill(input);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let _ = target(&mut Unstructured::new(input));
        }));
        if let Err(panic) = outcome {
            eprintln!(
                "fuzz {name}: case {done} (seed {seed}) failed; replay it with\n  \
                 REFLEET_FUZZ_INPUT={} cargo test -p refleet-fuzz --test <file> fuzz_{name}",
                hex(input)
            );
            resume_unwind(panic);
        }
        done += 1;
    }
    let summary = Summary {
        cases: done,
        elapsed: start.elapsed(),
        seed,
    };
    eprintln!(
        "fuzz {name}: {} cases in {:.2} s ({:.0} inputs/s), seed {seed}, 0 panics",
        summary.cases,
        summary.elapsed.as_secs_f64(),
        summary.rate()
    );
    summary
}

/// Byte-level damage to a text that was valid: what a fuzzer's mutator would do, so that
/// targets reach the refusals just next to an accepted input.
pub fn mutate(u: &mut Unstructured<'_>, text: &str) -> arbitrary::Result<String> {
    let mut bytes = text.as_bytes().to_vec();
    let edits = u.int_in_range(0..=3u8)?;
    for _ in 0..edits {
        let at = if bytes.is_empty() {
            0
        } else {
            u.choose_index(bytes.len() + 1)?
        };
        match u.int_in_range(0..=5u8)? {
            0 if at < bytes.len() => {
                bytes.remove(at);
            }
            1 => bytes.insert(at, u.arbitrary()?),
            2 if at < bytes.len() => bytes[at] ^= 1 << u.int_in_range(0..=7u8)?,
            3 => bytes.truncate(at),
            4 => {
                let interesting: &[&[u8]] = &[
                    b".",
                    b"/",
                    b"..",
                    b"~",
                    b"=",
                    b"\"",
                    b"\\",
                    b"\0",
                    b"%2e",
                    b"+",
                    b"-",
                    b"{",
                    b"}",
                    b"[",
                    b"]",
                    b",",
                    b":",
                    b"null",
                    b"1e999",
                    b"-0",
                    b"\xc3\xa9",
                    b"\xff",
                ];
                let piece = u.choose(interesting)?;
                bytes.splice(at..at, piece.iter().copied());
            }
            _ if at < bytes.len() => {
                let len = u.int_in_range(1..=8usize)?;
                let end = (at + len).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => {}
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// One of `words`, or (sometimes) arbitrary text: names drawn from a small set collide with
/// each other, which is where identity checks are interesting.
pub fn word(u: &mut Unstructured<'_>, words: &[&str]) -> arbitrary::Result<String> {
    if u.ratio(1u8, 8u8)? {
        Ok(<&str>::arbitrary(u)?.to_owned())
    } else {
        Ok((*u.choose(words)?).to_owned())
    }
}

/// A number JSON carries exactly: a small integer or a multiple of 1/4, so text and value
/// round-trip whatever float parsing serde_json is built with.
pub fn exact_number(u: &mut Unstructured<'_>) -> arbitrary::Result<f64> {
    let n = i32::arbitrary(u)?;
    Ok(if u.arbitrary()? {
        f64::from(n)
    } else {
        f64::from(n) / 4.0
    })
}

/// A JSON value of nesting at most `depth`, its strings and keys mostly drawn from `words`.
pub fn json_value(
    u: &mut Unstructured<'_>,
    depth: u8,
    words: &[&str],
) -> arbitrary::Result<serde_json::Value> {
    use serde_json::Value;
    let kinds = if depth == 0 { 3 } else { 5 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => serde_json::Number::from_f64(exact_number(u)?).map_or(Value::Null, Value::Number),
        3 => Value::String(word(u, words)?),
        4 => {
            let n = u.int_in_range(0..=4u8)?;
            Value::Array(
                (0..n)
                    .map(|_| json_value(u, depth - 1, words))
                    .collect::<arbitrary::Result<_>>()?,
            )
        }
        _ => {
            let n = u.int_in_range(0..=4u8)?;
            let mut o = serde_json::Map::new();
            for _ in 0..n {
                o.insert(word(u, words)?, json_value(u, depth - 1, words)?);
            }
            Value::Object(o)
        }
    })
}

/// Whitespace JSON allows between tokens (mostly none).
pub fn json_space(u: &mut Unstructured<'_>) -> arbitrary::Result<&'static str> {
    Ok(*u.choose(&["", "", "", " ", "\n", "\t ", "\r\n  "])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_repeatable_and_fills_odd_lengths() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(x, [0u8; 13]);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])), vec![0, 1, 0xab, 0xff]);
    }
}
