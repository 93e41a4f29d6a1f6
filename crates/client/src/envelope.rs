//! The value envelope stored at `{K}`.
//!
//! # Stored format (JSON, UTF-8)
//!
//! ```json
//! {"format":1,"version":"0/16B6C50","read_after":"0/16B6B00","delta_ms":12,"expiry_ms":1764445200000,"payload":{"id":42,"price_cents":1999}}
//! ```
//!
//! | field       | type                 | meaning                                                                                                  |
//! |-------------|----------------------|----------------------------------------------------------------------------------------------------------|
//! | `format`    | integer              | envelope format, currently `1`. Readers treat any other shape as a miss and the next fill overwrites it. |
//! | `version`   | string or `null`     | the LSN the loader read at (PostgreSQL `X/X` text, as `pg_last_wal_replay_lsn()` prints it); `null` for reads on the primary, where the lease alone guards the fill |
//! | `read_after` | string, absent       | the key's fence when the filling process took the lease (`0/0` when there was none): the value was read after every change up to this LSN was invalidated, so it reflects at least that position. Added in format 1 without a format change (readers ignore unknown fields); absent in values written before it, which `cacheclear audit` counts as unverifiable |
//! | `delta_ms`  | integer (ms)         | δ: how long the load took; XFetch's head start scales with it                                            |
//! | `expiry_ms` | integer (Unix ms)    | wall-clock time the value's TTL ends, by the filling process's clock (for XFetch)                       |
//! | `payload`   | any JSON             | the application's value, as `serde_json` serializes it                                                   |
//! | `epoch`     | integer, optional    | the namespace epoch the value was filled under (clients with a staleness bound, see [`crate::StalenessConfig`]); absent for clients without one. Such a client treats a value of an older epoch, or without the field (epoch 0), as a miss |
//!
//! Other tools (the `audit` command, a `redis-cli GET`) can read it without this crate.

use cacheclear_protocol::Lsn;
use serde::{Deserialize, Serialize};

/// The envelope format this crate writes.
pub const FORMAT: u32 = 1;

/// The value envelope stored at `{K}`; see the [module docs](self) for the JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Envelope format, [`FORMAT`].
    pub format: u32,
    /// The version the payload was read at; `None` for reads on the primary.
    pub version: Option<Lsn>,
    /// The key's fence when the lease was taken (`Lsn(0)` when the key had none): the payload was
    /// read after every change up to this LSN had been invalidated. `None` in values written
    /// before the field existed. `cacheclear audit` compares it with later invalidations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_after: Option<Lsn>,
    /// Load duration δ, in ms.
    pub delta_ms: u64,
    /// Expiry, Unix ms (the filling process's wall clock).
    pub expiry_ms: u64,
    /// The application's value.
    pub payload: T,
    /// The namespace epoch the value was filled under; `None` (field absent) counts as epoch 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl<T: Serialize> Envelope<T> {
    /// The envelope's stored bytes.
    ///
    /// # Errors
    /// The payload's `Serialize` implementation failed (for example a map with non-string keys).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

impl<T: for<'de> Deserialize<'de>> Envelope<T> {
    /// Parses stored bytes.
    ///
    /// # Errors
    /// The bytes are not an envelope of format [`FORMAT`] with a payload of type `T`.
    pub fn decode(bytes: &[u8]) -> Result<Envelope<T>, DecodeError> {
        let env: Envelope<T> = serde_json::from_slice(bytes).map_err(DecodeError::Json)?;
        if env.format != FORMAT {
            return Err(DecodeError::Format(env.format));
        }
        Ok(env)
    }
}

/// Stored bytes that are not a current envelope (the client treats them as a miss).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, not an envelope, or the payload does not deserialize into the requested type.
    #[error("not a cacheclear envelope holding the requested type: {0}")]
    Json(#[source] serde_json::Error),
    /// An envelope of another format.
    #[error("envelope format {0} is not supported (this client reads format {FORMAT})")]
    Format(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Product {
        id: i64,
        price_cents: i64,
    }

    #[test]
    fn stored_format_is_stable() {
        let env = Envelope {
            format: FORMAT,
            version: Some(Lsn(0x16B_6C50)),
            read_after: Some(Lsn(0x16B_6B00)),
            delta_ms: 12,
            expiry_ms: 1_764_445_200_000,
            payload: Product {
                id: 42,
                price_cents: 1999,
            },
            epoch: None,
        };
        let bytes = env.encode().unwrap();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"format":1,"version":"0/16B6C50","read_after":"0/16B6B00","delta_ms":12,"expiry_ms":1764445200000,"payload":{"id":42,"price_cents":1999}}"#
        );
        // A value written before `read_after` existed still decodes (as unknown).
        let old = br#"{"format":1,"version":null,"delta_ms":12,"expiry_ms":1764445200000,"payload":{"id":42,"price_cents":1999}}"#;
        let decoded = Envelope::<Product>::decode(old).unwrap();
        assert_eq!(decoded.read_after, None);
        assert_eq!(decoded.payload.price_cents, 1999);
        assert_eq!(Envelope::<Product>::decode(&bytes).unwrap(), env);
        let primary = Envelope {
            version: None,
            ..env
        };
        let bytes = primary.encode().unwrap();
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .contains(r#""version":null"#)
        );
        assert_eq!(Envelope::<Product>::decode(&bytes).unwrap(), primary);
        let epoch = Envelope {
            epoch: Some(1_764_445_200_000),
            ..primary
        };
        let bytes = epoch.encode().unwrap();
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .ends_with(r#","epoch":1764445200000}"#)
        );
        assert_eq!(Envelope::<Product>::decode(&bytes).unwrap(), epoch);
    }

    #[test]
    fn rejects_foreign_bytes() {
        assert!(matches!(
            Envelope::<Product>::decode(b"hello"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            Envelope::<String>::decode(br#"{"format":1,"version":null,"delta_ms":1,"expiry_ms":1,"payload":{"id":1,"price_cents":2}}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            Envelope::<u8>::decode(
                br#"{"format":2,"version":null,"delta_ms":1,"expiry_ms":1,"payload":1}"#
            ),
            Err(DecodeError::Format(2))
        ));
    }
}
