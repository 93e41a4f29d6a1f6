//! Value escaping (percent-encoding) and Redis glob escaping.

/// `true` for the RFC 3986 *unreserved* bytes `A-Z a-z 0-9 - . _ ~`: the only bytes a column value
/// contributes to a key as themselves.
const fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Lookup table for [`unreserved`]: one load per byte on the hot path.
static UNRESERVED: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = unreserved(i as u8);
        i += 1;
    }
    table
};

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Whether `c` is one of the RFC 3986 unreserved characters `A-Z a-z 0-9 - . _ ~`, which a column
/// value keeps as is inside a key (see [`encode_value`]).
pub fn is_unreserved(c: char) -> bool {
    c.is_ascii() && UNRESERVED[c as usize]
}

/// Whether `c` can appear in an *encoded* value: an unreserved character or `%`.
///
/// Literal text between two placeholders must contain a character outside this alphabet, so the
/// end of one encoded value is always unambiguous.
pub fn is_encoded_alphabet(c: char) -> bool {
    c == '%' || is_unreserved(c)
}

/// Percent-encodes one column value (its pgoutput text form) onto `out`.
///
/// RFC 3986 unreserved bytes `A-Z a-z 0-9 - . _ ~` are kept; every other byte (including `%`, `:`,
/// `{`, `}`, `*`, `?`, `[`, `]`, `\`, space, control characters and each byte of a non-ASCII UTF-8
/// character) becomes `%XX` with upper-case hex digits. The result therefore never contains a
/// key separator, a Redis Cluster hash-tag brace or a glob metacharacter, and it is canonical:
/// one value has exactly one encoding, [`decode_value`] inverts it.
///
/// ```
/// let mut key = String::from("product:");
/// cacheclear_rules::encode_value("a:b}*é", &mut key);
/// assert_eq!(key, "product:a%3Ab%7D%2A%C3%A9");
/// ```
pub fn encode_value(value: &str, out: &mut String) {
    let bytes = value.as_bytes();
    out.reserve(bytes.len());
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if UNRESERVED[usize::from(b)] {
            continue;
        }
        // `bytes[run_start..i]` are all unreserved ASCII, so both ends are char boundaries; `get`
        // keeps this panic-free regardless.
        if run_start < i
            && let Some(run) = value.get(run_start..i)
        {
            out.push_str(run);
        }
        out.push('%');
        out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
        out.push(char::from(HEX_UPPER[usize::from(b & 0x0F)]));
        run_start = i + 1;
    }
    if run_start < bytes.len()
        && let Some(run) = value.get(run_start..)
    {
        out.push_str(run);
    }
}

/// Length in bytes of [`encode_value`]'s output for `value` (used to size keys exactly).
pub(crate) fn encoded_len(value: &str) -> usize {
    value
        .as_bytes()
        .iter()
        .map(|&b| if UNRESERVED[usize::from(b)] { 1 } else { 3 })
        .sum()
}

/// Inverts [`encode_value`].
///
/// Returns `None` unless `encoded` is exactly what [`encode_value`] produces for some string:
/// only unreserved characters and `%XX` with two *upper-case* hex digits, never `%XX` for an
/// unreserved byte (that would be a second spelling of the same value), and the decoded bytes must
/// be UTF-8.
///
/// ```
/// assert_eq!(cacheclear_rules::decode_value("a%3Ab%C3%A9").as_deref(), Some("a:bé"));
/// assert_eq!(cacheclear_rules::decode_value("%41"), None); // `A` is always written as `A`
/// assert_eq!(cacheclear_rules::decode_value("a:b"), None); // `:` is never part of a value
/// ```
pub fn decode_value(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if UNRESERVED[usize::from(b)] {
            out.push(b);
            i += 1;
        } else if b == b'%' {
            let hi = hex_digit(*bytes.get(i + 1)?)?;
            let lo = hex_digit(*bytes.get(i + 2)?)?;
            let byte = (hi << 4) | lo;
            if UNRESERVED[usize::from(byte)] {
                return None;
            }
            out.push(byte);
            i += 3;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Escapes literal text for a Redis `SCAN MATCH` / `KEYS` glob: `*`, `?`, `[`, `]` and `\` get a
/// backslash, everything else is itself.
pub fn glob_escape(literal: &str, out: &mut String) {
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        let mut s = String::new();
        encode_value(v, &mut s);
        s
    }

    #[test]
    fn encodes_every_reserved_byte() {
        assert_eq!(enc("AZaz09-._~"), "AZaz09-._~");
        assert_eq!(enc(""), "");
        assert_eq!(enc("%"), "%25");
        assert_eq!(enc(":{}*?[]\\ "), "%3A%7B%7D%2A%3F%5B%5D%5C%20");
        assert_eq!(enc("\u{0}\n\u{7f}"), "%00%0A%7F");
        assert_eq!(enc("é€"), "%C3%A9%E2%82%AC");
        assert_eq!(enc("x/é/y"), "x%2F%C3%A9%2Fy");
        for v in ["", "a", "%", "é€x", "a b:c"] {
            assert_eq!(encoded_len(v), enc(v).len());
            assert_eq!(decode_value(&enc(v)).as_deref(), Some(v));
        }
    }

    #[test]
    fn decode_rejects_non_canonical_input() {
        assert_eq!(decode_value("%3a"), None);
        assert_eq!(decode_value("%4"), None);
        assert_eq!(decode_value("%"), None);
        assert_eq!(decode_value("%2D"), None); // `-` is unreserved
        assert_eq!(decode_value("%FF"), None); // not UTF-8
        assert_eq!(decode_value("é"), None);
    }

    #[test]
    fn glob_escapes_metacharacters() {
        let mut s = String::new();
        glob_escape("a*b?c[d]e\\f{g}", &mut s);
        assert_eq!(s, "a\\*b\\?c\\[d\\]e\\\\f{g}");
    }
}
