//! Decoder for PostgreSQL's `pgoutput` logical replication messages (protocol version 1).
//!
//! One job: turn the bytes of one replication message into a typed [`Message`]. The
//! format is PostgreSQL's "Logical Replication Message Formats" chapter. Column values
//! are slices of the input buffer ([`Bytes`]), so decoding an insert copies no payload.
//!
//! Invariant: every input, however malformed, yields either a message or a
//! [`DecodeError`] naming the message kind and the byte offset where reading failed.
//! Nothing here panics or allocates in proportion to a length read from the input before
//! that many bytes are known to be present.

use bytes::Bytes;

use crate::lsn::Lsn;

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    /// Updates are not outbox events; only the relation is kept, for counting.
    Update {
        relation_id: u32,
    },
    /// Deletes are not outbox events; only the relation is kept, for counting.
    Delete {
        relation_id: u32,
    },
    /// Truncates are not outbox events; only the relations are kept, for counting.
    Truncate {
        relation_ids: Vec<u32>,
    },
    /// A logical decoding message written with `pg_logical_emit_message`.
    Logical(LogicalMessage),
}

/// Start of a transaction. `final_lsn` is the LSN of its commit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC (PostgreSQL's epoch).
    pub commit_time: i64,
    pub xid: u32,
}

/// End of a transaction. `end_lsn` is the position to confirm once the transaction is
/// durable downstream: the slot then never sends this transaction again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// The transaction was replayed from another node; carries that node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// The shape of a table, sent before the first change to it in a session and again
/// after every schema change. Later inserts refer to it by `id` (the table's OID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// 1 if the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Describes a non-built-in data type used by a following Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub id: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_id: u32,
    pub tuple: Vec<Value>,
}

/// One column of a row, in the Relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change (updates only; inserts always carry values).
    UnchangedToast,
    /// The value in PostgreSQL's text output format.
    Text(Bytes),
    /// The value in the type's binary format (only when the `binary` option is on).
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Malformed `pgoutput` input: which message, where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {message} message at byte {offset}: {problem}")]
pub struct DecodeError {
    /// The kind of message being read, e.g. `Insert`, or `unknown` for a bad tag.
    pub message: &'static str,
    /// Offset into the message where the problem was found.
    pub offset: usize,
    pub problem: String,
}

/// Decodes one `pgoutput` message (the payload of one XLogData frame).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError {
            message: "unknown",
            offset: 0,
            problem: "empty message".into(),
        });
    };
    let kind = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => {
            return Err(DecodeError {
                message: "unknown",
                offset: 0,
                problem: format!("unknown message tag 0x{other:02X}"),
            })
        }
    };
    let mut reader = Reader {
        data,
        offset: 1,
        message: kind,
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: reader.lsn()?,
            commit_time: reader.i64()?,
            xid: reader.u32()?,
        }),
        b'C' => Message::Commit(Commit {
            flags: reader.u8()?,
            commit_lsn: reader.lsn()?,
            end_lsn: reader.lsn()?,
            commit_time: reader.i64()?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: reader.lsn()?,
            name: reader.string()?,
        }),
        b'R' => Message::Relation(reader.relation()?),
        b'Y' => Message::Type(TypeInfo {
            id: reader.u32()?,
            namespace: reader.string()?,
            name: reader.string()?,
        }),
        b'I' => {
            let relation_id = reader.u32()?;
            reader.expect_tag(b'N', "new tuple")?;
            Message::Insert(Insert {
                relation_id,
                tuple: reader.tuple()?,
            })
        }
        b'U' => {
            let relation_id = reader.u32()?;
            let mut marker = reader.u8()?;
            if marker == b'K' || marker == b'O' {
                reader.tuple()?;
                marker = reader.u8()?;
            }
            if marker != b'N' {
                return Err(reader.error(format!("expected new tuple marker 'N', found 0x{marker:02X}")));
            }
            reader.tuple()?;
            Message::Update { relation_id }
        }
        b'D' => {
            let relation_id = reader.u32()?;
            let marker = reader.u8()?;
            if marker != b'K' && marker != b'O' {
                return Err(reader.error(format!("expected old tuple marker 'K' or 'O', found 0x{marker:02X}")));
            }
            reader.tuple()?;
            Message::Delete { relation_id }
        }
        b'T' => {
            let count = reader.length("relation count")?;
            let _options = reader.u8()?;
            let mut relation_ids = Vec::with_capacity(count.min(reader.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(reader.u32()?);
            }
            Message::Truncate { relation_ids }
        }
        _ => {
            // b'M': the tag was matched above.
            let flags = reader.u8()?;
            let lsn = reader.lsn()?;
            let prefix = reader.string()?;
            let length = reader.length("content length")?;
            Message::Logical(LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: reader.bytes(length)?,
            })
        }
    };
    if reader.remaining() != 0 {
        return Err(reader.error(format!("{} unexpected trailing bytes", reader.remaining())));
    }
    Ok(message)
}

/// A cursor over one message that turns every short read into a [`DecodeError`].
struct Reader<'a> {
    data: &'a Bytes,
    offset: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn error(&self, problem: String) -> DecodeError {
        DecodeError {
            message: self.message,
            offset: self.offset,
            problem,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.offset
    }

    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let end = self.offset + N;
        let bytes = self
            .data
            .get(self.offset..end)
            .and_then(|slice| <[u8; N]>::try_from(slice).ok())
            .ok_or_else(|| self.error(format!("truncated: {what} needs {N} bytes, {} left", self.remaining())))?;
        self.offset = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>("a byte")?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take("an Int16")?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take("an Int32")?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take("an Int32")?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take("an Int64")?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.take("an LSN")?)))
    }

    /// A non-negative Int16 count (columns of a relation or tuple).
    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let start = self.offset;
        let value = self.i16()?;
        self.non_negative(start, i64::from(value), what)
    }

    /// A non-negative Int32 byte length or relation count.
    fn length(&mut self, what: &str) -> Result<usize, DecodeError> {
        let start = self.offset;
        let value = self.i32()?;
        self.non_negative(start, i64::from(value), what)
    }

    fn non_negative(&self, start: usize, value: i64, what: &str) -> Result<usize, DecodeError> {
        usize::try_from(value).map_err(|_| DecodeError {
            message: self.message,
            offset: start,
            problem: format!("negative {what} {value}"),
        })
    }

    fn bytes(&mut self, length: usize) -> Result<Bytes, DecodeError> {
        if length > self.remaining() {
            return Err(self.error(format!("truncated: value of {length} bytes, {} left", self.remaining())));
        }
        let value = self.data.slice(self.offset..self.offset + length);
        self.offset += length;
        Ok(value)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.offset..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.error("string without NUL terminator".into()))?;
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|e| self.error(format!("string is not UTF-8: {e}")))?
            .to_owned();
        self.offset += end + 1;
        Ok(text)
    }

    fn expect_tag(&mut self, expected: u8, what: &str) -> Result<(), DecodeError> {
        let found = self.u8()?;
        if found == expected {
            Ok(())
        } else {
            self.offset -= 1;
            Err(self.error(format!(
                "expected {what} marker '{}', found 0x{found:02X}",
                char::from(expected)
            )))
        }
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32()?;
        let namespace = self.string()?;
        let name = self.string()?;
        let replica_identity = self.u8()?;
        let count = self.count("column count")?;
        // Each column takes at least 10 bytes; never reserve more than could be present.
        let mut columns = Vec::with_capacity(count.min(self.remaining() / 10));
        for _ in 0..count {
            columns.push(Column {
                flags: self.u8()?,
                name: self.string()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let count = self.count("column count")?;
        // Each column takes at least one byte.
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let value = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let length = self.length("value length")?;
                    Value::Text(self.bytes(length)?)
                }
                b'b' => {
                    let length = self.length("value length")?;
                    Value::Binary(self.bytes(length)?)
                }
                other => {
                    self.offset -= 1;
                    return Err(self.error(format!("unknown column value kind 0x{other:02X}")));
                }
            };
            values.push(value);
        }
        Ok(values)
    }
}

/// Builders for well-formed messages, shared by the unit tests of this crate.
#[cfg(test)]
pub(crate) mod build {
    pub fn begin(final_lsn: u64, xid: u32) -> Vec<u8> {
        let mut m = vec![b'B'];
        m.extend(final_lsn.to_be_bytes());
        m.extend(0i64.to_be_bytes());
        m.extend(xid.to_be_bytes());
        m
    }

    pub fn commit(commit_lsn: u64, end_lsn: u64) -> Vec<u8> {
        let mut m = vec![b'C', 0];
        m.extend(commit_lsn.to_be_bytes());
        m.extend(end_lsn.to_be_bytes());
        m.extend(0i64.to_be_bytes());
        m
    }

    pub fn relation(id: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        m.extend(b"public\0");
        m.extend(name.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((columns.len() as i16).to_be_bytes());
        for column in columns {
            m.push(0);
            m.extend(column.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    pub fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend((values.len() as i16).to_be_bytes());
        for value in values {
            match value {
                None => m.push(b'n'),
                Some(text) => {
                    m.push(b't');
                    m.extend((text.len() as i32).to_be_bytes());
                    m.extend(text.as_bytes());
                }
            }
        }
        m
    }

    pub fn insert(relation_id: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(relation_id.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(values));
        m
    }

    pub fn logical(transactional: bool, lsn: u64, prefix: &str, content: &[u8]) -> Vec<u8> {
        let mut m = vec![b'M', u8::from(transactional)];
        m.extend(lsn.to_be_bytes());
        m.extend(prefix.as_bytes());
        m.push(0);
        m.extend((content.len() as i32).to_be_bytes());
        m.extend(content);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::build;
    use super::*;

    fn decoded(bytes: Vec<u8>) -> Message {
        match decode(&Bytes::from(bytes)) {
            Ok(message) => message,
            Err(error) => panic!("did not decode: {error}"),
        }
    }

    fn failure(bytes: Vec<u8>) -> DecodeError {
        match decode(&Bytes::from(bytes)) {
            Ok(message) => panic!("decoded malformed input as {message:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn begin_carries_the_commit_lsn_and_xid() {
        assert_eq!(
            decoded(build::begin(0x1_0000_0010, 77)),
            Message::Begin(Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_time: 0,
                xid: 77
            })
        );
    }

    #[test]
    fn commit_carries_commit_and_end_lsn() {
        assert_eq!(
            decoded(build::commit(100, 180)),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(180),
                commit_time: 0
            })
        );
    }

    #[test]
    fn relation_lists_columns_by_name() {
        let Message::Relation(relation) = decoded(build::relation(16384, "outbox", &["id", "payload"])) else {
            panic!("not a relation");
        };
        assert_eq!(relation.id, 16384);
        assert_eq!(relation.namespace, "public");
        assert_eq!(relation.name, "outbox");
        let names: Vec<_> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "payload"]);
        assert_eq!(relation.columns[0].type_oid, 25);
    }

    #[test]
    fn origin_and_type_messages_carry_their_names() {
        let message = |tag: u8, id: Vec<u8>, names: &[u8]| [vec![tag], id, names.to_vec()].concat();
        let origin = Message::Origin(Origin {
            commit_lsn: Lsn(5),
            name: "node_a".into(),
        });
        assert_eq!(decoded(message(b'O', 5u64.to_be_bytes().to_vec(), b"node_a\0")), origin);
        let mood = Message::Type(TypeInfo {
            id: 99,
            namespace: "public".into(),
            name: "mood".into(),
        });
        assert_eq!(
            decoded(message(b'Y', 99u32.to_be_bytes().to_vec(), b"public\0mood\0")),
            mood
        );
    }

    #[test]
    fn insert_values_are_text_null_or_binary() {
        let mut m = build::insert(7, &[Some("a"), None]);
        // Append a binary column by hand and fix the column count.
        m[6..8].copy_from_slice(&3i16.to_be_bytes());
        m.push(b'b');
        m.extend(2i32.to_be_bytes());
        m.extend([0xDE, 0xAD]);
        assert_eq!(
            decoded(m),
            Message::Insert(Insert {
                relation_id: 7,
                tuple: vec![
                    Value::Text(Bytes::from_static(b"a")),
                    Value::Null,
                    Value::Binary(Bytes::from_static(&[0xDE, 0xAD]))
                ]
            })
        );
    }

    #[test]
    fn update_with_old_key_and_delete_and_truncate_are_recognised() {
        let mut update = vec![b'U'];
        update.extend(7u32.to_be_bytes());
        update.push(b'K');
        update.extend(build::tuple(&[Some("1")]));
        update.push(b'N');
        update.extend(build::tuple(&[Some("1"), Some("x")]));
        assert_eq!(decoded(update), Message::Update { relation_id: 7 });

        let mut delete = vec![b'D'];
        delete.extend(8u32.to_be_bytes());
        delete.push(b'O');
        delete.extend(build::tuple(&[Some("1")]));
        assert_eq!(decoded(delete), Message::Delete { relation_id: 8 });

        let mut truncate = vec![b'T'];
        truncate.extend(2i32.to_be_bytes());
        truncate.push(0);
        truncate.extend(1u32.to_be_bytes());
        truncate.extend(2u32.to_be_bytes());
        assert_eq!(
            decoded(truncate),
            Message::Truncate {
                relation_ids: vec![1, 2]
            }
        );
    }

    #[test]
    fn logical_message_keeps_prefix_and_content() {
        assert_eq!(
            decoded(build::logical(true, 42, "outbox", b"{}")),
            Message::Logical(LogicalMessage {
                transactional: true,
                lsn: Lsn(42),
                prefix: "outbox".into(),
                content: Bytes::from_static(b"{}")
            })
        );
    }

    #[test]
    fn errors_name_the_message_and_the_offset() {
        let mut m = build::insert(7, &[Some("abc")]);
        m.truncate(m.len() - 1);
        let error = failure(m);
        assert_eq!(error.message, "Insert");
        assert_eq!(error.offset, 13);
        assert!(error.to_string().contains("truncated"), "{error}");
    }

    #[test]
    fn unknown_tags_empty_input_and_trailing_bytes_are_errors() {
        assert_eq!(failure(vec![]).problem, "empty message");
        assert!(failure(vec![b'Z']).problem.contains("0x5A"));
        let mut m = build::commit(1, 2);
        m.push(0);
        assert!(failure(m).problem.contains("trailing"));
    }

    #[test]
    fn negative_lengths_and_counts_are_errors_not_allocations() {
        let insert_of =
            |columns: i16, rest: &[u8]| [&b"I"[..], &1u32.to_be_bytes(), b"N", &columns.to_be_bytes(), rest].concat();
        assert!(failure(insert_of(-1, b"")).problem.contains("negative column count"));
        let huge_value = [&b"t"[..], &i32::MAX.to_be_bytes()].concat();
        assert!(failure(insert_of(1, &huge_value)).problem.contains("truncated"));
    }

    #[test]
    fn strings_must_be_terminated_utf8() {
        let type_named = |names: &[u8]| [&b"Y"[..], &1u32.to_be_bytes(), names].concat();
        assert!(failure(type_named(b"public")).problem.contains("NUL"));
        assert!(failure(type_named(b"\xFF\0x\0")).problem.contains("UTF-8"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        /// Arbitrary bytes never panic: they decode or fail with a located error.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Err(error) = decode(&Bytes::from(data.clone())) {
                proptest::prop_assert!(error.offset <= data.len());
            }
        }

        /// Arbitrary bytes behind a valid tag exercise each message's own reader.
        #[test]
        fn arbitrary_bodies_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let mut data = vec![tag];
            data.extend(body);
            if let Err(error) = decode(&Bytes::from(data.clone())) {
                proptest::prop_assert!(error.offset <= data.len());
            }
        }

        /// Truncating a valid insert at any point is reported, never misread.
        #[test]
        fn every_truncation_of_an_insert_is_an_error(cut in 0usize..40) {
            let full = build::insert(3, &[Some("id-1"), None, Some("{\"a\":1}")]);
            let cut = cut.min(full.len() - 1);
            proptest::prop_assert!(decode(&Bytes::from(full[..cut].to_vec())).is_err());
        }
    }
}
