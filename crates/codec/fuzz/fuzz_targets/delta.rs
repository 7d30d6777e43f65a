#![no_main]
//! Fuzzes `novacron_codec::fuzzing::apply_delta_input`: arbitrary bytes must never panic, read or write out of
//! bounds, or allocate without bound.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron_codec::fuzzing::apply_delta_input(data);
});
