//! The bus-record decoder: `BusRecord::from_json` (crates/protocol/src/record.rs) and the
//! invalidator's bus path (`Decoder::decode(Format::Bus, …)`) on any bytes.
//! Properties: no panic; a record (eviction or control) that parses re-encodes to JSON that
//! parses to the same record; every key the invalidator would evict is a valid cache key (no
//! braces, not empty); a control record the invalidator accepts names a valid namespace and, for
//! a watermark, at least one partition.
#![no_main]

use std::sync::{Arc, OnceLock};

use cacheclear_invalidator::{DebeziumConfig, Decoded, Decoder, Format};
use cacheclear_protocol::{BusControl, BusRecord, KeyLayout, NamespaceLayout};
use cacheclear_rules::Rules;
use libfuzzer_sys::fuzz_target;

fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| {
        let rules = Rules::compile(&[]).expect("no rules compile");
        Decoder::new(Arc::new(rules), DebeziumConfig::default())
            .expect("the default Debezium settings are valid")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = BusRecord::from_json(data) {
        let again = BusRecord::from_json(&r.to_json()).expect("a record's own JSON parses");
        assert_eq!(again, r);
    }
    if let Ok(c) = BusControl::from_json(data) {
        let again =
            BusControl::from_json(&c.to_json()).expect("a control record's own JSON parses");
        assert_eq!(again, c);
        assert!(BusControl::is_control(&c.to_json()));
    }
    match decoder().decode(Format::Bus, None, Some(data)) {
        Ok(Decoded::Evict(e)) => {
            for k in &e.keys {
                assert!(KeyLayout::new(k).is_ok(), "evicts an invalid key {k:?}");
            }
            assert!(e.patterns.iter().all(|p| !p.is_empty()));
            assert!(
                e.keys.len() + e.patterns.len() > 0,
                "an eviction of nothing"
            );
        }
        Ok(Decoded::Control(c)) => {
            assert!(NamespaceLayout::new(c.namespace()).is_ok());
            if let BusControl::Watermark { partitions, .. } = c {
                assert!(partitions > 0, "a watermark for no partition");
            }
        }
        Ok(Decoded::Skip(_)) => panic!("a bus record with a value is never skipped"),
        Err(_) => {}
    }
});
