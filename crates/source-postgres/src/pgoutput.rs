//! A decoder for PostgreSQL's `pgoutput` logical replication messages, protocol version 1.
//!
//! Format reference: PostgreSQL 15 documentation, §55.9 "Logical Replication Message Formats"
//! (<https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>).
//! Values are borrowed from the `XLogData` payload (`Bytes` slices): decoding a row allocates only
//! the column vector.

use bytes::Bytes;
use cacheclear_protocol::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
pub(crate) const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    /// `B`: a transaction starts. `final_lsn` is the LSN of its commit record.
    Begin {
        final_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    /// `C`: a transaction ends. `end_lsn` is the end of the commit record.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    /// `M`: `pg_logical_emit_message()`.
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    /// `O`: the transaction came from another origin.
    Origin { lsn: Lsn, name: String },
    /// `R`: a relation's schema; sent before its first change and again after every change to it.
    Relation(Relation),
    /// `Y`: a data type's name.
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    /// `I`: a new row.
    Insert { relation: u32, new: Tuple },
    /// `U`: a changed row. `old` is `Some` when the replica identity carries it: `Key` (identity
    /// columns changed, DEFAULT/INDEX) or `Full` (REPLICA IDENTITY FULL).
    Update {
        relation: u32,
        old: Option<(OldKind, Tuple)>,
        new: Tuple,
    },
    /// `D`: a deleted row, with its replica-identity image.
    Delete {
        relation: u32,
        old: (OldKind, Tuple),
    },
    /// `T`: tables truncated in one statement.
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
}

/// Which old-row image an Update/Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OldKind {
    /// `K`: only the replica-identity key columns are meaningful; the others are sent as NULL.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A relation (table) schema from an `R` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    /// The table's OID.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in attribute order (dropped columns omitted, as pgoutput does).
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelationColumn {
    /// Column name.
    pub name: String,
    /// True when the column is part of the replica identity key.
    pub key: bool,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`).
    pub type_modifier: i32,
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Datum {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value whose bytes the server did not send. NOT NULL.
    UnchangedToast,
    /// `t`: the value in the type's text output form.
    Text(Bytes),
    /// `b`: the value in the type's binary send form.
    Binary(Bytes),
}

/// A row image: one [`Datum`] per column, in the relation's column order.
pub(crate) type Tuple = Vec<Datum>;

/// A `pgoutput` payload that does not decode. Names the message type and what was wrong; the
/// stream cannot safely continue past it (the source stops and restarts from the slot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput {message} message: {problem}")]
pub struct DecodeError {
    /// The message type (`Begin`, `Update`, ... or the unknown tag byte).
    pub message: String,
    /// What was wrong.
    pub problem: String,
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, problem: impl Into<String>) -> DecodeError {
        DecodeError {
            message: self.message.to_owned(),
            problem: problem.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "truncated at byte {} reading {what} ({n} bytes wanted, {} left)",
                    self.pos,
                    self.buf.len() - self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn lsn(&mut self, what: &str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.i64(what)? as u64))
    }

    fn timestamp_us(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(self.i64(what)?.saturating_add(PG_EPOCH_OFFSET_US))
    }

    fn cstring(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err(format!("{what}: string without NUL terminator")))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.err(format!("{what}: not UTF-8")))?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..start + n))
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("column count")?;
        let n = usize::try_from(n).map_err(|_| self.err(format!("negative column count {n}")))?;
        let mut tuple = Vec::with_capacity(n);
        for i in 0..n {
            let datum = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    let len = usize::try_from(len)
                        .map_err(|_| self.err(format!("column {i}: negative length {len}")))?;
                    let v = self.bytes(len, "value")?;
                    if kind == b't' {
                        Datum::Text(v)
                    } else {
                        Datum::Binary(v)
                    }
                }
                other => {
                    return Err(self.err(format!(
                        "column {i}: unknown tuple data kind {:?}",
                        char::from(other)
                    )));
                }
            };
            tuple.push(datum);
        }
        Ok(tuple)
    }

    fn old_kind(&mut self, tag: u8) -> Result<OldKind, DecodeError> {
        match tag {
            b'K' => Ok(OldKind::Key),
            b'O' => Ok(OldKind::Full),
            other => Err(self.err(format!(
                "expected 'K' or 'O', found {:?}",
                char::from(other)
            ))),
        }
    }

    fn finish(self, m: Message) -> Result<Message, DecodeError> {
        if self.pos != self.buf.len() {
            return Err(self.err(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(m)
    }
}

/// Decodes one `pgoutput` message (the payload of one `XLogData`).
///
/// # Errors
/// [`DecodeError`] for a truncated or malformed payload, an unknown message tag, or a protocol
/// version 2+ message (stream start/stop/commit/abort) that protocol version 1 never sends.
pub(crate) fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            message: "(empty)".into(),
            problem: "empty payload".into(),
        });
    };
    let name = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'M' => "Message",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        other => {
            return Err(DecodeError {
                message: format!("{:?}", char::from(other)),
                problem: "unknown message type (cacheclear speaks pgoutput proto_version 1)".into(),
            });
        }
    };
    let mut r = Reader {
        buf,
        pos: 1,
        message: name,
    };
    let m = match tag {
        b'B' => Message::Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time_us: r.timestamp_us("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => {
            r.u8("flags")?;
            Message::Commit {
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time_us: r.timestamp_us("commit time")?,
            }
        }
        b'M' => {
            let transactional = r.u8("flags")? & 1 == 1;
            let lsn = r.lsn("LSN")?;
            let prefix = r.cstring("prefix")?;
            let len = r.i32("content length")?;
            let len = usize::try_from(len).map_err(|_| r.err("negative content length"))?;
            Message::Message {
                transactional,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            }
        }
        b'O' => Message::Origin {
            lsn: r.lsn("LSN")?,
            name: r.cstring("origin name")?,
        },
        b'R' => {
            let oid = r.u32("relation OID")?;
            let namespace = r.cstring("namespace")?;
            let name = r.cstring("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let n = usize::try_from(n).map_err(|_| r.err(format!("negative column count {n}")))?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(RelationColumn {
                    name: r.cstring("column name")?,
                    key: flags & 1 == 1,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type OID")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation OID")?;
            match r.u8("tuple marker")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(r.err(format!("expected 'N', found {:?}", char::from(other)))),
            }
        }
        b'U' => {
            let relation = r.u32("relation OID")?;
            let mut marker = r.u8("tuple marker")?;
            let mut old = None;
            if marker != b'N' {
                let kind = r.old_kind(marker)?;
                old = Some((kind, r.tuple()?));
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(r.err(format!("expected 'N', found {:?}", char::from(marker))));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation OID")?;
            let marker = r.u8("tuple marker")?;
            let kind = r.old_kind(marker)?;
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.i32("relation count")?;
            let n =
                usize::try_from(n).map_err(|_| r.err(format!("negative relation count {n}")))?;
            let options = r.u8("options")?;
            let mut relations = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                relations.push(r.u32("relation OID")?);
            }
            Message::Truncate {
                relations,
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
            }
        }
        _ => unreachable!("tag checked above"),
    };
    r.finish(m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput payloads the way the server does (for tests of this crate).
    #[derive(Default)]
    pub(crate) struct Enc(pub Vec<u8>);

    impl Enc {
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        pub(crate) fn text(self, v: &str) -> Self {
            let mut e = self.u8(b't').i32(v.len() as i32);
            e.0.extend_from_slice(v.as_bytes());
            e
        }
        pub(crate) fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    #[test]
    fn decodes_relation_and_update_with_toast() {
        let rel = Enc::default()
            .u8(b'R')
            .i32(16384)
            .s("public")
            .s("product")
            .u8(b'f')
            .i16(3)
            .u8(1)
            .s("id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .s("category_id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .s("description")
            .i32(25)
            .i32(-1)
            .bytes();
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.oid, r.namespace.as_str(), r.name.as_str()),
            (16384, "public", "product")
        );
        assert_eq!(r.replica_identity, b'f');
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!(r.columns[2].name, "description");

        let upd = Enc::default()
            .u8(b'U')
            .i32(16384)
            .u8(b'O')
            .i16(3)
            .text("1")
            .text("3")
            .u8(b'u')
            .u8(b'N')
            .i16(3)
            .text("1")
            .text("7")
            .u8(b'u')
            .bytes();
        let Message::Update {
            relation,
            old: Some((OldKind::Full, old)),
            new,
        } = decode(&upd).unwrap()
        else {
            panic!("not an update with old row")
        };
        assert_eq!(relation, 16384);
        assert_eq!(old[1], Datum::Text(Bytes::from_static(b"3")));
        assert_eq!(new[1], Datum::Text(Bytes::from_static(b"7")));
        assert_eq!(new[2], Datum::UnchangedToast);
    }

    #[test]
    fn decodes_begin_commit_truncate_message() {
        let b = Enc::default().u8(b'B').i64(0x100).i64(0).i32(-2).bytes();
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: Lsn(0x100),
                commit_time_us: PG_EPOCH_OFFSET_US,
                xid: u32::MAX - 1
            }
        );
        let c = Enc::default()
            .u8(b'C')
            .u8(0)
            .i64(0x100)
            .i64(0x130)
            .i64(1_000_000)
            .bytes();
        assert_eq!(
            decode(&c).unwrap(),
            Message::Commit {
                commit_lsn: Lsn(0x100),
                end_lsn: Lsn(0x130),
                commit_time_us: PG_EPOCH_OFFSET_US + 1_000_000
            }
        );
        let t = Enc::default().u8(b'T').i32(2).u8(3).i32(10).i32(11).bytes();
        assert_eq!(
            decode(&t).unwrap(),
            Message::Truncate {
                relations: vec![10, 11],
                cascade: true,
                restart_identity: true
            }
        );
        let m = Enc::default()
            .u8(b'M')
            .u8(0)
            .i64(5)
            .s("cacheclear")
            .i32(2)
            .u8(b'h')
            .u8(b'i')
            .bytes();
        assert_eq!(
            decode(&m).unwrap(),
            Message::Message {
                transactional: false,
                lsn: Lsn(5),
                prefix: "cacheclear".into(),
                content: Bytes::from_static(b"hi")
            }
        );
    }

    #[test]
    fn errors_name_the_message_and_problem() {
        let e = decode(
            &Enc::default()
                .u8(b'I')
                .i32(1)
                .u8(b'N')
                .i16(1)
                .u8(b't')
                .i32(10)
                .bytes(),
        )
        .unwrap_err();
        assert_eq!(e.message, "Insert");
        assert!(e.problem.contains("truncated"), "{e}");
        let e = decode(&Bytes::from_static(b"Sxyz")).unwrap_err();
        assert!(e.to_string().contains("unknown message type"), "{e}");
        let e = decode(&Enc::default().u8(b'D').i32(1).u8(b'N').i16(0).bytes()).unwrap_err();
        assert!(e.problem.contains("expected 'K' or 'O'"), "{e}");
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the decoder (they are either a message or an error).
        #[test]
        fn never_panics(data: Vec<u8>) {
            let _ = decode(&Bytes::from(data));
        }
    }
}
