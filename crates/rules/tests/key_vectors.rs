//! The shared key rendering vectors (`conformance/key_rendering.json`): every client renders a
//! cache key from a template and column values exactly as the pipeline does, so this file pins
//! `Template::parse` and `Template::render` to it; the Python client runs the same file.

use std::path::PathBuf;

use cacheclear_rules::Template;
use serde_json::Value;

fn vectors() -> Vec<Value> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/key_rendering.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    doc["vectors"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no `vectors` array", path.display()))
        .clone()
}

#[test]
fn renders_every_vector_like_the_file_says() {
    let vectors = vectors();
    assert!(vectors.len() >= 20, "only {} vectors", vectors.len());
    let mut failures = Vec::new();
    for (i, v) in vectors.iter().enumerate() {
        let source = v["template"].as_str().expect("template is a string");
        let parsed = Template::parse(source);
        if v["error"].as_bool() == Some(true) {
            if let Ok(t) = parsed {
                failures.push(format!(
                    "vector {i}: `{source}` parsed ({t:?}) but must be refused"
                ));
            }
            continue;
        }
        let t = match parsed {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("vector {i}: `{source}` refused: {e}"));
                continue;
            }
        };
        let values: Vec<&str> = t
            .columns()
            .map(|c| {
                v["values"][c]
                    .as_str()
                    .unwrap_or_else(|| panic!("vector {i}: no text value for column `{c}`"))
            })
            .collect();
        let expected = v["key"].as_str().expect("key is a string");
        if v["values"].as_object().map(|m| m.len()) != Some(values.len()) {
            failures.push(format!(
                "vector {i}: values name columns the template lacks"
            ));
        }
        match t.render(&values) {
            Some(key) if key == expected => {
                // And back: the pipeline's audit reads keys back to column values.
                let back = t.decode_key(&key);
                let want: Vec<String> = values.iter().map(|s| (*s).to_owned()).collect();
                if back.as_ref() != Some(&want) {
                    failures.push(format!("vector {i}: `{key}` decodes to {back:?}"));
                }
            }
            other => failures.push(format!(
                "vector {i}: `{source}` rendered {other:?}, want `{expected}`"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
