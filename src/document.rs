//! A JSON document borrowed from a body: what the layer deserializes a request body into,
//! once per request, with serde_json, for the estimators and extractors that read it.
//!
//! The body is checked as UTF-8 once, as a whole. Strings borrow the body's bytes unless
//! they have escapes (serde_json decodes those into a copy); objects are flat lists of
//! members in document order, a repeated name keeping only its last value, as in a
//! `serde_json::Value` (found pair by pair in an object of up to 16 members, by sorting its
//! names once in a larger one, as it is built). Building it takes time in proportion to the
//! body's size whatever its shape (an object of 100,000 members: one sort of its names), and
//! little memory (a small
//! object is one short vector, not a map's node); nesting deeper than serde_json's limit
//! (128 levels) is refused as invalid JSON, so a body can't exhaust the stack.
//! [`RequestView::json`](crate::key::RequestView::json) still gives a `serde_json::Value`,
//! parsed from the same bytes the first time it is asked for.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// A JSON value whose strings may borrow from the deserialized bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// Objects of at most this many members are checked for repeated names pair by pair; larger
/// ones by sorting their names (time in proportion to n log n, not n squared).
const SMALL_OBJECT: usize = 16;

/// A JSON object: its members in document order, each name once (a repeated name keeps its
/// last value, at that value's place).
#[derive(Debug, Clone, Default)]
pub(crate) struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Object<'a> {
    /// The object of `members`, without the ones a later member of the same name overrides.
    fn new(mut members: Vec<(Cow<'a, str>, Json<'a>)>) -> Self {
        let unique = match members.len() {
            0 | 1 => true,
            // A small object (the usual one) is checked pair by pair, without allocating.
            2..=SMALL_OBJECT => {
                (1..members.len()).all(|j| members[..j].iter().all(|(k, _)| *k != members[j].0))
            }
            _ => false,
        };
        if unique {
            return Self(members);
        }
        let mut order: Vec<usize> = (0..members.len()).collect();
        // A stable sort: equal names stay in document order, the last of a run counts.
        order.sort_by(|&a, &b| members[a].0.cmp(&members[b].0));
        let overridden: Vec<usize> = order
            .windows(2)
            .filter(|pair| members[pair[0]].0 == members[pair[1]].0)
            .map(|pair| pair[0])
            .collect();
        if !overridden.is_empty() {
            let mut keep = vec![true; members.len()];
            for i in overridden {
                keep[i] = false;
            }
            let mut keep = keep.into_iter();
            members.retain(|_| keep.next().unwrap_or(true));
        }
        Self(members)
    }

    /// The value of member `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Json<'a>> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The members, in document order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    /// The members sorted by name: the order in which a `serde_json::Value` (a sorted map)
    /// writes them.
    pub(crate) fn sorted(&self) -> Vec<(&str, &Json<'a>)> {
        let mut members: Vec<_> = self.iter().collect();
        members.sort_unstable_by(|a, b| a.0.cmp(b.0));
        members
    }
}

/// The same members, whatever their order.
impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.sorted() == other.sorted()
    }
}

impl<'a> Json<'a> {
    /// Deserializes `bytes` (one JSON value, whitespace around it allowed) with serde_json:
    /// what `serde_json::from_slice::<Value>` accepts, into the same value.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        // Checked as UTF-8 once, as a whole, rather than string by string; bytes that aren't
        // UTF-8 are invalid JSON, and parsed as bytes only for serde_json's error.
        match std::str::from_utf8(bytes) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(bytes),
        }
    }

    /// The same document, borrowing the strings of a `serde_json::Value`.
    pub(crate) fn from_value(v: &'a Value) -> Self {
        match v {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => Self::Number(n.clone()),
            Value::String(s) => Self::String(Cow::Borrowed(s)),
            Value::Array(items) => Self::Array(items.iter().map(Self::from_value).collect()),
            Value::Object(fields) => Self::Object(Object(
                fields
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Self::from_value(v)))
                    .collect(),
            )),
        }
    }

    /// The value of member `key` of an object.
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.as_object()?.get(key)
    }

    pub(crate) fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Self::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The text of a string.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub(crate) fn is_u64(&self) -> bool {
        self.as_u64().is_some()
    }

    /// The value at a JSON pointer (RFC 6901), like [`Value::pointer`].
    pub(crate) fn pointer(&self, pointer: &str) -> Option<&Json<'a>> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        rest.split('/').try_fold(self, |target, token| {
            // Unescaped only when it has an escape: a lookup allocates nothing in the usual case.
            let token: Cow<'_, str> = if token.contains('~') {
                Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(token)
            };
            match target {
                Self::Object(o) => o.get(&token),
                Self::Array(items) => {
                    // Like `Value::pointer`: a decimal index without a leading `+` or zero.
                    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
                        return None;
                    }
                    items.get(token.parse::<usize>().ok()?)
                }
                _ => None,
            }
        })
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

/// Builds a [`Json`], borrowing every string the deserializer can lend.
struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json<'de>, E> {
        Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members = Vec::new();
        while let Some(Name(name)) = map.next_key()? {
            members.push((name, map.next_value()?));
        }
        Ok(Json::Object(Object::new(members)))
    }
}

/// A member name, borrowed unless it has escapes.
pub(crate) struct Name<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_like_a_value_borrowing_plain_strings() {
        let text = br#"{"a":"x","b":[1,-2,3.5,true,null],"c":{"d":"e\"scaped"},"a":"last"}"#;
        let doc = Json::parse(text).unwrap();
        let value: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(doc, Json::from_value(&value));
        assert_eq!(doc.get("a").and_then(Json::as_str), Some("last"));
        assert!(matches!(
            doc.get("a"),
            Some(Json::String(Cow::Borrowed("last")))
        ));
        assert_eq!(
            doc.pointer("/c/d").and_then(Json::as_str),
            Some("e\"scaped")
        );
        let names: Vec<_> = doc.as_object().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["b", "c", "a"]);
        let sorted: Vec<_> = doc.as_object().unwrap().sorted();
        assert_eq!(
            sorted.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        // Every name once, the last value kept, however many repeats.
        let repeats: String = (0..1000).map(|i| format!(r#""k{}":{i},"#, i % 7)).collect();
        let text = format!("{{{repeats}\"z\":0}}");
        let doc = Json::parse(text.as_bytes()).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc, Json::from_value(&value));
        assert_eq!(doc.as_object().unwrap().iter().count(), 8);
        assert_eq!(doc.get("k3").and_then(Json::as_u64), Some(997));
        for p in [
            "/a", "/b/0", "/b/2", "/b/01", "/b/+1", "/b/9", "/c/d", "/x", "a", "",
        ] {
            let ours = doc
                .pointer(p)
                .map(|j| serde_json::to_value(to_value(j)).unwrap());
            assert_eq!(ours.as_ref(), value.pointer(p), "pointer {p}");
        }
    }

    #[test]
    fn objects_of_every_size_keep_the_last_of_each_name() {
        // Around the size where repeated names stop being found pair by pair.
        for n in 0..=2 * SMALL_OBJECT + 1 {
            let unique: Vec<String> = (0..n).map(|i| format!(r#""m{i}":{i}"#)).collect();
            let mut repeated = unique.clone();
            if n > 0 {
                repeated.push(format!(r#""m{}":"again""#, n / 2));
            }
            for members in [unique, repeated] {
                let text = format!("{{{}}}", members.join(","));
                let doc = Json::parse(text.as_bytes()).unwrap();
                let value: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(to_value(&doc), value, "{text}");
                assert_eq!(doc.as_object().unwrap().iter().count(), n, "{text}");
            }
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_get_serde_json_s_error() {
        for bad in [
            &b"{\"a\":\"\xff\"}"[..],
            b"{\"\xc3\":1}",
            b"[1]\xff",
            b"\xef",
        ] {
            let ours = Json::parse(bad).unwrap_err().to_string();
            let theirs = serde_json::from_slice::<Value>(bad)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs);
        }
    }

    fn to_value(j: &Json<'_>) -> Value {
        match j {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.to_string()),
            Json::Array(items) => Value::Array(items.iter().map(to_value).collect()),
            Json::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.to_string(), to_value(v)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses_and_nesting_past_its_limit() {
        for bad in [
            &b"{"[..],
            b"[1,]",
            b"{\"a\" 1}",
            b"\"\x01\"",
            b"1 2",
            b"\"\xff\"",
        ] {
            assert!(
                Json::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = |n| "[".repeat(n) + &"]".repeat(n);
        assert!(Json::parse(deep(127).as_bytes()).is_ok());
        assert!(Json::parse(deep(128).as_bytes()).is_err());
        let err = Json::parse(deep(100_000).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }
}
