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
//! - [`encode`] writes a value in a tagged binary form (no number formatting, byte
//!   strings as raw bytes), capturing the top-level `epoch` field on the way. The sink
//!   compares it byte for byte with the encoding of the record last written for that
//!   epoch and formats the tree as JSON only when it differs. (Until session 8 the
//!   encoding was hashed with SHA-256 and the hash compared: the hash cost as much as
//!   the encoding, and u8 sequences were written tagged and compacted afterwards.)
//!
//! Anything not of the expected shape is [`Unsupported`], and the caller falls back to the
//! old path (the whole JSON, scanned), so an OpenMLS layout change costs speed, not data.

use std::fmt;

use serde::ser::{self, Impossible, Serialize};

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
            crate::json_ser::write_to(&mut self.out, value).map_err(|_| Unsupported)?;
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

/// `value` in the tagged binary encoding below, written into `buf` (cleared first, reused
/// across calls), and the value of its top-level struct field `epoch` (None if it has none).
///
/// The encoding is a prefix-free token stream: every token starts with a tag that fixes
/// its length (or, for strings and bytes, is followed by the length), and compound values
/// are framed by a start tag and [`END`]; struct fields carry their names (so a skipped
/// optional field cannot shift the others) and enum variants their index. A sequence whose
/// elements are all bare u8 (a `Vec<u8>`, serde's form of most MLS byte strings) is
/// [`BYTES_SEQ`], its length and the raw bytes. Two values of one type with the same
/// encoding therefore serialize to the same JSON, and the caller compares encodings
/// byte for byte: no hash, so no collision to argue about.
pub fn encode<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Res<Option<u64>> {
    buf.clear();
    let mut enc = Enc {
        buf,
        depth: 0,
        want_epoch: false,
        epoch: None,
        seqs: Vec::new(),
    };
    value.serialize(&mut enc)?;
    Ok(enc.epoch)
}

const END: u8 = 0xFF;

/// An open sequence of the encoder.
struct Seq {
    /// Offset of its tag (rewritten to [`BYTES_SEQ`] at the end if every element was a u8).
    head: usize,
    /// Offset of its first element.
    start: usize,
    /// Every element so far was a bare u8, written as the raw byte.
    all_u8: bool,
}

struct Enc<'b> {
    buf: &'b mut Vec<u8>,
    depth: u32,
    /// The next value is the top-level `epoch` field.
    want_epoch: bool,
    epoch: Option<u64>,
    seqs: Vec<Seq>,
}

/// Tag of a sequence whose elements were all u8: length (u64 LE) then the raw bytes.
const BYTES_SEQ: u8 = 29;
/// Tag of a sequence with other elements: length slot (u64 LE, u64::MAX if not known
/// up front), the elements, [`END`].
const SEQ: u8 = 22;
/// Tag of a u8 that is not a bare element of an all-u8 sequence.
const U8: u8 = 6;

impl Enc<'_> {
    #[inline]
    fn tag(&mut self, t: u8) {
        self.want_epoch = false;
        self.buf.push(t);
    }
    #[inline]
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
    /// Start a sequence: its tag and length slot; returns (offset of the tag, of its
    /// first element).
    fn start_seq(&mut self, len: Option<usize>) -> (usize, usize) {
        let head = self.buf.len();
        self.tag(SEQ);
        self.len(len.unwrap_or(usize::MAX));
        self.depth += 1;
        (head, self.buf.len())
    }
    /// One element of the sequence whose first element is at `start`; `all_u8`: every
    /// element before it was a bare u8 (written raw). Returns whether that still holds.
    #[inline]
    fn element<T: Serialize + ?Sized>(&mut self, v: &T, start: usize, all_u8: bool) -> Res<bool> {
        if !all_u8 {
            v.serialize(&mut *self)?;
            return Ok(false);
        }
        let at = self.buf.len();
        if v.serialize(Probe { enc: &mut *self })? {
            return Ok(true);
        }
        // The first element that is not a bare u8 (never in a Vec<u8>): the raw bytes
        // before it become tagged u8s, and the sequence is encoded element by element.
        let tail = self.buf.split_off(at);
        let raw = self.buf.split_off(start);
        for b in raw {
            self.buf.push(U8);
            self.buf.push(b);
        }
        self.buf.extend_from_slice(&tail);
        Ok(false)
    }
    /// Close a sequence: a byte string gets the [`BYTES_SEQ`] tag and its length in the
    /// slot, any other sequence an [`END`].
    fn end_seq(&mut self, head: usize, start: usize, all_u8: bool) {
        self.depth -= 1;
        if all_u8 {
            let n = (self.buf.len() - start) as u64;
            self.buf[head] = BYTES_SEQ;
            self.buf[head + 1..start].copy_from_slice(&n.to_le_bytes());
        } else {
            self.buf.push(END);
        }
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
        let top = self.seqs.last().ok_or(Unsupported)?;
        let (start, all_u8) = (top.start, top.all_u8);
        if !self.element(v, start, all_u8)? {
            if let Some(top) = self.seqs.last_mut() {
                top.all_u8 = false;
            }
        }
        Ok(())
    }
    fn end(self) -> Res<()> {
        let top = self.seqs.pop().ok_or(Unsupported)?;
        self.end_seq(top.head, top.start, top.all_u8);
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
        let (head, start) = self.start_seq(l);
        self.seqs.push(Seq {
            head,
            start,
            all_u8: true,
        });
        Ok(self)
    }
    /// serde's `Vec<u8>` (most MLS byte strings) comes here: the same encoding as
    /// `serialize_seq`, with the sequence's state in locals instead of on `seqs`.
    fn collect_seq<I>(self, iter: I) -> Res<()>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let iter = iter.into_iter();
        let len = match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => Some(lo),
            _ => None,
        };
        let (head, start) = self.start_seq(len);
        if let Some(n) = len {
            self.buf.reserve(n);
        }
        let mut all_u8 = true;
        for item in iter {
            all_u8 = self.element(&item, start, all_u8)?;
        }
        self.end_seq(head, start, all_u8);
        Ok(())
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

/// Serializes one element of a sequence whose elements so far were all bare u8: a u8 is
/// written raw and answers `true`; anything else is written by the encoder as usual
/// (tagged) and answers `false`. The answer travels as the serializer's `Ok` value, so the
/// loop over a byte string keeps no state in the encoder.
struct Probe<'a, 'b> {
    enc: &'a mut Enc<'b>,
}

/// A compound value inside a [`Probe`]d element: the encoder's, answering `false`.
struct ProbeCompound<'a, 'b> {
    enc: &'a mut Enc<'b>,
}

macro_rules! probe_forward {
    ($($m:ident($($a:ident: $t:ty),*)),* $(,)?) => {
        $(
            fn $m(self, $($a: $t),*) -> Res<bool> {
                ser::Serializer::$m(&mut *self.enc, $($a),*)?;
                Ok(false)
            }
        )*
    };
}

impl<'a, 'b> ser::Serializer for Probe<'a, 'b> {
    type Ok = bool;
    type Error = Unsupported;
    type SerializeSeq = ProbeCompound<'a, 'b>;
    type SerializeTuple = ProbeCompound<'a, 'b>;
    type SerializeTupleStruct = ProbeCompound<'a, 'b>;
    type SerializeTupleVariant = ProbeCompound<'a, 'b>;
    type SerializeMap = ProbeCompound<'a, 'b>;
    type SerializeStruct = ProbeCompound<'a, 'b>;
    type SerializeStructVariant = ProbeCompound<'a, 'b>;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_u8(self, v: u8) -> Res<bool> {
        // `want_epoch` is false here: the sequence's tag cleared it.
        self.enc.buf.push(v);
        Ok(true)
    }

    probe_forward!(
        serialize_bool(v: bool),
        serialize_i8(v: i8),
        serialize_i16(v: i16),
        serialize_i32(v: i32),
        serialize_i64(v: i64),
        serialize_u16(v: u16),
        serialize_u32(v: u32),
        serialize_u64(v: u64),
        serialize_f32(v: f32),
        serialize_f64(v: f64),
        serialize_char(v: char),
        serialize_str(v: &str),
        serialize_bytes(v: &[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(n: &'static str),
        serialize_unit_variant(n: &'static str, i: u32, v: &'static str),
    );

    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Res<bool> {
        ser::Serializer::serialize_some(&mut *self.enc, v)?;
        Ok(false)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, n: &'static str, v: &T) -> Res<bool> {
        ser::Serializer::serialize_newtype_struct(&mut *self.enc, n, v)?;
        Ok(false)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        n: &'static str,
        i: u32,
        var: &'static str,
        v: &T,
    ) -> Res<bool> {
        ser::Serializer::serialize_newtype_variant(&mut *self.enc, n, i, var, v)?;
        Ok(false)
    }
    fn serialize_seq(self, l: Option<usize>) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_seq(self.enc, l)?;
        Ok(ProbeCompound { enc })
    }
    fn serialize_tuple(self, l: usize) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_tuple(self.enc, l)?;
        Ok(ProbeCompound { enc })
    }
    fn serialize_tuple_struct(self, n: &'static str, l: usize) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_tuple_struct(self.enc, n, l)?;
        Ok(ProbeCompound { enc })
    }
    fn serialize_tuple_variant(
        self,
        n: &'static str,
        i: u32,
        v: &'static str,
        l: usize,
    ) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_tuple_variant(self.enc, n, i, v, l)?;
        Ok(ProbeCompound { enc })
    }
    fn serialize_map(self, l: Option<usize>) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_map(self.enc, l)?;
        Ok(ProbeCompound { enc })
    }
    fn serialize_struct(self, n: &'static str, l: usize) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_struct(self.enc, n, l)?;
        Ok(ProbeCompound { enc })
    }
    fn serialize_struct_variant(
        self,
        n: &'static str,
        i: u32,
        v: &'static str,
        l: usize,
    ) -> Res<ProbeCompound<'a, 'b>> {
        let enc = ser::Serializer::serialize_struct_variant(self.enc, n, i, v, l)?;
        Ok(ProbeCompound { enc })
    }
}

macro_rules! probe_compound {
    ($tr:ident, $m:ident) => {
        impl ser::$tr for ProbeCompound<'_, '_> {
            type Ok = bool;
            type Error = Unsupported;
            fn $m<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
                ser::$tr::$m(&mut self.enc, v)
            }
            fn end(self) -> Res<bool> {
                ser::$tr::end(self.enc)?;
                Ok(false)
            }
        }
    };
}
probe_compound!(SerializeSeq, serialize_element);
probe_compound!(SerializeTuple, serialize_element);
probe_compound!(SerializeTupleStruct, serialize_field);
probe_compound!(SerializeTupleVariant, serialize_field);

impl ser::SerializeMap for ProbeCompound<'_, '_> {
    type Ok = bool;
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Res<()> {
        ser::SerializeMap::serialize_key(&mut self.enc, k)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        ser::SerializeMap::serialize_value(&mut self.enc, v)
    }
    fn end(self) -> Res<bool> {
        ser::SerializeMap::end(self.enc)?;
        Ok(false)
    }
}

impl ser::SerializeStruct for ProbeCompound<'_, '_> {
    type Ok = bool;
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Res<()> {
        ser::SerializeStruct::serialize_field(&mut self.enc, key, v)
    }
    fn skip_field(&mut self, key: &'static str) -> Res<()> {
        ser::SerializeStruct::skip_field(&mut self.enc, key)
    }
    fn end(self) -> Res<bool> {
        ser::SerializeStruct::end(self.enc)?;
        Ok(false)
    }
}

impl ser::SerializeStructVariant for ProbeCompound<'_, '_> {
    type Ok = bool;
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, v: &T) -> Res<()> {
        ser::SerializeStructVariant::serialize_field(&mut self.enc, key, v)
    }
    fn end(self) -> Res<bool> {
        ser::SerializeStructVariant::end(self.enc)?;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp<T: Serialize>(v: &T) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(v, &mut buf).expect("encode");
        buf
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
        assert_eq!(encode(&v, &mut Vec::new()).expect("encode"), Some(5));
        // u8 vs a wider integer of the same value, in a sequence.
        assert_ne!(fp(&vec![1u8, 2]), fp(&vec![1u16, 2]));
        assert_ne!(fp(&vec![vec![1u8]]), fp(&vec![1u8]));
    }

    /// A byte string is its length and the raw bytes; a sequence that turns out not to be
    /// one (a u8 first, then something else) is written element by element, tagged, so
    /// the two never meet; the length slot of a sequence is the same in both forms.
    #[test]
    fn byte_sequences_are_raw_and_others_tagged() {
        struct Mixed;
        impl Serialize for Mixed {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use ser::SerializeSeq as _;
                let mut q = s.serialize_seq(Some(2))?;
                q.serialize_element(&1u8)?;
                q.serialize_element(&2u16)?;
                q.end()
            }
        }
        let le = |n: u64| n.to_le_bytes().to_vec();
        assert_eq!(
            fp(&vec![1u8, 2]),
            [vec![BYTES_SEQ], le(2), vec![1, 2]].concat()
        );
        assert_eq!(fp(&Vec::<u8>::new()), [vec![BYTES_SEQ], le(0)].concat());
        assert_eq!(
            fp(&Mixed),
            [vec![SEQ], le(2), vec![U8, 1, 7, 2, 0, END]].concat()
        );
        // The same through `collect_seq` (a Vec), where the first element is a u8 and the
        // second is not.
        struct E(bool);
        impl Serialize for E {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if self.0 {
                    s.serialize_u16(2)
                } else {
                    s.serialize_u8(1)
                }
            }
        }
        assert_eq!(fp(&vec![E(false), E(true)]), fp(&Mixed));
        assert_ne!(fp(&vec![Some(1u8)]), fp(&vec![1u8]));
        assert_ne!(fp(&vec![None::<u8>]), fp(&vec![15u8]));
        assert_ne!(fp(&vec![vec![1u8, 2]]), fp(&vec![1u8, 2]));
        // A u8 in a struct inside a byte sequence's sibling stays tagged.
        #[derive(serde::Serialize)]
        struct S {
            a: u8,
            b: Vec<u8>,
        }
        assert_eq!(
            fp(&vec![S { a: 3, b: vec![4] }]),
            [
                vec![SEQ],
                le(1),
                vec![27, 1],
                le(2),
                le(1),
                b"a".to_vec(),
                vec![U8, 3],
                le(1),
                b"b".to_vec(),
                vec![BYTES_SEQ],
                le(1),
                vec![4, END, END],
            ]
            .concat()
        );
    }

    struct Collect(Vec<Vec<u8>>);
    impl TreeSink for Collect {
        fn tree<T: Serialize + ?Sized>(&mut self, tree: &T) -> Res<u64> {
            let e = encode(tree, &mut Vec::new())?;
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
