//! Key templates and value escaping (crates/rules): parsing, rendering, reading keys back.
//! Input: a template source, then the values, separated by NUL bytes (lossy UTF-8).
//! Properties: no panic; `decode_value(encode_value(v)) == v` and the encoding uses only the
//! encoded alphabet; a rendered key is a valid cache key (no braces) that `decode_key` reads back
//! to exactly the values; `scan_pattern` wraps the literal text in one hash tag.
#![no_main]

use cacheclear_protocol::KeyLayout;
use cacheclear_rules::{Template, decode_value, encode_value, is_encoded_alphabet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let values: Vec<&str> = parts.collect();
    for v in &values {
        let mut enc = String::new();
        encode_value(v, &mut enc);
        assert!(enc.chars().all(is_encoded_alphabet), "{enc:?}");
        assert_eq!(decode_value(&enc).as_deref(), Some(*v));
    }
    let Ok(t) = Template::parse(source) else {
        return;
    };
    let n = t.columns().count();
    // As many values as placeholders: cycle the given ones (or empty strings).
    let vals: Vec<&str> = (0..n)
        .map(|i| values.get(i % values.len().max(1)).copied().unwrap_or(""))
        .collect();
    let key = t.render(&vals).expect("one value per placeholder");
    assert!(
        KeyLayout::new(&key).is_ok(),
        "renders an invalid key {key:?}"
    );
    let back = t.decode_key(&key).expect("a rendered key reads back");
    assert_eq!(back, vals);
    assert_eq!(t.render(&vals[..n.saturating_sub(1)]).is_none(), n > 0);
    let pattern = t.scan_pattern();
    assert!(
        pattern.starts_with('{') && pattern.ends_with("}*"),
        "{pattern}"
    );
});
