#![no_main]
//! Fuzzes `novacron_migration::fuzzing::decode_proxy_input`: arbitrary proxy messages must never
//! panic or allocate without bound at the destination.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron_migration::fuzzing::decode_proxy_input(data);
});
