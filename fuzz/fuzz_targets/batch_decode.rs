//! The cargo-fuzz target for `checks/batch_decode.rs` (what it checks is written there).
#![no_main]

#[path = "../checks/batch_decode.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
