#![no_main]
//! See `spillway_fuzz::ws_frame` for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spillway_fuzz::ws_frame::check(data));
