#![no_main]
//! Fuzzes `novacron_migration::fuzzing::parse_multifd_input`: arbitrary bytes must never panic,
//! allocate without bound, or rebuild to anything but the bytes the parser consumed.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron_migration::fuzzing::parse_multifd_input(data);
});
