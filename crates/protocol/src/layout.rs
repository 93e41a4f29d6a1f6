/// The three Redis keys of one cache key `K`: `{K}`, `{K}:lease`, `{K}:fence`
/// (docs/architecture.md, "Redis key layout").
///
/// The braces make `K` the Redis Cluster hash tag, so all three share one slot
/// (<https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags>).
/// That is why `K` itself may not contain `{` or `}`: a brace inside would end the tag early and
/// scatter the three keys over different slots. Key templates escape values so they never do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyLayout {
    value: String,
}

/// A cache key that cannot be laid out in Redis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is empty.
    #[error("a cache key may not be empty")]
    Empty,
    /// The key contains `{` or `}`, which would break its Redis Cluster hash tag.
    #[error("cache key `{0}` contains `{{` or `}}`, which would break its Redis Cluster hash tag")]
    Brace(String),
}

impl KeyLayout {
    /// Lays out cache key `key`.
    ///
    /// # Errors
    /// [`KeyError`] for an empty key or one containing `{` / `}`.
    pub fn new(key: &str) -> Result<KeyLayout, KeyError> {
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.contains(['{', '}']) {
            return Err(KeyError::Brace(key.to_owned()));
        }
        let mut value = String::with_capacity(key.len() + 2);
        value.push('{');
        value.push_str(key);
        value.push('}');
        Ok(KeyLayout { value })
    }

    /// The cache key `K` itself, without braces.
    pub fn key(&self) -> &str {
        &self.value[1..self.value.len() - 1]
    }

    /// `{K}`: the value envelope.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// `{K}:lease`: the lease token.
    pub fn lease(&self) -> String {
        let mut s = String::new();
        self.lease_into(&mut s);
        s
    }

    /// `{K}:fence`: the fence (highest invalidated commit LSN, fixed hex).
    pub fn fence(&self) -> String {
        let mut s = String::new();
        self.fence_into(&mut s);
        s
    }

    /// Replaces `buf`'s content with [`KeyLayout::lease`]'s, reusing its allocation (the sink
    /// lays out a million keys per bulk transaction).
    pub fn lease_into(&self, buf: &mut String) {
        buf.clear();
        buf.push_str(&self.value);
        buf.push_str(":lease");
    }

    /// Replaces `buf`'s content with [`KeyLayout::fence`]'s, reusing its allocation.
    pub fn fence_into(&self, buf: &mut String) {
        buf.clear();
        buf.push_str(&self.value);
        buf.push_str(":fence");
    }

    /// The Redis Cluster hash slot (0..16384) of all three keys: CRC16-CCITT (XMODEM) of `K`
    /// mod 16384, per the cluster specification's `HASH_SLOT` algorithm.
    pub fn slot(&self) -> u16 {
        crc16_xmodem(self.key().as_bytes()) % 16384
    }
}

/// CRC16-CCITT (XMODEM: poly 0x1021, init 0), the checksum Redis Cluster uses for key slots.
pub(crate) fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_into_forms_match_lease_and_fence_whatever_the_buffer_held() {
        let k = KeyLayout::new("product:42").unwrap();
        let mut buf = String::from("left over from an earlier, longer key");
        k.lease_into(&mut buf);
        assert_eq!(buf, "{product:42}:lease");
        assert_eq!(buf, k.lease());
        k.fence_into(&mut buf);
        assert_eq!(buf, "{product:42}:fence");
        assert_eq!(buf, k.fence());
    }

    #[test]
    fn slot_matches_the_cluster_spec_examples() {
        // The cluster specification's reference value: CRC16 of "123456789" is 0x31C3.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        // `{user1000}.following` and `{user1000}.followers` hash to the slot of `user1000`.
        let k = KeyLayout::new("user1000").unwrap();
        assert_eq!(k.slot(), crc16_xmodem(b"user1000") % 16384);
    }

    #[test]
    fn rejects_braces_and_empty() {
        assert_eq!(KeyLayout::new(""), Err(KeyError::Empty));
        assert!(matches!(KeyLayout::new("a}b"), Err(KeyError::Brace(_))));
        assert_eq!(KeyLayout::new("p:1").unwrap().key(), "p:1");
    }
}
