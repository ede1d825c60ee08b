//! Mutations for the loader fuzz tests of every crate (included by path, so each crate's
//! tests use the same mutator): truncations, bit flips, lying sizes and offsets written over
//! any 4 or 8 bytes, absurd numbers in JSON text, deleted and duplicated ranges. Positions are
//! fractions of the file length so one strategy fits files of any size.

use proptest::prelude::*;

/// One change to a file's bytes.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Keep the first `fraction` of the bytes.
    Truncate(f64),
    /// Flip bit `bit` of the byte at `position`.
    FlipBit(f64, u8),
    /// Write `value` little-endian over the 8 bytes at `position` (a size or offset that lies).
    PutU64(f64, u64),
    /// Write `value` little-endian over the 4 bytes at `position` (a type or count that lies).
    PutU32(f64, u32),
    /// Replace the run of ASCII digits nearest `position` by `text` (an absurd JSON number).
    Number(f64, &'static str),
    /// Delete `len` bytes at `position`.
    Delete(f64, usize),
    /// Copy `len` bytes at `position` to just after them.
    Duplicate(f64, usize),
}

/// Sizes, counts and offsets that loaders must check before use.
const ABSURD_U64: [u64; 8] = [
    1 << 60,
    u64::MAX,
    u64::MAX - 7,
    1 << 32,
    1 << 40,
    0,
    1,
    i64::MAX as u64,
];
const ABSURD_U32: [u32; 6] = [u32::MAX, 1 << 31, 0, 13, 255, 1 << 20];
const ABSURD_NUMBERS: [&str; 10] = [
    "1152921504606846976",
    "18446744073709551616",
    "99999999999999999999999",
    "-1",
    "0",
    "1e308",
    "-0.0",
    "4294967297",
    "NaN",
    "3.5",
];

fn fraction() -> impl Strategy<Value = f64> {
    0.0f64..1.0
}

/// A single mutation.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        fraction().prop_map(Mutation::Truncate),
        (fraction(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (fraction(), prop::sample::select(ABSURD_U64.to_vec()))
            .prop_map(|(p, v)| Mutation::PutU64(p, v)),
        (fraction(), prop::sample::select(ABSURD_U32.to_vec()))
            .prop_map(|(p, v)| Mutation::PutU32(p, v)),
        (fraction(), prop::sample::select(ABSURD_NUMBERS.to_vec()))
            .prop_map(|(p, t)| Mutation::Number(p, t)),
        (fraction(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (fraction(), 1usize..64).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..5)
}

fn at(len: usize, fraction: f64) -> usize {
    ((len as f64) * fraction) as usize
}

/// `bytes` with `mutations` applied in order.
pub fn apply(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in mutations {
        let len = out.len();
        match *m {
            Mutation::Truncate(f) => out.truncate(at(len, f)),
            Mutation::FlipBit(f, bit) if len > 0 => out[at(len, f).min(len - 1)] ^= 1 << bit,
            Mutation::PutU64(f, v) if len >= 8 => {
                let p = at(len - 7, f);
                out[p..p + 8].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::PutU32(f, v) if len >= 4 => {
                let p = at(len - 3, f);
                out[p..p + 4].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Number(f, text) if len > 0 => {
                let p = at(len, f).min(len - 1);
                let start = (p..len).chain(0..p).find(|&i| out[i].is_ascii_digit());
                if let Some(start) = start {
                    let end = (start..len)
                        .find(|&i| !out[i].is_ascii_digit())
                        .unwrap_or(len);
                    out.splice(start..end, text.bytes());
                }
            }
            Mutation::Delete(f, n) if len > 0 => {
                let p = at(len, f);
                out.drain(p..(p + n).min(len));
            }
            Mutation::Duplicate(f, n) if len > 0 => {
                let p = at(len, f);
                let end = (p + n).min(len);
                let copy = out[p..end].to_vec();
                out.splice(end..end, copy);
            }
            _ => {}
        }
    }
    out
}

/// Runs `load` and turns a panic into a test failure naming the mutations; returns the
/// loader's `Result` otherwise.
pub fn without_panic<T, E>(
    what: &str,
    mutations: &[Mutation],
    load: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what} panicked on mutations {mutations:?}: {message}")
        }
    }
}

/// Number of cases: a few hundred in CI, `LOADER_FUZZ_CASES` (e.g. 5000) when set — the
/// `#[ignore]`d long runs set it themselves.
pub fn cases(default: u32) -> u32 {
    std::env::var("LOADER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A scratch directory unique to this process and `tag`.
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("loader-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
