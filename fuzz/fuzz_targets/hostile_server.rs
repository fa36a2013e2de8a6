//! A pool facing a hostile HTTP/2 server: any frame sequence on any connection leaves no
//! panic, no call past its deadline, no call counted in flight, and a `close()` that returns
//! and lets go of every connection. See `src/hostile_server.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pool_fuzz::hostile_server::run(data);
});
