//! Where a cached value was read: from its envelope (`crates/client/src/envelope.rs`).

use cacheclear_protocol::Lsn;

/// Where a stored value's read stood, as its envelope records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPosition {
    /// The value reflects the database at least at this LSN: the envelope's `version` when set
    /// (replica read), else its `read_after` (the fence when the lease was taken; `0/0` for a
    /// key that had none).
    Known(Lsn),
    /// An envelope without a read position (written by a client from before `read_after`, on a
    /// primary read).
    Unknown,
    /// Not a cacheclear envelope (no JSON object with an integer `format`), or a position that
    /// does not parse as an LSN.
    NotEnvelope,
}

/// The read position recorded in stored envelope bytes `bytes`. Only `format`, `version` and
/// `read_after` are read; the payload is skipped.
pub fn read_position(bytes: &[u8]) -> ReadPosition {
    #[derive(serde::Deserialize)]
    struct Head {
        #[allow(dead_code)]
        format: u32,
        #[serde(default)]
        version: Option<Lsn>,
        #[serde(default)]
        read_after: Option<Lsn>,
    }
    match serde_json::from_slice::<Head>(bytes) {
        Ok(Head {
            version: Some(v), ..
        }) => ReadPosition::Known(v),
        Ok(Head {
            read_after: Some(r),
            ..
        }) => ReadPosition::Known(r),
        Ok(_) => ReadPosition::Unknown,
        Err(_) => ReadPosition::NotEnvelope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let replica = br#"{"format":1,"version":"0/20","read_after":"0/10","delta_ms":1,"expiry_ms":2,"payload":{"a":1}}"#;
        assert_eq!(read_position(replica), ReadPosition::Known(Lsn(0x20)));
        let primary = br#"{"format":1,"version":null,"read_after":"0/10","delta_ms":1,"expiry_ms":2,"payload":1}"#;
        assert_eq!(read_position(primary), ReadPosition::Known(Lsn(0x10)));
        let old = br#"{"format":1,"version":null,"delta_ms":1,"expiry_ms":2,"payload":1}"#;
        assert_eq!(read_position(old), ReadPosition::Unknown);
        assert_eq!(read_position(b"cached"), ReadPosition::NotEnvelope);
        assert_eq!(
            read_position(br#"{"format":1,"version":"nope","payload":1}"#),
            ReadPosition::NotEnvelope
        );
    }
}
