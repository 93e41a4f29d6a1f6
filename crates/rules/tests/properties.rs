//! Property tests: keys are injective (within a template and across a rule set), always valid
//! for the Redis key layout and covered by the scan patterns, and value escaping round-trips.

use cacheclear_protocol::KeyLayout;
use cacheclear_rules::{
    RuleConfig, RuleError, Rules, Template, decode_value, encode_value, is_encoded_alphabet,
};
use proptest::prelude::*;

/// Redis `stringmatchlen` (util.c) on bytes, case-sensitive: `*`, `?`, `[...]` with `^`
/// negation, `a-z` ranges and `\` escapes inside, `\x` outside, an unclosed `[` running to the
/// end of the pattern.
fn redis_glob(pattern: &[u8], string: &[u8]) -> bool {
    let (mut p, mut s) = (0usize, 0usize);
    while p < pattern.len() && s < string.len() {
        match pattern[p] {
            b'*' => {
                while pattern.get(p + 1) == Some(&b'*') {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    return true;
                }
                return (s..string.len())
                    .any(|start| redis_glob(&pattern[p + 1..], &string[start..]));
            }
            b'?' => s += 1,
            b'[' => {
                p += 1;
                let not = pattern.get(p) == Some(&b'^');
                if not {
                    p += 1;
                }
                let mut matched = false;
                loop {
                    if p >= pattern.len() {
                        // Unclosed class: Redis steps back so the outer `p += 1` ends the pattern.
                        p -= 1;
                        break;
                    }
                    let c = pattern[p];
                    if c == b'\\' && pattern.len() - p >= 2 {
                        p += 1;
                        if pattern[p] == string[s] {
                            matched = true;
                        }
                    } else if c == b']' {
                        break;
                    } else if pattern.len() - p >= 3 && pattern[p + 1] == b'-' {
                        let (mut lo, mut hi) = (pattern[p], pattern[p + 2]);
                        if lo > hi {
                            std::mem::swap(&mut lo, &mut hi);
                        }
                        p += 2;
                        if (lo..=hi).contains(&string[s]) {
                            matched = true;
                        }
                    } else if c == string[s] {
                        matched = true;
                    }
                    p += 1;
                }
                if not {
                    matched = !matched;
                }
                if !matched {
                    return false;
                }
                s += 1;
            }
            b'\\' => {
                if pattern.len() - p >= 2 {
                    p += 1;
                }
                if pattern[p] != string[s] {
                    return false;
                }
                s += 1;
            }
            c => {
                if c != string[s] {
                    return false;
                }
                s += 1;
            }
        }
        p += 1;
        if s == string.len() {
            while pattern.get(p) == Some(&b'*') {
                p += 1;
            }
            break;
        }
    }
    p == pattern.len() && s == string.len()
}

fn glob(pattern: &str, key: &str) -> bool {
    redis_glob(pattern.as_bytes(), key.as_bytes())
}

#[test]
fn glob_matcher_follows_redis() {
    assert!(glob("{product:*}*", "{product:42}"));
    assert!(glob("{product:*}*", "{product:42}:lease"));
    assert!(!glob("{product:*}*", "{products:42}"));
    assert!(glob("a\\*b", "a*b") && !glob("a\\*b", "axb"));
    assert!(glob("h?llo", "hello") && !glob("h?llo", "hllo"));
    assert!(glob("h[ae]llo", "hallo") && !glob("h[ae]llo", "hillo"));
    assert!(glob("h[^e]llo", "hallo") && !glob("h[^e]llo", "hello"));
    assert!(glob("h[a-b]llo", "hbllo") && glob("h[b-a]llo", "hallo"));
    assert!(glob("x[\\]]y", "x]y"));
    assert!(glob("a\\\\b", "a\\b"));
    assert!(glob("a*", "a") && glob("a**", "a") && glob("**x", "abx"));
    // Like stringmatchlen, which never runs its loop on an empty string (SCAN and KEYS special-
    // case the pattern `*` before calling it). Cache keys are never empty.
    assert!(!glob("*", ""));
    assert!(!glob("a", "") && !glob("", "a") && glob("", ""));
}

/// Characters that make collisions likely: unreserved ones, separators, escape-worthy ones.
const VALUE_CHARS: &[char] = &[
    'a', 'b', '1', '-', '.', '_', '~', ':', '/', '%', '{', '}', '*', '?', '[', ']', '\\', ' ', 'é',
    '\u{0}', 'A', '4', '1',
];
/// Literal-text characters (never `{`, `}`, `%`, control characters).
const LITERAL_CHARS: &[char] = &[
    'a', 'b', '-', '.', '_', ':', ':', '/', '*', '?', '[', ']', '\\', ' ', 'é',
];
/// Characters outside the encoded alphabet, for valid separators.
const SEPARATOR_CHARS: &[char] = &[':', '/', '*', '[', ']', '\\', ' ', 'é', '#'];

fn string_of(chars: &'static [char], len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(chars), len).prop_map(|v| v.into_iter().collect())
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![4 => string_of(VALUE_CHARS, 0..5), 1 => any::<String>()]
}

/// A valid template with `n` placeholders over columns `c0..`: random literal text, and a
/// separator char between placeholders.
fn valid_template(placeholders: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
    placeholders
        .prop_flat_map(|n| {
            (
                string_of(LITERAL_CHARS, 1..4),
                prop::collection::vec(
                    (
                        string_of(LITERAL_CHARS, 0..2),
                        prop::sample::select(SEPARATOR_CHARS),
                        string_of(LITERAL_CHARS, 0..2),
                    ),
                    n.saturating_sub(1),
                ),
                string_of(LITERAL_CHARS, 0..3),
                Just(n),
            )
        })
        .prop_map(|(prefix, separators, suffix, n)| {
            let mut s = prefix;
            for i in 0..n {
                s.push_str(&format!("{{c{i}}}"));
                if let Some((a, c, b)) = separators.get(i) {
                    s.push_str(a);
                    s.push(*c);
                    s.push_str(b);
                }
            }
            s.push_str(&suffix);
            s
        })
}

/// Literal pieces that make templates of a rule set overlap often.
const NEAR_MISSES: &[&str] = &["", "", "a", "a:", "ab", "a-", "x", ":", "-b", "b:"];

fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(NEAR_MISSES).prop_map(String::from),
        1 => string_of(LITERAL_CHARS, 0..3),
    ]
}

/// Any template over columns `c0..`: mostly valid, often overlapping others of its rule set,
/// sometimes rejected by the parser (adjacent or unseparated placeholders, no literal text).
fn any_template() -> impl Strategy<Value = String> {
    let separator = prop_oneof![
        6 => (literal(), prop::sample::select(SEPARATOR_CHARS), literal())
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        1 => literal(),
    ];
    (
        literal(),
        prop::option::weighted(0.85, prop::collection::vec(separator, 0..3)),
        literal(),
    )
        .prop_map(|(prefix, separators, suffix)| {
            let mut s = prefix;
            if let Some(separators) = separators {
                s.push_str("{c0}");
                for (i, sep) in separators.iter().enumerate() {
                    s.push_str(sep);
                    s.push_str(&format!("{{c{}}}", i + 1));
                }
            }
            s.push_str(&suffix);
            s
        })
}

/// Templates from very few pieces, so that pairs overlap often.
fn tight_template() -> impl Strategy<Value = String> {
    let piece =
        |options: &'static [&'static str]| prop::sample::select(options).prop_map(String::from);
    (
        piece(&["", "a", "a:", ":", "-", "ab"]),
        prop::collection::vec(piece(&[":", "a:", ":a", "-:", "/"]), 0..2),
        prop::bool::weighted(0.8),
        piece(&["", "a", ":", "-", "b:", "ab"]),
    )
        .prop_map(|(prefix, separators, placeholders, suffix)| {
            let mut s = prefix;
            if placeholders {
                s.push_str("{c0}");
                for (i, sep) in separators.iter().enumerate() {
                    s.push_str(sep);
                    s.push_str(&format!("{{c{}}}", i + 1));
                }
            }
            s.push_str(&suffix);
            s
        })
}

/// `template` with one small edit that often keeps its keys overlapping the original's: an
/// unreserved char inserted or deleted outside placeholders, a placeholder replaced by literal
/// text, or a literal char replaced by a placeholder.
fn mutated(template: String) -> impl Strategy<Value = String> {
    // Char indexes outside placeholders (insertion points and literal chars).
    let mut outside = Vec::new();
    let mut depth = 0;
    for (i, c) in template.char_indices() {
        if depth == 0 && c != '{' {
            outside.push(i);
        }
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
    }
    outside.push(template.len());
    (
        prop::sample::select(outside),
        0..4u8,
        prop::sample::select(&['x', '-', '.'][..]),
    )
        .prop_map(move |(at, op, c)| {
            let (head, tail) = template.split_at(at);
            match op {
                0 => format!("{head}{c}{tail}"),
                1 => {
                    let mut tail = tail.chars();
                    match tail.next() {
                        Some(d) if d.is_ascii_alphanumeric() || "-._~".contains(d) => {
                            format!("{head}{}", tail.as_str())
                        }
                        _ => format!("{head}{c}{}", tail.as_str()),
                    }
                }
                2 => template.replacen("{c0}", &c.to_string(), 1),
                _ => {
                    let mut tail = tail.chars();
                    tail.next();
                    format!("{head}{{c9}}{}", tail.as_str())
                }
            }
        })
}

fn some_template() -> impl Strategy<Value = String> {
    prop_oneof![tight_template(), any_template()]
}

fn values_for(t: &Template) -> impl Strategy<Value = Vec<String>> + use<> {
    prop::collection::vec(value(), t.columns().count())
}

fn render(t: &Template, values: &[String]) -> String {
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    t.render(&refs).expect("one value per placeholder")
}

/// A key produced through the full path: `Rules` → `TableRules::keys_for`.
fn keys_via_rules(rules: &Rules, table: &str, values: &[String]) -> Vec<String> {
    let row: Vec<(String, Option<&str>)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("c{i}"), Some(v.as_str())))
        .collect();
    let row: Vec<(&str, Option<&str>)> = row.iter().map(|(c, v)| (c.as_str(), *v)).collect();
    let mut out = Vec::new();
    rules
        .table("public", table)
        .expect("table configured")
        .keys_for(&row, &mut out)
        .expect("all columns present");
    out
}

/// The shortest key of at most `max_len` chars from `alphabet` that both templates can produce.
fn common_key(a: &Template, b: &Template, alphabet: &[char], max_len: usize) -> Option<String> {
    let mut layer = vec![String::new()];
    for _ in 0..=max_len {
        if let Some(key) = layer
            .iter()
            .find(|k| a.decode_key(k).is_some() && b.decode_key(k).is_some())
        {
            return Some(key.clone());
        }
        layer = layer
            .iter()
            .flat_map(|k| alphabet.iter().map(move |c| format!("{k}{c}")))
            .collect();
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Escaping round-trips, and encoded text uses only the encoded alphabet.
    #[test]
    fn escaping_roundtrips(v in value()) {
        let mut encoded = String::new();
        encode_value(&v, &mut encoded);
        prop_assert!(encoded.chars().all(is_encoded_alphabet), "{encoded}");
        let forbidden = ['{', '}', ':', '*', '?', '[', ']', '\\', ' '];
        prop_assert!(!encoded.contains(forbidden), "{}", encoded);
        prop_assert_eq!(decode_value(&encoded), Some(v));
    }

    /// Within one template of at least two placeholders, distinct value tuples give distinct
    /// keys, and every key reads back to its values.
    #[test]
    fn one_template_is_injective(
        (source, a, b) in valid_template(2..=4).prop_flat_map(|s| {
            let t = Template::parse(&s).expect("generated templates are valid");
            (Just(s), values_for(&t), values_for(&t))
        })
    ) {
        let t = Template::parse(&source).expect("valid");
        let (ka, kb) = (render(&t, &a), render(&t, &b));
        prop_assert_eq!(
            a == b, ka == kb, "{} gives {} for {:?} and {} for {:?}", source, ka, a, kb, b
        );
        prop_assert_eq!(t.decode_key(&ka), Some(a));
        prop_assert_eq!(t.decode_key(&kb), Some(b));
    }

    /// A realistic template with near-miss values.
    #[test]
    fn listing_template_is_injective(a in value(), b in value(), c in value(), d in value()) {
        let t = Template::parse("category:{category_id}:products:{page}").expect("valid");
        let (k1, k2) = (t.render(&[&a, &b]).expect("2"), t.render(&[&c, &d]).expect("2"));
        prop_assert_eq!((&a, &b) == (&c, &d), k1 == k2);
    }

    /// Across a rule set: two keys are equal only if their templates have the same shape and the
    /// values are equal; every key is a valid layout key matched by its table's scan patterns.
    /// When `compile` reports an overlap, its example really is a key of both templates.
    #[test]
    fn rule_set_keys_never_collide(
        (sources, values) in prop::collection::vec(any_template(), 2..6).prop_flat_map(|sources| {
            let values: Vec<_> = sources
                .iter()
                .map(|s| {
                    let n = s.matches('{').count();
                    prop::collection::vec(prop::collection::vec(value(), n), 1..4)
                })
                .collect();
            (Just(sources), values)
        })
    ) {
        // One table per template, so every template is checked against every other one.
        let configs: Vec<RuleConfig> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| RuleConfig { table: format!("t{i}"), keys: vec![s.clone()] })
            .collect();
        let rules = match Rules::compile(&configs) {
            Ok(rules) => rules,
            Err(RuleError::OverlappingTemplates { first, second, example }) => {
                let (first_template, second_template) = (&first.template, &second.template);
                let a = Template::parse(first_template).expect("compiled once");
                let b = Template::parse(second_template).expect("compiled once");
                prop_assert!(!a.same_shape(&b));
                prop_assert!(a.decode_key(&example).is_some(), "{} !~ {}", a, example);
                prop_assert!(b.decode_key(&example).is_some(), "{} !~ {}", b, example);
                return Ok(());
            }
            Err(_) => return Ok(()), // a syntax error; covered elsewhere
        };
        let templates: Vec<Template> = rules.tables().map(|t| t.templates()[0].clone()).collect();
        let mut produced: Vec<(usize, &Vec<String>, String)> = Vec::new();
        for (i, tuples) in values.iter().enumerate() {
            let table = rules.tables().nth(i).expect("one table per template");
            for tuple in tuples {
                let keys = keys_via_rules(&rules, &format!("t{i}"), tuple);
                prop_assert_eq!(keys.len(), 1);
                let key = keys[0].clone();
                prop_assert_eq!(&key, &render(&templates[i], tuple));
                let layout = KeyLayout::new(&key);
                prop_assert!(layout.is_ok(), "{:?} rejected by KeyLayout", key);
                let layout = layout.expect("checked");
                for redis_key in [layout.value().to_owned(), layout.lease(), layout.fence()] {
                    prop_assert!(
                        table.scan_patterns().iter().any(|p| glob(p, &redis_key)),
                        "{} not matched by {:?}", redis_key, table.scan_patterns()
                    );
                }
                // Decoding is exact: only same-shape templates read this key, and back to
                // these values.
                for (j, other) in templates.iter().enumerate() {
                    let decoded = other.decode_key(&key);
                    if other.same_shape(&templates[i]) {
                        prop_assert_eq!(decoded.as_ref(), Some(tuple), "{} vs {}", i, j);
                    } else {
                        prop_assert_eq!(
                            decoded, None, "{} from {} read by {}", key, sources[i], sources[j]
                        );
                    }
                }
                produced.push((i, tuple, key));
            }
        }
        for (i, (ta, va, ka)) in produced.iter().enumerate() {
            for (tb, vb, kb) in &produced[i + 1..] {
                if ka == kb {
                    prop_assert!(templates[*ta].same_shape(&templates[*tb]) && va == vb,
                        "{} from {} {:?} and {} {:?}", ka, sources[*ta], va, sources[*tb], vb);
                }
            }
        }
    }

    /// `decode_key` accepts exactly the keys `render` produces.
    #[test]
    fn decode_key_is_exact(
        source in valid_template(0..=3),
        key in string_of(VALUE_CHARS, 0..12),
    ) {
        let t = Template::parse(&source).expect("valid");
        let key = format!("{}{}", source.chars().take(2).collect::<String>(), key);
        if let Some(values) = t.decode_key(&key) {
            prop_assert_eq!(render(&t, &values), key);
        }
    }
}

proptest! {
    // Each case brute-forces ~10^4 candidate keys.
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// Two templates: `compile` rejects the pair exactly when some key reads under both. An
    /// overlap comes with a real witness; an accepted pair has no key in common among samples.
    #[test]
    fn overlap_check_is_sound(
        (a, b) in prop_oneof![
            1 => (some_template(), some_template()),
            2 => some_template().prop_flat_map(|a| (Just(a.clone()), mutated(a))),
        ],
        values in prop::collection::vec(value(), 5),
    ) {
        let (Ok(ta), Ok(tb)) = (Template::parse(&a), Template::parse(&b)) else {
            return Ok(());
        };
        let configs = [
            RuleConfig { table: "a".into(), keys: vec![a.clone()] },
            RuleConfig { table: "b".into(), keys: vec![b.clone()] },
        ];
        // Independent brute force: the shortest key of up to 4 chars over the templates' literal
        // characters (plus unreserved `z`, `0`) that reads under both.
        let mut alphabet: Vec<char> =
            a.chars().chain(b.chars()).filter(|c| !"{}".contains(*c)).collect();
        alphabet.extend(['z', '0']);
        alphabet.sort_unstable();
        alphabet.dedup();
        let common = common_key(&ta, &tb, &alphabet, 4);
        let result = Rules::compile(&configs);
        match (&result, &common) {
            (Err(RuleError::OverlappingTemplates { example, .. }), Some(common)) => {
                prop_assert_eq!(example.chars().count(), common.chars().count(), "not shortest");
            }
            (Err(RuleError::OverlappingTemplates { example, .. }), None) => {
                prop_assert!(example.chars().count() > 4, "brute force missed {}", example);
            }
            (_, Some(common)) => prop_assert!(
                ta.same_shape(&tb),
                "{} and {} both produce {}, compile says {:?}", a, b, common, result
            ),
            (_, None) => {}
        }
        match result {
            Err(RuleError::OverlappingTemplates { example, .. }) => {
                prop_assert!(!ta.same_shape(&tb));
                prop_assert!(ta.decode_key(&example).is_some(), "{} !~ {}", a, example);
                prop_assert!(tb.decode_key(&example).is_some(), "{} !~ {}", b, example);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
            Ok(_) => {
                if !ta.same_shape(&tb) {
                    for (t, other) in [(&ta, &tb), (&tb, &ta)] {
                        let n = t.columns().count();
                        let key = render(t, &values[..n]);
                        prop_assert_eq!(
                            other.decode_key(&key), None, "{} from {} reads as {}", key, t, other
                        );
                    }
                }
            }
        }
    }
}
