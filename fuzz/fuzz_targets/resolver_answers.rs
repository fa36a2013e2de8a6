//! A pool fed arbitrary resolver answers (empty, duplicated, thousands of addresses, v4 and v6,
//! errors): after each answer the active endpoints are exactly the last good answer's, each
//! with its connections, and closing lets go of every connection. See
//! `src/resolver_answers.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pool_fuzz::resolver_answers::run(data);
});
