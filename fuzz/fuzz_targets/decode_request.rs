//! decode_request over arbitrary bytes: never panics, and a request that decodes re-encodes to
//! one that decodes to the same thing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    warden_wire::fuzzing::check_decode_request(data);
});
