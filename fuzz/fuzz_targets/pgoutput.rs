//! The pgoutput decoder (crates/source-postgres/src/pgoutput.rs) on any payload.
//! Property: no panic, no unbounded allocation; every input is a message or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match cacheclear_source_postgres::fuzzing::decode_pgoutput(data) {
        Ok(m) => assert!(!m.is_empty()),
        Err(e) => assert!(!e.is_empty()),
    }
});
