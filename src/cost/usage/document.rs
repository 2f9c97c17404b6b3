//! What a JSON document (a JSON body, or an event's data) says its usage is, read with
//! serde_json: only the members that say it are deserialized, the rest are skipped with
//! `IgnoredAny` (checked as JSON, not built).

use std::fmt;
use std::sync::LazyLock;

use memchr::memmem;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Usage;

/// The usage of a JSON document: its non-null `usage`, else its `response`'s non-null
/// `usage`. `None` unless the whole document is UTF-8 and one valid JSON object (duplicate
/// names: the last one counts, as in a `serde_json::Value`).
pub(super) fn usage_in(doc: &[u8]) -> Option<Usage> {
    // Checked as a whole first: serde_json checks the strings it reads, not those it skips.
    let doc = std::str::from_utf8(doc).ok()?;
    serde_json::from_str::<Document>(doc).ok()?.usage()
}

/// The usage of the JSON object `text` starts with, as [`usage_in`] reads it: `None` unless
/// the object ends within `text` and is valid JSON. What follows the object is not read.
pub(super) fn usage_of_leading_object(text: &str) -> Option<Option<Usage>> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Document>();
    Some(values.next()?.ok()?.usage())
}

pub(super) const KEY: &[u8] = b"\"usage\"";

/// Built once, as memchr advises for a needle searched again and again.
static USAGE_KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(KEY));

/// Whether `hay` has a `"usage"` key whose value starts as an object: the only events worth
/// deserializing. (A key spelled with escapes, `"\u0075sage"`, is missed.)
pub(super) fn has_usage_object(hay: &[u8]) -> bool {
    let mut from = 0;
    while hay.len() - from >= KEY.len() {
        let Some(at) = USAGE_KEY.find(&hay[from..]) else {
            break;
        };
        let key_end = from + at + KEY.len();
        let value = hay[key_end..]
            .trim_ascii_start()
            .strip_prefix(b":")
            .map(<[u8]>::trim_ascii_start);
        from = match value {
            Some(value) if value.first() == Some(&b'{') => return true,
            // The next key starts at this value at the earliest (after the usual
            // `"usage":null}`, too few bytes are left to search again).
            Some(value) => hay.len() - value.len(),
            // No `:`: the key's closing quote may open the next one.
            None => key_end - 1,
        };
    }
    false
}

/// The members of a document that say its usage, the last of each name.
struct Document {
    usage: Reported,
    /// The `usage` of `response`.
    response: Reported,
}

impl Document {
    fn usage(&self) -> Option<Usage> {
        match self.usage {
            Reported::Null => self.response.usage(),
            usage => usage.usage(),
        }
    }
}

/// A `usage` value.
#[derive(Clone, Copy)]
pub(super) enum Reported {
    /// Absent or `null`.
    Null,
    /// An object: the count of each field read (the last member of that name).
    Counts([Count; Field::ALL.len()]),
    /// Anything else.
    Invalid,
}

impl Reported {
    /// The usage it says, if it is a valid one (see [`Usage`]).
    pub(super) fn usage(self) -> Option<Usage> {
        match self {
            Self::Counts(counts) => usage_from(counts),
            Self::Null | Self::Invalid => None,
        }
    }
}

/// The members of a `usage` object that are read.
#[derive(Clone, Copy)]
enum Field {
    Prompt,
    Input,
    Completion,
    Output,
    Total,
}

impl Field {
    const ALL: [Self; 5] = [
        Self::Prompt,
        Self::Input,
        Self::Completion,
        Self::Output,
        Self::Total,
    ];

    /// The field of this (decoded) member name, if it is one that is read.
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "prompt_tokens" => Self::Prompt,
            "input_tokens" => Self::Input,
            "completion_tokens" => Self::Completion,
            "output_tokens" => Self::Output,
            "total_tokens" => Self::Total,
            _ => return None,
        })
    }
}

/// What a member of a `usage` object says as a count.
#[derive(Clone, Copy)]
pub(super) enum Count {
    /// Missing, or `null`.
    Absent,
    Is(u64),
    /// Not a non-negative integer.
    Invalid,
}

/// The usage of a `usage` object whose fields say `counts`, if it is a valid one (see
/// [`Usage`]).
fn usage_from(counts: [Count; Field::ALL.len()]) -> Option<Usage> {
    // The count of the first of `fields` present and non-null: `Some(None)` if none is,
    // `None` if it isn't a non-negative integer.
    let first = |fields: &[Field]| -> Option<Option<u64>> {
        for &field in fields {
            match counts[field as usize] {
                Count::Absent => {}
                Count::Is(n) => return Some(Some(n)),
                Count::Invalid => return None,
            }
        }
        Some(None)
    };
    let input = first(&[Field::Prompt, Field::Input])?;
    let output = first(&[Field::Completion, Field::Output])?;
    let total = first(&[Field::Total])?;
    if input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total.unwrap_or(input.saturating_add(output)),
    })
}

// ---------------------------------------------------------------------------------------
// The deserializers. Each reads every kind of JSON value (a value of an unexpected kind says
// nothing, it isn't an error), except the document itself, which must be an object.

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Document;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
                let mut doc = Document {
                    usage: Reported::Null,
                    response: Reported::Null,
                };
                while let Some(name) = map.next_key::<TopName>()? {
                    match name {
                        TopName::Usage => doc.usage = map.next_value()?,
                        TopName::Response => doc.response = map.next_value::<Response>()?.0,
                        TopName::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(doc)
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// A top-level member name, as written: serde_json hands over a name without escapes as
/// it is in the document, and one with escapes decoded (`visit_str`), which is no name read.
enum TopName {
    Usage,
    Response,
    Other,
}

impl<'de> Deserialize<'de> for TopName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = TopName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<TopName, E> {
                Ok(match name {
                    "usage" => TopName::Usage,
                    "response" => TopName::Response,
                    _ => TopName::Other,
                })
            }
            fn visit_str<E>(self, _: &str) -> Result<TopName, E> {
                Ok(TopName::Other)
            }
        }
        deserializer.deserialize_identifier(Name)
    }
}

/// The `usage` of a `response` value: [`Reported::Null`] unless it is an object with one.
struct Response(Reported);

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Response;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Response, A::Error> {
                let mut usage = Reported::Null;
                while let Some(name) = map.next_key::<InnerName>()? {
                    match name {
                        InnerName::Usage => usage = map.next_value()?,
                        InnerName::Field(_) | InnerName::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Response(usage))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Response, A::Error> {
                skip(seq).map(|()| Response(Reported::Null))
            }
            fn visit_unit<E>(self) -> Result<Response, E> {
                Ok(Response(Reported::Null))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Response, E> {
                Ok(Response(Reported::Null))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Response, E> {
                Ok(Response(Reported::Null))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Response, E> {
                Ok(Response(Reported::Null))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Response, E> {
                Ok(Response(Reported::Null))
            }
            fn visit_str<E>(self, _: &str) -> Result<Response, E> {
                Ok(Response(Reported::Null))
            }
        }
        deserializer.deserialize_any(Members)
    }
}

impl<'de> Deserialize<'de> for Reported {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Reported;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Reported, A::Error> {
                let mut counts = [Count::Absent; Field::ALL.len()];
                while let Some(name) = map.next_key::<InnerName>()? {
                    match name {
                        InnerName::Field(field) => counts[field as usize] = map.next_value()?,
                        InnerName::Usage | InnerName::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Reported::Counts(counts))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Reported, A::Error> {
                skip(seq).map(|()| Reported::Invalid)
            }
            fn visit_unit<E>(self) -> Result<Reported, E> {
                Ok(Reported::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Reported, E> {
                Ok(Reported::Invalid)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Reported, E> {
                Ok(Reported::Invalid)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Reported, E> {
                Ok(Reported::Invalid)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Reported, E> {
                Ok(Reported::Invalid)
            }
            fn visit_str<E>(self, _: &str) -> Result<Reported, E> {
                Ok(Reported::Invalid)
            }
        }
        deserializer.deserialize_any(Members)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Number;
        impl<'de> Visitor<'de> for Number {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count::Absent)
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count::Is(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(u64::try_from(n).map_or(Count::Invalid, Count::Is))
            }
            fn visit_f64<E>(self, f: f64) -> Result<Count, E> {
                // `12.0` is a count too; `-1.0`, `1.5` and `1e30` are not. (`u64::MAX as f64`
                // rounds up to 2^64, the first value out of range.)
                Ok(
                    if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 {
                        Count::Is(f as u64)
                    } else {
                        Count::Invalid
                    },
                )
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count::Invalid)
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count::Invalid)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                skip(seq).map(|()| Count::Invalid)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count::Invalid)
            }
        }
        deserializer.deserialize_any(Number)
    }
}

/// A member name inside `response` or `usage`, decoded.
enum InnerName {
    Usage,
    Field(Field),
    Other,
}

impl<'de> Deserialize<'de> for InnerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = InnerName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E>(self, name: &str) -> Result<InnerName, E> {
                Ok(match name {
                    "usage" => InnerName::Usage,
                    _ => Field::of(name).map_or(InnerName::Other, InnerName::Field),
                })
            }
        }
        deserializer.deserialize_identifier(Name)
    }
}

/// Skips the rest of an array.
fn skip<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}
