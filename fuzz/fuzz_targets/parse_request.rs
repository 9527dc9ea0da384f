//! The cargo-fuzz target for `checks/parse_request.rs` (what it checks is written there).
#![no_main]

#[path = "../checks/parse_request.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
