use std::fmt;
use std::str::FromStr;

/// A PostgreSQL write-ahead-log position (`pg_lsn`): a byte offset into the WAL, 64 bits.
///
/// Displays in PostgreSQL's `X/X` form (`16/B374D848`). Inside Redis it is stored as
/// [`Lsn::to_fixed_hex`]: 16 upper-case hex digits, so that Lua compares LSNs as strings —
/// Lua numbers are doubles and lose precision above 2^53 (docs/architecture.md,
/// "The Lua scripts").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position, `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// 16 upper-case hex digits, zero padded: string order equals numeric order.
    pub fn to_fixed_hex(self) -> String {
        format!("{:016X}", self.0)
    }

    /// Parses the 16-digit form written by [`Lsn::to_fixed_hex`] (any case).
    ///
    /// # Errors
    /// [`LsnParseError`] when the text is not exactly 16 hex digits.
    pub fn from_fixed_hex(s: &str) -> Result<Lsn, LsnParseError> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LsnParseError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(Lsn)
            .map_err(|_| LsnParseError(s.to_owned()))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not an LSN in PostgreSQL's `X/X` form (or the 16-digit fixed form).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an LSN: expected PostgreSQL's `X/X` form such as `16/B374D848`")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Parses PostgreSQL's `X/X` text form (as `pg_current_wal_lsn()` prints it).
    fn from_str(s: &str) -> Result<Lsn, LsnParseError> {
        let err = || LsnParseError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        // `from_str_radix` alone would also take a leading `+`.
        let hex = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(hi) || !hex(lo) {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert!("16-B374D848".parse::<Lsn>().is_err());
        assert!("1/100000000".parse::<Lsn>().is_err());
        assert!("+1/0".parse::<Lsn>().is_err());
        assert!("1/+0".parse::<Lsn>().is_err());
        assert!(Lsn::from_fixed_hex("+000000000000001").is_err());
        assert_eq!(Lsn::from_fixed_hex("000000000000001a"), Ok(Lsn(0x1a)));
    }

    proptest! {
        #[test]
        fn fixed_hex_orders_like_numbers(a: u64, b: u64) {
            prop_assert_eq!(a.cmp(&b), Lsn(a).to_fixed_hex().cmp(&Lsn(b).to_fixed_hex()));
            prop_assert_eq!(Lsn::from_fixed_hex(&Lsn(a).to_fixed_hex()), Ok(Lsn(a)));
            prop_assert_eq!(Lsn(a).to_string().parse::<Lsn>(), Ok(Lsn(a)));
        }
    }
}
