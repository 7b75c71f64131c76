//! U+0000 in text a peer sends is refused where it is decoded.
//!
//! PostgreSQL cannot store U+0000 in a text column (SQLite can), so a string holding one
//! would be stored on one backend and fail on the other — and, within a group commit,
//! fail rows of other clients with it. Refusing it at decode time makes both backends
//! behave alike, and keeps bad input out of every later layer.

use serde::Serialize;
use serde::ser;

/// Whether JSON text holds a `\u0000` escape (a NUL in some string). A literal NUL byte
/// is not valid JSON, so the JSON parser refuses that already.
pub fn json_has_nul(text: &str) -> bool {
    text.match_indices("\\u0000").any(|(at, _)| {
        // The escape counts when the backslash starting it is not itself escaped: an odd
        // number of backslashes in a row ends at `at`.
        let run = text.as_bytes()[..=at]
            .iter()
            .rev()
            .take_while(|b| **b == b'\\')
            .count();
        run % 2 == 1
    })
}

/// Whether any string (or char) in `value` holds U+0000. Walks the value with serde, so
/// every field of every frame type is covered without a hand-written list.
pub fn has_nul<T: Serialize + ?Sized>(value: &T) -> bool {
    let mut scan = Scan { found: false };
    // The scanner never fails; a value whose Serialize impl fails is treated as clean
    // (it could not be encoded either).
    let _ = value.serialize(&mut scan);
    scan.found
}

struct Scan {
    found: bool,
}

/// The scanner's error type (never produced by the scanner itself).
#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("serialization failed")
    }
}

impl std::error::Error for Never {}

impl ser::Error for Never {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Self
    }
}

type R = Result<(), Never>;

impl ser::Serializer for &mut Scan {
    type Ok = ();
    type Error = Never;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, _: bool) -> R {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> R {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> R {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> R {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> R {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> R {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> R {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> R {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> R {
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> R {
        Ok(())
    }
    fn serialize_f64(self, _: f64) -> R {
        Ok(())
    }
    fn serialize_char(self, v: char) -> R {
        self.found |= v == '\0';
        Ok(())
    }
    fn serialize_str(self, v: &str) -> R {
        self.found |= v.contains('\0');
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        Ok(())
    }
    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R {
        v.serialize(self)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        v.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, Never> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, Never> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Never> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Never> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, Never> {
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Never> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Never> {
        Ok(self)
    }
}

impl ser::SerializeSeq for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeMap for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R {
        k.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Scan {
    type Ok = ();
    type Error = Never;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn json_escapes_are_found_only_when_they_are_escapes() {
        assert!(json_has_nul(r#"{"a":"x\u0000y"}"#));
        assert!(json_has_nul(r#"{"a\u0000":1}"#));
        // An escaped backslash followed by the text u0000 is no NUL.
        assert!(!json_has_nul(r#"{"a":"x\\u0000y"}"#));
        assert!(json_has_nul(r#"{"a":"x\\\u0000y"}"#));
        assert!(json_has_nul(r#"{"a":"\u00001"}"#));
        assert!(!json_has_nul(r#"{"a":"\u0001"}"#));
        assert!(!json_has_nul("{}"));
    }

    #[derive(Serialize)]
    enum E {
        A { s: String },
        B(Vec<Option<String>>),
    }

    #[derive(Serialize)]
    struct Deep {
        n: u64,
        e: E,
        m: BTreeMap<String, (char, String)>,
    }

    #[test]
    fn every_string_of_a_value_is_scanned() {
        let clean = Deep {
            n: 1,
            e: E::B(vec![None, Some("ok".into())]),
            m: BTreeMap::from([("k".into(), ('c', "v".into()))]),
        };
        assert!(!has_nul(&clean));
        assert!(has_nul(&E::A { s: "a\0".into() }));
        assert!(has_nul(&E::B(vec![None, Some("\0".into())])));
        assert!(has_nul(&BTreeMap::from([("k\0".to_owned(), 1u8)])));
        assert!(has_nul(&('\0', 1u8)));
    }
}
