//! The HTTP/2 frame reader that watches every connection never panics on any byte stream,
//! split anywhere, in either direction.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tonic_pool::__fuzz::feed_frames(data);
});
