//! The cargo-fuzz target for `checks/http_connection.rs` (what it checks is written there).
#![no_main]

#[path = "../checks/http_connection.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
