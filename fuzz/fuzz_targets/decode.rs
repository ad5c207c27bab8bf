//! Arbitrary bytes through every decoder a DOTS peer can reach:
//! `cargo +nightly fuzz run decode fuzz/corpus/decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dots_proto::fuzzing::decode_everything(std::time::Instant::now(), data);
});
