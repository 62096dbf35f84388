//! FrameDecoder over arbitrary bytes with arbitrary split points: never panics, never returns a
//! frame larger than the maximum, and splits the same way however the bytes arrive.
//! (The first byte picks the maximum, the next two the split points.)
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    warden_wire::fuzzing::check_decode_frame(data);
});
