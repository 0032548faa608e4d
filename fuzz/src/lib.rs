//! The checks behind Spillway's fuzz targets, one module per target.
//!
//! Each `check(data)` takes the raw fuzz input, runs one Spillway entry
//! point on it and panics when an invariant does not hold (libFuzzer
//! reports the panic as a crash and saves the input). The binaries in
//! `fuzz_targets/` are one-line `fuzz_target!` wrappers around them.
//!
//! Inputs that steer the harness (cap sizes, read boundaries, which
//! provider) spend their first bytes on it; the rest is the payload, so a
//! seed is a small header followed by a real transcript or document.

#![forbid(unsafe_code)]

pub mod config;
pub mod provider_stream;
pub mod request_json;
pub mod sse_decoder;
pub mod ws_frame;

use std::sync::OnceLock;

use bytes::Bytes;

/// Whether `SPILLWAY_FUZZ_VERBOSE` is set: the checks then print what each
/// input did (accepted or rejected, and why), which tells whether seeds and
/// crash inputs reach the code they are meant to.
pub fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("SPILLWAY_FUZZ_VERBOSE").is_some())
}

/// `eprintln!` when [`verbose`].
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::verbose() {
            eprintln!($($arg)*);
        }
    };
}

/// Splits `payload` into reads at boundaries chosen by `seed`, the way a
/// network body arrives: mode 0 feeds it byte by byte, the others in
/// pseudo-random chunks of 1..=max bytes (max from a small table), with
/// empty reads mixed in when `seed & 0x40` is set.
pub fn split_reads(payload: &[u8], seed: u8) -> Vec<Bytes> {
    const MAX_CHUNK: [usize; 8] = [1, 2, 3, 5, 8, 17, 64, 1024];
    let max = MAX_CHUNK[usize::from(seed & 0x07)];
    let empties = seed & 0x40 != 0;
    // xorshift64*, seeded from the header and the length so the same
    // header splits different payloads differently.
    let mut state = (u64::from(seed) << 32) ^ (payload.len() as u64) ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut reads = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let roll = next();
        if empties && roll % 5 == 0 {
            reads.push(Bytes::new());
        }
        let size = (1 + ((roll >> 8) as usize) % max).min(rest.len());
        let (head, tail) = rest.split_at(size);
        reads.push(Bytes::copy_from_slice(head));
        rest = tail;
    }
    reads
}

/// The upstream failure injected at the end of a body (a reset connection).
pub fn broken_pipe() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "fuzz: connection reset",
    )
}

/// A body stream of `reads`, optionally ending with an upstream error.
pub fn body(
    reads: Vec<Bytes>,
    fail_at_end: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut items: Vec<Result<Bytes, std::io::Error>> = reads.into_iter().map(Ok).collect();
    if fail_at_end {
        items.push(Err(broken_pipe()));
    }
    futures_util::stream::iter(items)
}
