//! Asking a streaming request for its usage: `stream_options.include_usage = true` spliced
//! into the body, so that the last event of the stream reports the tokens the token rules
//! settle with ([`crate::RateLimitLayerBuilder::request_usage_in_streams`]).
//!
//! The body is otherwise forwarded byte for byte: the member is inserted (or a `false` or
//! `null` replaced) at its place in the bytes, found with serde_json (each value located as a
//! borrowed [`RawValue`]), so the members' order, whitespace, escapes and numbers stay as
//! the client wrote them.

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::document::{Json, Name};

/// Whether a request needs `stream_options.include_usage = true` added: a streaming chat or
/// legacy completions request (both accept `stream_options`: OpenAI, vLLM) that doesn't
/// already ask for usage.
pub(crate) fn wants_stream_usage(path: &str, doc: &Json<'_>) -> bool {
    path.ends_with("/completions")
        && matches!(doc.get("stream"), Some(Json::Bool(true)))
        && !matches!(
            doc.get("stream_options")
                .and_then(|o| o.get("include_usage")),
            Some(Json::Bool(true))
        )
        && doc
            .get("stream_options")
            .is_none_or(|o| matches!(o, Json::Object(_) | Json::Null))
}

/// `body` (a JSON object that [`wants_stream_usage`]) with `include_usage` set to `true`.
/// `None` to keep the original (a body that isn't such an object).
pub(crate) fn with_stream_usage(body: &[u8]) -> Option<Bytes> {
    let (options, members) = last_member(body, "stream_options")?;
    let Some(options) = options else {
        // No `stream_options`: a new first member.
        let open = position_of_open_brace(body, body)?;
        let comma = if members > 0 { "," } else { "" };
        let member = format!("\"stream_options\":{{\"include_usage\":true}}{comma}");
        return Some(splice(body, open + 1, 0, &member));
    };
    let text = options.get();
    if text == "null" {
        let at = offset_in(body, text)?;
        return Some(splice(body, at, text.len(), r#"{"include_usage":true}"#));
    }
    let (include, members) = last_member(text.as_bytes(), "include_usage")?;
    match include {
        // `false` or any other value the upstream wouldn't take as a yes.
        Some(value) => {
            let at = offset_in(body, value.get())?;
            Some(splice(body, at, value.get().len(), "true"))
        }
        None => {
            let open = position_of_open_brace(body, text.as_bytes())?;
            let comma = if members > 0 { "," } else { "" };
            let member = format!("\"include_usage\":true{comma}");
            Some(splice(body, open + 1, 0, &member))
        }
    }
}

/// The value of the last member named `name` of the JSON object `text` (as written; a
/// repeated name counts by its last value, as every JSON reader here does), and how many
/// members the object has. `None` if `text` is not a JSON object.
fn last_member<'a>(text: &'a [u8], name: &str) -> Option<(Option<&'a RawValue>, usize)> {
    struct Find<'n>(&'n str);

    impl<'de> Visitor<'de> for Find<'_> {
        type Value = (Option<&'de RawValue>, usize);

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut found, mut members) = (None, 0);
            while let Some(Name(key)) = map.next_key()? {
                let value: &'de RawValue = map.next_value()?;
                if key == self.0 {
                    found = Some(value);
                }
                members += 1;
            }
            Ok((found, members))
        }
    }

    let mut de = serde_json::Deserializer::from_slice(text);
    let found = (&mut de).deserialize_map(Find(name)).ok()?;
    de.end().ok()?;
    Some(found)
}

/// Where `part`, a slice of `body` (a value serde_json borrowed from it), starts in `body`.
fn offset_in(body: &[u8], part: &str) -> Option<usize> {
    let at = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    (body.get(at..at.checked_add(part.len())?)? == part.as_bytes()).then_some(at)
}

/// Where the `{` that opens the object `object` (a slice of `body`) is in `body`.
fn position_of_open_brace(body: &[u8], object: &[u8]) -> Option<usize> {
    let lead = object.iter().position(|b| !b.is_ascii_whitespace())?;
    let start = (object.as_ptr() as usize).checked_sub(body.as_ptr() as usize)? + lead;
    (body.get(start) == Some(&b'{')).then_some(start)
}

/// `body` with `remove` bytes at `at` replaced by `insert`.
fn splice(body: &[u8], at: usize, remove: usize, insert: &str) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + insert.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(insert.as_bytes());
    out.extend_from_slice(&body[at + remove..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_usage_is_requested_only_for_streaming_chat() {
        let wants = |path: &str, v: serde_json::Value| {
            let bytes = serde_json::to_vec(&v).unwrap();
            wants_stream_usage(path, &Json::parse(&bytes).unwrap())
        };
        let chat = serde_json::json!({"model": "m", "stream": true, "messages": []});
        assert!(wants("/v1/chat/completions", chat.clone()));
        let not_streaming = serde_json::json!({"model": "m", "messages": []});
        assert!(!wants("/v1/chat/completions", not_streaming));
        assert!(!wants("/v1/embeddings", chat.clone()));
        assert!(wants("/v1/completions", chat));
        let already =
            serde_json::json!({"stream": true, "stream_options": {"include_usage": true}});
        assert!(!wants("/v1/chat/completions", already));
        let other_options = serde_json::json!({"stream": true, "stream_options": {"x": 1}});
        assert!(wants("/v1/chat/completions", other_options));
        let null_options = serde_json::json!({"stream": true, "stream_options": null});
        assert!(wants("/v1/chat/completions", null_options));
        // Not an object: left alone.
        let odd = serde_json::json!({"stream": true, "stream_options": 3});
        assert!(!wants("/v1/chat/completions", odd));
    }

    /// The output is the input with the member inserted (or one value replaced) and every
    /// other byte kept: members unsorted, whitespace, escapes, number spellings, duplicates.
    #[test]
    fn usage_is_spliced_into_the_bytes_as_written() {
        let cases: [(&str, &str); 7] = [
            (
                " {\"stream\" : true,\n \"model\":\"m\\u00e9\", \"n\": 1.0, \"a\": []}\n",
                " {\"stream_options\":{\"include_usage\":true},\"stream\" : true,\n \"model\":\"m\\u00e9\", \"n\": 1.0, \"a\": []}\n",
            ),
            (
                r#"{"z":1,"stream_options":{ "x" : 1e2 },"stream":true}"#,
                r#"{"z":1,"stream_options":{"include_usage":true, "x" : 1e2 },"stream":true}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options": null ,"b":2}"#,
                r#"{"stream":true,"stream_options": {"include_usage":true} ,"b":2}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage": false,"y":[1]}}"#,
                r#"{"stream":true,"stream_options":{"include_usage": true,"y":[1]}}"#,
            ),
            // A repeated name: the last one is what readers use, so that is the one changed.
            (
                r#"{"stream_options":{"a":1},"stream":true,"stream_options":{"b":2}}"#,
                r#"{"stream_options":{"a":1},"stream":true,"stream_options":{"include_usage":true,"b":2}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":null}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#,
            ),
        ];
        for (input, expected) in cases {
            let out = with_stream_usage(input.as_bytes()).expect(input);
            assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
            let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(doc["stream_options"]["include_usage"], true, "{input}");
        }
        for not_an_object in ["[1]", "3", "{\"a\":", "{} x"] {
            assert_eq!(with_stream_usage(not_an_object.as_bytes()), None);
        }
    }
}
