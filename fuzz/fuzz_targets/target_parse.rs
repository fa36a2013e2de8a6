//! Target parsing never panics, and what it accepts round-trips through Display.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(target) = tonic_pool::Target::parse(s) {
            let again = tonic_pool::Target::parse(&target.to_string()).expect("round trip");
            assert_eq!(again, target);
            let _ = target.authority();
        }
    }
});
