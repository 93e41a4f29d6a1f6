//! The Debezium decoder (crates/invalidator/src/decode.rs) on any key and value, under every
//! `[debezium]` setting. Input: byte 0 selects the settings, byte 1 the key length (255: no key),
//! then the key, then the value (empty: a tombstone).
//! Properties: no panic; every evicted key is a valid cache key that one of the table's
//! templates produces (`Template::decode_key`), so a hostile event can only evict keys of its
//! own table; table-wide evictions use exactly the table's scan patterns.
#![no_main]

use std::sync::{Arc, OnceLock};

use cacheclear_invalidator::{BeforeImages, DebeziumConfig, Decoded, Decoder, Format};
use cacheclear_protocol::KeyLayout;
use cacheclear_rules::{RuleConfig, Rules};
use libfuzzer_sys::fuzz_target;

fn rules() -> &'static Arc<Rules> {
    static R: OnceLock<Arc<Rules>> = OnceLock::new();
    R.get_or_init(|| {
        let product = RuleConfig {
            table: "public.product".into(),
            keys: vec![
                "product:{id}".into(),
                "category:{category_id}:products".into(),
            ],
        };
        let order = RuleConfig {
            table: "shop.orders".into(),
            keys: vec!["o:{shop}:{id}".into()],
        };
        Arc::new(Rules::compile(&[product, order]).expect("rules compile"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, rest)) = data.split_first() else {
        return;
    };
    let Some((&key_len, rest)) = rest.split_first() else {
        return;
    };
    let (key, value) = if key_len == 255 {
        (None, rest)
    } else {
        let n = usize::from(key_len).min(rest.len());
        (Some(&rest[..n]), &rest[n..])
    };
    let value = (!value.is_empty()).then_some(value);
    let mut cfg = DebeziumConfig::default();
    cfg.before_images = if settings & 1 == 0 {
        BeforeImages::Full
    } else {
        BeforeImages::Default
    };
    cfg.evict_on_snapshot = settings & 2 == 0;
    let decoder = Decoder::new(Arc::clone(rules()), cfg)
        .expect("default date style and time zone are valid");
    if let Ok(Decoded::Evict(e)) = decoder.decode(Format::Debezium, key, value) {
        let tables: Vec<_> = rules().tables().collect();
        for k in &e.keys {
            assert!(KeyLayout::new(k).is_ok(), "evicts an invalid key {k:?}");
            let produced = tables
                .iter()
                .flat_map(|t| t.templates())
                .any(|t| t.decode_key(k).is_some());
            assert!(produced, "evicts {k:?}, which no template produces");
        }
        if !e.patterns.is_empty() {
            assert!(
                tables.iter().any(|t| t.scan_patterns() == e.patterns),
                "table-wide eviction with foreign patterns {:?}",
                e.patterns
            );
        }
    }
});
