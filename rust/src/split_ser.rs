//! Two small serde serializers for writing OpenMLS's message secrets store cheaply.
//!
//! OpenMLS hands the storage provider its whole `MessageSecretsStore` (the current
//! epoch's secret tree plus every kept past epoch's tree and member list) each time a
//! ratchet moves: on every message sent or read and twice per commit. The storage keeps
//! each past epoch in its own record (`tracked_storage.rs`), and used to find them by
//! serializing the whole store to JSON and scanning the text for the array elements. At
//! 64 members with 15 past epochs that was over half the CPU of adding a member; the
//! past epochs almost never change, yet were formatted and scanned every time.
//!
//! - [`split_store`] walks the store's top-level struct itself: the fields other than
//!   `past_epoch_trees` become JSON exactly as serde_json would write them, each past
//!   tree goes to a [`TreeSink`], and the main record (epoch numbers in place of the
//!   trees) is assembled from the parts: byte for byte what the scan produced.
//! - [`fingerprint`] encodes a value in a tagged binary form (no number formatting) and
//!   hashes it with SHA-256, capturing the top-level `epoch` field on the way. The sink
//!   compares it with the fingerprint of the record last written for that epoch and
//!   formats the tree as JSON only when it differs.
//!
//! Anything not of the expected shape is [`Unsupported`], and the caller falls back to the
//! old path (the whole JSON, scanned), so an OpenMLS layout change costs speed, not data.

use std::fmt;

use serde::ser::{self, Impossible, Serialize};
use sha2::{Digest, Sha256};

/// The value is not of the shape these serializers handle (or a nested serializer failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported;

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("value not of the expected layout")
    }
}

impl std::error::Error for Unsupported {}

impl ser::Error for Unsupported {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Unsupported
    }
}

type Res<T> = Result<T, Unsupported>;

/// Receives each element of the `past_epoch_trees` array; returns its epoch.
pub trait TreeSink {
    fn tree<T: Serialize + ?Sized>(&mut self, tree: &T) -> Res<u64>;
}

/// Name of the split field (as in `tracked_storage::PAST_FIELD`).
pub const TREES_FIELD: &str = "past_epoch_trees";

/// The main record of a message secrets store: its JSON with each element of
/// `past_epoch_trees` replaced by that tree's epoch; every tree is given to `sink`.
pub fn split_store<V: Serialize + ?Sized, S: TreeSink>(value: &V, sink: &mut S) -> Res<Vec<u8>> {
    value.serialize(Top { sink })
}

struct Top<'s, S> {
    sink: &'s mut S,
}

struct TopFields<'s, S> {
    sink: &'s mut S,
    out: Vec<u8>,
    n: usize,
    trees_seen: bool,
}

impl<S: TreeSink> ser::SerializeStruct for TopFields<'_, S> {
    type Ok = Vec<u8>;
    type Error = Unsupported;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Res<()> {
        if self.n > 0 {
            self.out.push(b',');
        }
        self.n += 1;
        serde_json::to_writer(&mut self.out, key).map_err(|_| Unsupported)?;
        self.out.push(b':');
        if key == TREES_FIELD {
            self.trees_seen = true;
            let epochs = value.serialize(Trees {
                sink: &mut *self.sink,
            })?;
            self.out.push(b'[');
            for (i, e) in epochs.iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                self.out.extend_from_slice(e.to_string().as_bytes());
            }
            self.out.push(b']');
        } else {
            serde_json::to_writer(&mut self.out, value).map_err(|_| Unsupported)?;
        }
        Ok(())
    }

    fn end(mut self) -> Res<Vec<u8>> {
        if !self.trees_seen {
            return Err(Unsupported);
        }
        self.out.push(b'}');
        Ok(self.out)
    }
}

struct Trees<'s, S> {
    sink: &'s mut S,
}

struct TreesSeq<'s, S> {
    sink: &'s mut S,
    epochs: Vec<u64>,
}

impl<S: TreeSink> ser::SerializeSeq for TreesSeq<'_, S> {
    type Ok = Vec<u64>;
    type Error = Unsupported;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Res<()> {
        let e = self.sink.tree(value)?;
        self.epochs.push(e);
        Ok(())
    }

    fn end(self) -> Res<Vec<u64>> {
        Ok(self.epochs)
    }
}

/// The methods of a serializer that accepts only one kind of value.
macro_rules! refuse {
    ($ok:ty) => {
        fn serialize_bool(self, _v: bool) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_i8(self, _v: i8) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_i16(self, _v: i16) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_i32(self, _v: i32) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_i64(self, _v: i64) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_u8(self, _v: u8) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_u16(self, _v: u16) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_u32(self, _v: u32) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_u64(self, _v: u64) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_f32(self, _v: f32) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_f64(self, _v: f64) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_char(self, _v: char) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_str(self, _v: &str) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_bytes(self, _v: &[u8]) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_none(self) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, _v: &T) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_unit(self) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_unit_struct(self, _n: &'static str) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_unit_variant(self, _n: &'static str, _i: u32, _v: &'static str) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _n: &'static str,
            _v: &T,
        ) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _n: &'static str,
            _i: u32,
            _v: &'static str,
            _x: &T,
        ) -> Res<$ok> {
            Err(Unsupported)
        }
        fn serialize_tuple(self, _l: usize) -> Res<Self::SerializeTuple> {
            Err(Unsupported)
        }
        fn serialize_tuple_struct(
            self,
            _n: &'static str,
            _l: usize,
        ) -> Res<Self::SerializeTupleStruct> {
            Err(Unsupported)
        }
        fn serialize_tuple_variant(
            self,
            _n: &'static str,
            _i: u32,
            _v: &'static str,
            _l: usize,
        ) -> Res<Self::SerializeTupleVariant> {
            Err(Unsupported)
        }
        fn serialize_map(self, _l: Option<usize>) -> Res<Self::SerializeMap> {
            Err(Unsupported)
        }
        fn serialize_struct_variant(
            self,
            _n: &'static str,
            _i: u32,
            _v: &'static str,
            _l: usize,
        ) -> Res<Self::SerializeStructVariant> {
            Err(Unsupported)
        }
    };
}

#[rustfmt::skip]
impl<'s, S: TreeSink> ser::Serializer for Top<'s, S> {
    type Ok = Vec<u8>;
    type Error = Unsupported;
    type SerializeSeq = Impossible<Vec<u8>, Unsupported>;
    type SerializeTuple = Impossible<Vec<u8>, Unsupported>;
    type SerializeTupleStruct = Impossible<Vec<u8>, Unsupported>;
    type SerializeTupleVariant = Impossible<Vec<u8>, Unsupported>;
    type SerializeMap = Impossible<Vec<u8>, Unsupported>;
    type SerializeStruct = TopFields<'s, S>;
    type SerializeStructVariant = Impossible<Vec<u8>, Unsupported>;

    refuse!(Vec<u8>);

    fn serialize_seq(self, _l: Option<usize>) -> Res<Self::SerializeSeq> { Err(Unsupported) }

    fn serialize_struct(self, _n: &'static str, _l: usize) -> Res<TopFields<'s, S>> {
        let out = vec![b'{'];
        Ok(TopFields { sink: self.sink, out, n: 0, trees_seen: false })
    }
}

#[rustfmt::skip]
impl<'s, S: TreeSink> ser::Serializer for Trees<'s, S> {
    type Ok = Vec<u64>;
    type Error = Unsupported;
    type SerializeSeq = TreesSeq<'s, S>;
    type SerializeTuple = Impossible<Vec<u64>, Unsupported>;
    type SerializeTupleStruct = Impossible<Vec<u64>, Unsupported>;
    type SerializeTupleVariant = Impossible<Vec<u64>, Unsupported>;
    type SerializeMap = Impossible<Vec<u64>, Unsupported>;
    type SerializeStruct = Impossible<Vec<u64>, Unsupported>;
    type SerializeStructVariant = Impossible<Vec<u64>, Unsupported>;

    refuse!(Vec<u64>);

    fn serialize_seq(self, l: Option<usize>) -> Res<TreesSeq<'s, S>> {
        Ok(TreesSeq { sink: self.sink, epochs: Vec::with_capacity(l.unwrap_or(0)) })
    }
    fn serialize_struct(self, _n: &'static str, _l: usize) -> Res<Self::SerializeStruct> {
        Err(Unsupported)
    }
}

/// SHA-256 of `value` in the tagged encoding below, and the value of its top-level struct
/// field `epoch` (None if it has none). `buf` is scratch space, reused across calls.
///
/// The encoding is a prefix-free token stream: every token starts with a tag that fixes
/// its length (or, for strings and bytes, is followed by the length), and compound values
/// are framed by a start tag and [`END`]; struct fields carry their names (so a skipped
/// optional field cannot shift the others) and enum variants their index. Two values of
/// one type with the same encoding therefore serialize to the same JSON.
pub fn fingerprint<T: Serialize + ?Sized>(
    value: &T,
    buf: &mut Vec<u8>,
) -> Res<([u8; 32], Option<u64>)> {
    buf.clear();
    let mut enc = Enc {
        buf,
        depth: 0,
        want_epoch: false,
        epoch: None,
        seqs: Vec::new(),
        scratch: Vec::new(),
    };
    value.serialize(&mut enc)?;
    let epoch = enc.epoch;
    Ok((Sha256::digest(&enc.buf[..]).into(), epoch))
}

const END: u8 = 0xFF;

struct Enc<'b> {
    buf: &'b mut Vec<u8>,
    depth: u32,
    /// The next value is the top-level `epoch` field.
    want_epoch: bool,
    epoch: Option<u64>,
    /// Open sequences: (offset of their tag, offset of their first element, true while every element so far
    /// was a u8). A sequence of u8 only is rewritten at its end into [`BYTES_SEQ`], its
    /// length and the raw bytes (half the size of tag + byte each, so half the hashing).
    seqs: Vec<(usize, usize, bool)>,
    scratch: Vec<u8>,
}

/// Tag of a sequence whose elements were all u8 (see `Enc::seqs`).
const BYTES_SEQ: u8 = 29;
/// Tag of a u8 (each u8 element of a sequence is written as this and the byte).
const U8: u8 = 6;

impl Enc<'_> {
    fn tag(&mut self, t: u8) {
        self.want_epoch = false;
        self.buf.push(t);
    }
    fn len(&mut self, n: usize) {
        self.buf.extend_from_slice(&(n as u64).to_le_bytes());
    }
    fn open(&mut self, t: u8, len: Option<usize>) {
        self.tag(t);
        match len {
            Some(n) => {
                self.buf.push(1);
                self.len(n);
            }
            None => self.buf.push(0),
        }
        self.depth += 1;
    }
    fn close(&mut self) {
        self.depth -= 1;
        self.buf.push(END);
    }
    fn name(&mut self, name: &str) {
        self.len(name.len());
        self.buf.extend_from_slice(name.as_bytes());
    }
}

macro_rules! compound {
    ($tr:ident, $m:ident) => {
        impl ser::$tr for &mut Enc<'_> {
            type Ok = ();
            type Error = Unsupported;
            fn $m<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
                v.serialize(&mut **self)
            }
            fn end(self) -> Res<()> {
                self.close();
                Ok(())
            }
        }
    };
}
impl ser::SerializeSeq for &mut Enc<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        let at = self.buf.len();
        v.serialize(&mut **self)?;
        let is_u8 = self.buf.len() == at + 2 && self.buf[at] == U8;
        if let Some(top) = self.seqs.last_mut() {
            top.2 &= is_u8;
        }
        Ok(())
    }
    fn end(self) -> Res<()> {
        let (head, start, all_u8) = self.seqs.pop().ok_or(Unsupported)?;
        if all_u8 {
            // [22, len-known, (len), U8 b0, U8 b1, ..] -> [29, n, b0, b1, ..]: a tag of
            // its own followed by the length, so the two forms never meet.
            let n = (self.buf.len() - start) / 2;
            self.scratch.clear();
            self.scratch
                .extend(self.buf[start..].iter().skip(1).step_by(2).copied());
            self.buf.truncate(head);
            self.buf.push(BYTES_SEQ);
            self.buf.extend_from_slice(&(n as u64).to_le_bytes());
            self.buf.extend_from_slice(&self.scratch);
            self.depth -= 1;
            return Ok(());
        }
        self.close();
        Ok(())
    }
}
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);

impl ser::SerializeMap for &mut Enc<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Res<()> {
        k.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Res<()> {
        self.close();
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Enc<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Res<()> {
        self.name(key);
        self.want_epoch = self.depth == 1 && key == "epoch";
        v.serialize(&mut **self)
    }
    fn skip_field(&mut self, key: &'static str) -> Res<()> {
        self.tag(0xFE);
        self.name(key);
        Ok(())
    }
    fn end(self) -> Res<()> {
        self.close();
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Enc<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Res<()> {
        self.name(key);
        v.serialize(&mut **self)
    }
    fn end(self) -> Res<()> {
        self.close();
        Ok(())
    }
}

impl<'a, 'b> ser::Serializer for &'a mut Enc<'b> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    /// A binary encoding: types with a compact non-text form use it (deterministic too).
    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, v: bool) -> Res<()> {
        self.tag(1);
        self.buf.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Res<()> {
        self.tag(2);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Res<()> {
        self.tag(3);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Res<()> {
        self.tag(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Res<()> {
        self.tag(5);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Res<()> {
        self.tag(U8);
        self.buf.push(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Res<()> {
        self.tag(7);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Res<()> {
        self.tag(8);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Res<()> {
        if self.want_epoch {
            self.epoch = Some(v);
        }
        self.tag(9);
        self.buf.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Res<()> {
        self.tag(10);
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Res<()> {
        self.tag(11);
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Res<()> {
        self.tag(12);
        self.buf.extend_from_slice(&u32::from(v).to_le_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Res<()> {
        self.tag(13);
        self.name(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Res<()> {
        self.tag(14);
        self.len(v.len());
        self.buf.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Res<()> {
        self.tag(15);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Res<()> {
        self.tag(16);
        v.serialize(self)
    }
    fn serialize_unit(self) -> Res<()> {
        self.tag(17);
        Ok(())
    }
    fn serialize_unit_struct(self, _n: &'static str) -> Res<()> {
        self.tag(18);
        Ok(())
    }
    fn serialize_unit_variant(self, _n: &'static str, i: u32, _v: &'static str) -> Res<()> {
        self.tag(19);
        self.buf.extend_from_slice(&i.to_le_bytes());
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _n: &'static str, v: &T) -> Res<()> {
        self.tag(20);
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _n: &'static str,
        i: u32,
        _v: &'static str,
        x: &T,
    ) -> Res<()> {
        self.tag(21);
        self.buf.extend_from_slice(&i.to_le_bytes());
        x.serialize(self)
    }
    fn serialize_seq(self, l: Option<usize>) -> Res<Self> {
        let head = self.buf.len();
        self.open(22, l);
        self.seqs.push((head, self.buf.len(), true));
        Ok(self)
    }
    fn serialize_tuple(self, l: usize) -> Res<Self> {
        self.open(23, Some(l));
        Ok(self)
    }
    fn serialize_tuple_struct(self, _n: &'static str, l: usize) -> Res<Self> {
        self.open(24, Some(l));
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _n: &'static str,
        i: u32,
        _v: &'static str,
        l: usize,
    ) -> Res<Self> {
        self.open(25, Some(l));
        self.buf.extend_from_slice(&i.to_le_bytes());
        Ok(self)
    }
    fn serialize_map(self, l: Option<usize>) -> Res<Self> {
        self.open(26, l);
        Ok(self)
    }
    fn serialize_struct(self, _n: &'static str, l: usize) -> Res<Self> {
        self.open(27, Some(l));
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _n: &'static str,
        i: u32,
        _v: &'static str,
        l: usize,
    ) -> Res<Self> {
        self.open(28, Some(l));
        self.buf.extend_from_slice(&i.to_le_bytes());
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp<T: Serialize>(v: &T) -> [u8; 32] {
        fingerprint(v, &mut Vec::new()).expect("fingerprint").0
    }

    /// Values that a loose encoding would confuse get different fingerprints; equal values
    /// the same one; the top-level epoch is captured.
    #[test]
    fn fingerprints_tell_values_apart() {
        #[derive(serde::Serialize)]
        struct T {
            epoch: u64,
            a: Vec<u8>,
            b: Vec<Vec<u8>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<u8>,
            #[serde(skip_serializing_if = "Option::is_none")]
            d: Option<u8>,
        }
        let t = |a: Vec<u8>, b: Vec<Vec<u8>>, c, d| T {
            epoch: 5,
            a,
            b,
            c,
            d,
        };
        let base = fp(&t(vec![1, 2], vec![vec![3]], None, None));
        assert_eq!(base, fp(&t(vec![1, 2], vec![vec![3]], None, None)));
        let others = [
            fp(&t(vec![1], vec![vec![2, 3]], None, None)),
            fp(&t(vec![1, 2, 3], vec![], None, None)),
            fp(&t(vec![1, 2], vec![vec![], vec![3]], None, None)),
            fp(&t(vec![1, 2], vec![vec![3]], Some(1), None)),
            fp(&t(vec![1, 2], vec![vec![3]], None, Some(1))),
            fp(&t(vec![], vec![vec![1, 2], vec![3]], None, None)),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(&base, o, "case {i}");
            for o2 in &others[i + 1..] {
                assert_ne!(o, o2);
            }
        }
        let v = t(vec![], vec![], None, None);
        assert_eq!(fingerprint(&v, &mut Vec::new()).expect("fp").1, Some(5));
        // u8 vs a wider integer of the same value, in a sequence.
        assert_ne!(fp(&vec![1u8, 2]), fp(&vec![1u16, 2]));
        assert_ne!(fp(&vec![vec![1u8]]), fp(&vec![1u8]));
    }

    struct Collect(Vec<Vec<u8>>);
    impl TreeSink for Collect {
        fn tree<T: Serialize + ?Sized>(&mut self, tree: &T) -> Res<u64> {
            let (_, e) = fingerprint(tree, &mut Vec::new())?;
            self.0
                .push(serde_json::to_vec(tree).map_err(|_| Unsupported)?);
            e.ok_or(Unsupported)
        }
    }

    /// The main record is the whole JSON with each past tree replaced by its epoch, and
    /// the trees are the JSON array elements; a store without the field is refused.
    #[test]
    fn split_store_matches_the_whole_json() {
        #[derive(serde::Serialize)]
        struct Tree {
            epoch: u64,
            s: String,
        }
        #[derive(serde::Serialize)]
        struct Store {
            max_epochs: usize,
            past_epoch_trees: Vec<Tree>,
            message_secrets: Vec<u8>,
        }
        let store = Store {
            max_epochs: 2,
            past_epoch_trees: vec![
                Tree {
                    epoch: 3,
                    s: "]\"{".into(),
                },
                Tree {
                    epoch: 4,
                    s: String::new(),
                },
            ],
            message_secrets: vec![1],
        };
        let mut sink = Collect(Vec::new());
        let main = split_store(&store, &mut sink).expect("split");
        assert_eq!(
            String::from_utf8(main).expect("utf8"),
            r#"{"max_epochs":2,"past_epoch_trees":[3,4],"message_secrets":[1]}"#
        );
        assert_eq!(sink.0[0], br#"{"epoch":3,"s":"]\"{"}"#.to_vec());
        #[derive(serde::Serialize)]
        struct Other {
            x: u8,
        }
        assert_eq!(
            split_store(&Other { x: 1 }, &mut Collect(Vec::new())),
            Err(Unsupported)
        );
    }
}
