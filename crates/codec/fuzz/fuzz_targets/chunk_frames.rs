#![no_main]
//! Fuzzes `novacron_codec::fuzzing::decode_chunk_stream`: arbitrary bytes must never panic, read or write out of
//! bounds, or allocate without bound.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron_codec::fuzzing::decode_chunk_stream(data);
});
