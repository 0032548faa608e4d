#![no_main]
//! See `spillway_fuzz::request_json` for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spillway_fuzz::request_json::check(data));
