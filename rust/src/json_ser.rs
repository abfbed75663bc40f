//! A compact JSON writer that produces exactly the bytes `serde_json::to_vec` produces, for
//! the values the storage writes, only faster where it matters.
//!
//! Every stored OpenMLS record is JSON (the layout of `openmls_memory_storage`, which old
//! stores must keep reading), and most of its bytes are MLS byte strings, which serde
//! gives as sequences of u8 and serde_json writes as `[12,255,...]`: per byte one
//! formatter call, one `itoa` and two small copies into the output. At 64 members that
//! was about a tenth of adding a member (the ratchet tree alone is ~80 KB of it). Here a
//! u8 element is one table lookup and one copy of at most four bytes.
//!
//! Anything this writer does not produce the same way as serde_json (floats, 128-bit
//! integers, map keys other than strings and integers) is [`Unsupported`]; [`to_vec`]
//! then returns serde_json's own output, so an unusual value costs speed, never bytes.
//! The Rust tests compare every record the storage writes with serde_json's.

use serde::ser::{self, Impossible, Serialize};

use crate::split_ser::Unsupported;

type Res<T> = Result<T, Unsupported>;

/// `value` as serde_json's compact JSON (byte for byte), or serde_json's error.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(256);
    write_to(&mut out, value)?;
    Ok(out)
}

/// Append `value` as serde_json's compact JSON to `out` (on error `out` is unchanged).
pub fn write_to<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), serde_json::Error> {
    let at = out.len();
    match value.serialize(&mut Json { out: &mut *out }) {
        Ok(()) => {
            // Tests check every write against serde_json (off where one counts formattings).
            #[cfg(test)]
            if crate::tracked_storage::VERIFY_SPLIT.with(std::cell::Cell::get) {
                let slow = serde_json::to_vec(value).expect("serde_json accepts it too");
                assert!(slow == out[at..], "fast JSON differs from serde_json's");
            }
            Ok(())
        }
        Err(Unsupported) => {
            out.truncate(at);
            serde_json::to_writer(&mut *out, value).inspect_err(|_| out.truncate(at))
        }
    }
}

/// Prefix of the struct names serde_json treats specially (`RawValue` is written raw,
/// an `arbitrary_precision` `Number` as its digits): such a value is left to serde_json.
const SERDE_JSON_PRIVATE: &str = "$serde_json::private::";

/// Append the decimal digits of a u8 (no call into memcpy for one to three bytes).
#[inline]
fn push_u8(out: &mut Vec<u8>, v: u8) {
    let (n, d) = U8_DEC[v as usize];
    out.push(d[0]);
    if n > 1 {
        out.push(d[1]);
        if n > 2 {
            out.push(d[2]);
        }
    }
}

/// Decimal forms of 0..=255: (number of digits, digits).
const U8_DEC: [(u8, [u8; 4]); 256] = {
    let mut t = [(0u8, [0u8; 4]); 256];
    let mut i = 0;
    while i < 256 {
        let (h, te, o) = ((i / 100) as u8, ((i / 10) % 10) as u8, (i % 10) as u8);
        t[i] = if i >= 100 {
            (3, [b'0' + h, b'0' + te, b'0' + o, 0])
        } else if i >= 10 {
            (2, [b'0' + te, b'0' + o, 0, 0])
        } else {
            (1, [b'0' + o, 0, 0, 0])
        };
        i += 1;
    }
    t
};

/// `,` and the decimal form of 0..=255: (length with the comma, bytes), four bytes so one
/// store writes any of them.
const U8_COMMA_DEC: [(u8, [u8; 4]); 256] = {
    let mut t = [(0u8, [0u8; 4]); 256];
    let mut i = 0;
    while i < 256 {
        let (n, d) = U8_DEC[i];
        t[i] = (n + 1, [b',', d[0], d[1], d[2]]);
        i += 1;
    }
    t
};

struct Json<'o> {
    out: &'o mut Vec<u8>,
}

impl Json<'_> {
    /// An integer in decimal, as serde_json (itoa) writes it.
    fn uint(&mut self, mut v: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&d[i..]);
    }
    fn int(&mut self, v: i64) {
        if v < 0 {
            self.out.push(b'-');
        }
        self.uint(v.unsigned_abs());
    }
    /// A string as serde_json escapes it: plain ASCII directly, anything else by it.
    fn str(&mut self, s: &str) -> Res<()> {
        let plain = s
            .bytes()
            .all(|c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\');
        if plain {
            self.out.reserve(s.len() + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(s.as_bytes());
            self.out.push(b'"');
            Ok(())
        } else {
            serde_json::to_writer(&mut *self.out, s).map_err(|_| Unsupported)
        }
    }
}

/// An open `[...]` or `{...}`: whether an element was written (for the commas) and what
/// closes it (with the `}` of an enclosing variant).
pub struct Compound<'a, 'o> {
    ser: &'a mut Json<'o>,
    first: bool,
    close: &'static [u8],
    /// A u8 element goes straight from the table.
    in_seq: bool,
}

impl Compound<'_, '_> {
    #[inline]
    fn comma(&mut self) {
        if self.first {
            self.first = false;
        } else {
            self.ser.out.push(b',');
        }
    }
    fn end(self) {
        self.ser.out.extend_from_slice(self.close);
    }
}

/// Serializes a u8 sequence element from the table; anything else as usual.
struct SeqElem<'a, 'o> {
    ser: &'a mut Json<'o>,
    /// No element before it: no comma.
    first: bool,
}

impl<'a, 'o> SeqElem<'a, 'o> {
    /// The writer, after the comma that separates this element from the one before.
    #[inline]
    fn lead(self) -> &'a mut Json<'o> {
        if !self.first {
            self.ser.out.push(b',');
        }
        self.ser
    }
}

macro_rules! forward_to_json {
    ($($m:ident($($a:ident: $t:ty),*)),* $(,)?) => {
        $(
            #[inline]
            fn $m(self, $($a: $t),*) -> Res<()> {
                ser::Serializer::$m(self.lead(), $($a),*)
            }
        )*
    };
}

impl<'a, 'o> ser::Serializer for SeqElem<'a, 'o> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Compound<'a, 'o>;
    type SerializeTuple = Compound<'a, 'o>;
    type SerializeTupleStruct = Compound<'a, 'o>;
    type SerializeTupleVariant = Compound<'a, 'o>;
    type SerializeMap = Compound<'a, 'o>;
    type SerializeStruct = Compound<'a, 'o>;
    type SerializeStructVariant = Compound<'a, 'o>;

    /// The element of a `Vec<u8>`: inlined into the sequence's loop; after the first, the
    /// comma and the digits are one four-byte copy, cut to their length.
    #[inline]
    fn serialize_u8(self, v: u8) -> Res<()> {
        if self.first {
            push_u8(self.ser.out, v);
        } else {
            let (n, d) = U8_COMMA_DEC[v as usize];
            let at = self.ser.out.len();
            self.ser.out.extend_from_slice(&d);
            self.ser.out.truncate(at + n as usize);
        }
        Ok(())
    }

    forward_to_json!(
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

    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Res<()> {
        v.serialize(self.lead())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, n: &'static str, v: &T) -> Res<()> {
        ser::Serializer::serialize_newtype_struct(self.lead(), n, v)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        n: &'static str,
        i: u32,
        var: &'static str,
        v: &T,
    ) -> Res<()> {
        ser::Serializer::serialize_newtype_variant(self.lead(), n, i, var, v)
    }
    fn serialize_seq(self, l: Option<usize>) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_seq(self.lead(), l)
    }
    fn serialize_tuple(self, l: usize) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_tuple(self.lead(), l)
    }
    fn serialize_tuple_struct(self, n: &'static str, l: usize) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_tuple_struct(self.lead(), n, l)
    }
    fn serialize_tuple_variant(
        self,
        n: &'static str,
        i: u32,
        v: &'static str,
        l: usize,
    ) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_tuple_variant(self.lead(), n, i, v, l)
    }
    fn serialize_map(self, l: Option<usize>) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_map(self.lead(), l)
    }
    fn serialize_struct(self, n: &'static str, l: usize) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_struct(self.lead(), n, l)
    }
    fn serialize_struct_variant(
        self,
        n: &'static str,
        i: u32,
        v: &'static str,
        l: usize,
    ) -> Res<Compound<'a, 'o>> {
        ser::Serializer::serialize_struct_variant(self.lead(), n, i, v, l)
    }
    fn serialize_i128(self, _v: i128) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_u128(self, _v: u128) -> Res<()> {
        Err(Unsupported)
    }
}

impl<'a, 'o> ser::Serializer for &'a mut Json<'o> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Compound<'a, 'o>;
    type SerializeTuple = Compound<'a, 'o>;
    type SerializeTupleStruct = Compound<'a, 'o>;
    type SerializeTupleVariant = Compound<'a, 'o>;
    type SerializeMap = Compound<'a, 'o>;
    type SerializeStruct = Compound<'a, 'o>;
    type SerializeStructVariant = Compound<'a, 'o>;

    fn serialize_bool(self, v: bool) -> Res<()> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Res<()> {
        self.int(v.into());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Res<()> {
        self.int(v.into());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Res<()> {
        self.int(v.into());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Res<()> {
        self.int(v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Res<()> {
        push_u8(self.out, v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Res<()> {
        self.uint(v.into());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Res<()> {
        self.uint(v.into());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Res<()> {
        self.uint(v);
        Ok(())
    }
    fn serialize_i128(self, _v: i128) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_u128(self, _v: u128) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_f32(self, _v: f32) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_f64(self, _v: f64) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_char(self, v: char) -> Res<()> {
        self.str(v.encode_utf8(&mut [0u8; 4]))
    }
    fn serialize_str(self, v: &str) -> Res<()> {
        self.str(v)
    }
    fn serialize_bytes(self, v: &[u8]) -> Res<()> {
        self.out.reserve(v.len() * 4 + 2);
        self.out.push(b'[');
        for (i, b) in v.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            push_u8(self.out, *b);
        }
        self.out.push(b']');
        Ok(())
    }
    fn serialize_none(self) -> Res<()> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Res<()> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Res<()> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _n: &'static str) -> Res<()> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _n: &'static str, _i: u32, v: &'static str) -> Res<()> {
        self.str(v)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, n: &'static str, v: &T) -> Res<()> {
        if n.starts_with(SERDE_JSON_PRIVATE) {
            return Err(Unsupported);
        }
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _n: &'static str,
        _i: u32,
        var: &'static str,
        v: &T,
    ) -> Res<()> {
        self.out.push(b'{');
        self.str(var)?;
        self.out.push(b':');
        v.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, l: Option<usize>) -> Res<Compound<'a, 'o>> {
        self.out.push(b'[');
        if let Some(n) = l {
            self.out.reserve(n * 2);
        }
        Ok(Compound {
            ser: self,
            first: true,
            close: b"]",
            in_seq: true,
        })
    }
    fn serialize_tuple(self, l: usize) -> Res<Compound<'a, 'o>> {
        self.serialize_seq(Some(l))
    }
    fn serialize_tuple_struct(self, _n: &'static str, l: usize) -> Res<Compound<'a, 'o>> {
        self.serialize_seq(Some(l))
    }
    fn serialize_tuple_variant(
        self,
        _n: &'static str,
        _i: u32,
        v: &'static str,
        _l: usize,
    ) -> Res<Compound<'a, 'o>> {
        self.out.push(b'{');
        self.str(v)?;
        self.out.extend_from_slice(b":[");
        Ok(Compound {
            ser: self,
            first: true,
            close: b"]}",
            in_seq: true,
        })
    }
    fn serialize_map(self, _l: Option<usize>) -> Res<Compound<'a, 'o>> {
        self.out.push(b'{');
        Ok(Compound {
            ser: self,
            first: true,
            close: b"}",
            in_seq: false,
        })
    }
    fn serialize_struct(self, n: &'static str, _l: usize) -> Res<Compound<'a, 'o>> {
        if n.starts_with(SERDE_JSON_PRIVATE) {
            return Err(Unsupported);
        }
        self.serialize_map(None)
    }
    fn serialize_struct_variant(
        self,
        _n: &'static str,
        _i: u32,
        v: &'static str,
        _l: usize,
    ) -> Res<Compound<'a, 'o>> {
        self.out.push(b'{');
        self.str(v)?;
        self.out.extend_from_slice(b":{");
        Ok(Compound {
            ser: self,
            first: true,
            close: b"}}",
            in_seq: false,
        })
    }
}

impl ser::SerializeSeq for Compound<'_, '_> {
    type Ok = ();
    type Error = Unsupported;
    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        debug_assert!(self.in_seq);
        let first = std::mem::replace(&mut self.first, false);
        v.serialize(SeqElem {
            ser: self.ser,
            first,
        })
    }
    fn end(self) -> Res<()> {
        Compound::end(self);
        Ok(())
    }
}

macro_rules! seq_like {
    ($tr:ident, $m:ident) => {
        impl ser::$tr for Compound<'_, '_> {
            type Ok = ();
            type Error = Unsupported;
            fn $m<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
                self.comma();
                v.serialize(&mut *self.ser)
            }
            fn end(self) -> Res<()> {
                Compound::end(self);
                Ok(())
            }
        }
    };
}
seq_like!(SerializeTuple, serialize_element);
seq_like!(SerializeTupleStruct, serialize_field);
seq_like!(SerializeTupleVariant, serialize_field);

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Res<()> {
        self.comma();
        k.serialize(MapKey { ser: self.ser })?;
        self.ser.out.push(b':');
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
        v.serialize(&mut *self.ser)
    }
    fn end(self) -> Res<()> {
        Compound::end(self);
        Ok(())
    }
}

macro_rules! struct_like {
    ($tr:ident) => {
        impl ser::$tr for Compound<'_, '_> {
            type Ok = ();
            type Error = Unsupported;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                v: &T,
            ) -> Res<()> {
                self.comma();
                self.ser.str(key)?;
                self.ser.out.push(b':');
                v.serialize(&mut *self.ser)
            }
            fn end(self) -> Res<()> {
                Compound::end(self);
                Ok(())
            }
        }
    };
}
struct_like!(SerializeStruct);
struct_like!(SerializeStructVariant);

/// Map keys as serde_json writes them: strings as they are, integers quoted; anything
/// else is left to serde_json.
struct MapKey<'a, 'o> {
    ser: &'a mut Json<'o>,
}

macro_rules! quoted_int {
    ($($m:ident: $t:ty => $f:ident),*) => {
        $(
            fn $m(self, v: $t) -> Res<()> {
                self.ser.out.push(b'"');
                self.ser.$f(v.into());
                self.ser.out.push(b'"');
                Ok(())
            }
        )*
    };
}

impl ser::Serializer for MapKey<'_, '_> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Impossible<(), Unsupported>;
    type SerializeTuple = Impossible<(), Unsupported>;
    type SerializeTupleStruct = Impossible<(), Unsupported>;
    type SerializeTupleVariant = Impossible<(), Unsupported>;
    type SerializeMap = Impossible<(), Unsupported>;
    type SerializeStruct = Impossible<(), Unsupported>;
    type SerializeStructVariant = Impossible<(), Unsupported>;

    quoted_int!(
        serialize_i8: i8 => int, serialize_i16: i16 => int, serialize_i32: i32 => int,
        serialize_i64: i64 => int, serialize_u8: u8 => uint, serialize_u16: u16 => uint,
        serialize_u32: u32 => uint, serialize_u64: u64 => uint
    );
    fn serialize_str(self, v: &str) -> Res<()> {
        self.ser.str(v)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _n: &'static str, v: &T) -> Res<()> {
        v.serialize(self)
    }
    fn serialize_bool(self, _v: bool) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_f32(self, _v: f32) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_f64(self, _v: f64) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_char(self, _v: char) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_bytes(self, _v: &[u8]) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_none(self) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _v: &T) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_unit(self) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_unit_struct(self, _n: &'static str) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_unit_variant(self, _n: &'static str, _i: u32, _v: &'static str) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _n: &'static str,
        _i: u32,
        _v: &'static str,
        _x: &T,
    ) -> Res<()> {
        Err(Unsupported)
    }
    fn serialize_seq(self, _l: Option<usize>) -> Res<Self::SerializeSeq> {
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
    fn serialize_struct(self, _n: &'static str, _l: usize) -> Res<Self::SerializeStruct> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn same<T: Serialize>(v: &T) {
        let mut out = Vec::new();
        v.serialize(&mut Json { out: &mut out })
            .expect("handled by the fast path");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            serde_json::to_string(v).expect("json")
        );
    }

    /// Every construct of serde's data model the fast path handles comes out as serde_json
    /// writes it; the ones it leaves to serde_json come out the same through `to_vec`.
    #[test]
    fn output_is_serde_jsons() {
        #[derive(serde::Serialize)]
        struct Unit;
        #[derive(serde::Serialize)]
        struct New(Vec<u8>);
        #[derive(serde::Serialize)]
        struct Tup(u8, i64, Option<u16>);
        #[derive(serde::Serialize)]
        enum E {
            A,
            B(Vec<u8>),
            C(u8, String),
            D { x: u32, y: Vec<Vec<u8>> },
        }
        #[derive(serde::Serialize)]
        struct S {
            a: bool,
            b: Vec<u8>,
            c: Option<Vec<u8>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            d: Option<u8>,
            e: Vec<E>,
            f: (u8, u8),
            g: Unit,
            h: New,
            i: Tup,
            j: String,
            k: char,
            l: BTreeMap<u32, Vec<u8>>,
            m: BTreeMap<String, E>,
            n: [u8; 3],
            o: Vec<Option<u8>>,
            p: i8,
            q: (),
            r: Vec<u16>,
            s: BTreeMap<i64, u8>,
        }
        let all: Vec<u8> = (0..=255).collect();
        let s = S {
            a: true,
            b: all.clone(),
            c: None,
            d: None,
            e: vec![
                E::A,
                E::B(vec![]),
                E::C(7, "x\"\\\n\u{7f}é\u{1}".into()),
                E::D {
                    x: u32::MAX,
                    y: vec![vec![0], vec![]],
                },
            ],
            f: (0, 255),
            g: Unit,
            h: New(vec![10, 100]),
            i: Tup(1, i64::MIN, Some(65535)),
            j: "plain".into(),
            k: '"',
            l: [(1, vec![1]), (u32::MAX, vec![])].into(),
            m: [("k\t".to_string(), E::A)].into(),
            n: [9, 99, 199],
            o: vec![None, Some(0)],
            p: -128,
            q: (),
            r: vec![0, 1000],
            s: [(i64::MIN, 1), (-5, 2), (0, 3)].into(),
        };
        same(&s);
        same(&Vec::<u8>::new());
        same(&serde_bytes_like(&all));
        same(&u64::MAX);
        // Left to serde_json: floats, 128-bit integers, keys that are not strings or ints.
        let mut odd: HashMap<bool, f64> = HashMap::new();
        odd.insert(true, 1.5);
        assert_eq!(
            to_vec(&(1.25f64, u128::MAX, odd)).expect("json"),
            serde_json::to_vec(&(
                1.25f64,
                u128::MAX,
                [(true, 1.5)].into_iter().collect::<HashMap<_, _>>()
            ))
            .expect("json")
        );
        let mut buf = Vec::new();
        assert_eq!(
            2.5f32.serialize(&mut Json { out: &mut buf }),
            Err(Unsupported)
        );
        // serde_json's RawValue is a struct with its private name: written raw by it.
        struct Raw;
        impl Serialize for Raw {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use ser::SerializeStruct as _;
                let mut st = s.serialize_struct("$serde_json::private::RawValue", 1)?;
                st.serialize_field("$serde_json::private::RawValue", "[1,2]")?;
                st.end()
            }
        }
        assert_eq!(Raw.serialize(&mut Json { out: &mut buf }), Err(Unsupported));
        assert_eq!(
            to_vec(&vec![Raw]).expect("json"),
            serde_json::to_vec(&vec![Raw]).expect("json")
        );
    }

    /// A value that uses `serialize_bytes` (serde_json writes it as an array of numbers).
    fn serde_bytes_like(b: &[u8]) -> impl Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl Serialize for B<'_> {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }
}
