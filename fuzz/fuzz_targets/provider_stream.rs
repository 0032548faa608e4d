#![no_main]
//! See `spillway_fuzz::provider_stream` for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spillway_fuzz::provider_stream::check(data));
