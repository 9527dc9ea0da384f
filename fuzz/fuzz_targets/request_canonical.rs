//! The cargo-fuzz target for `checks/request_canonical.rs` (what it checks is written there).
#![no_main]

#[path = "../checks/request_canonical.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
