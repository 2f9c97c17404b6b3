use super::document::{has_usage_object, usage_in, Reported, KEY};
use super::*;
use proptest::prelude::*;
use serde::de::IgnoredAny;
use serde_json::Value;

const MAX: usize = DEFAULT_MAX_BUFFER_BYTES;

fn usage(input: u64, output: u64, total: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total,
    }
}

/// Feeds `body` in the given chunks; returns `(finish, is_done)`.
fn run<'a>(
    framing: Framing,
    max: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Option<Usage>, bool) {
    let mut p = UsageParser::new(framing, max);
    for chunk in chunks {
        p.feed(chunk);
    }
    let done = p.is_done();
    let result = p.finish();
    assert_eq!(p.finish(), result, "finish is idempotent");
    (result, done)
}

fn whole(framing: Framing, body: &[u8]) -> Option<Usage> {
    run(framing, MAX, [body]).0
}

/// Asserts that every split in two, and byte-by-byte feeding, give `expected`.
fn assert_every_split(framing: Framing, max: usize, body: &[u8], expected: Option<Usage>) {
    let (whole, whole_done) = run(framing, max, [body]);
    assert_eq!(whole, expected, "whole body");
    for split in 0..=body.len() {
        let (a, b) = body.split_at(split);
        assert_eq!(
            run(framing, max, [a, b]),
            (whole, whole_done),
            "split at {split}"
        );
    }
    assert_eq!(
        run(framing, max, body.chunks(1)),
        (whole, whole_done),
        "byte by byte"
    );
}

const CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29}}\n\n",
    "data: [DONE]\n\n",
);

// ----- content type

#[test]
fn framing_from_content_type() {
    use http::HeaderValue;
    let cases: &[(&str, Option<Framing>)] = &[
        ("text/event-stream", Some(Framing::Sse)),
        ("Text/Event-Stream; charset=utf-8", Some(Framing::Sse)),
        ("  text/event-stream  ", Some(Framing::Sse)),
        ("application/json", Some(Framing::Json)),
        ("application/json;charset=UTF-8", Some(Framing::Json)),
        ("APPLICATION/JSON", Some(Framing::Json)),
        ("application/problem+json", Some(Framing::Json)),
        ("application/vnd.api+JSON; q=1", Some(Framing::Json)),
        ("text/plain", None),
        ("application/x-ndjson", None),
        ("application/jsonl", None),
        ("+json", None),
        ("application/+json", None),
        ("", None),
        ("json", None),
    ];
    for (ct, expected) in cases {
        assert_eq!(Framing::from_content_type(ct), *expected, "{ct:?}");
        assert_eq!(
            Framing::from_content_type(HeaderValue::from_str(ct).unwrap()),
            *expected,
            "{ct:?} as a header"
        );
    }
    assert_eq!(Framing::from_content_type(b"\xFF/\xFE"), None);
}

// ----- JSON

#[test]
fn json_chat_completion() {
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi { \" } ]"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(12, 5, 17)));
    let (_, done) = run(Framing::Json, MAX, [&body[..]]);
    assert!(done);
}

#[test]
fn json_embeddings_have_no_completion_tokens() {
    let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    assert_eq!(whole(Framing::Json, body), Some(usage(8, 0, 8)));
}

#[test]
fn json_responses_api() {
    let body = br#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"usage"}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(36, 87, 123)));
}

#[test]
fn json_response_usage_nested() {
    let body = br#"{"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":3,"output_tokens":4}}}"#;
    assert_eq!(whole(Framing::Json, body), Some(usage(3, 4, 7)));
}

#[test]
fn json_total_defaults_to_sum_and_nulls_are_absent() {
    let body = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
    assert_eq!(whole(Framing::Json, body), Some(usage(2, 3, 5)));
    let body = br#"{"usage":{"prompt_tokens":2,"completion_tokens":null,"total_tokens":null}}"#;
    assert_eq!(whole(Framing::Json, body), Some(usage(2, 0, 2)));
    let body = br#"{"usage":{"prompt_tokens":2.0,"completion_tokens":3,"total_tokens":5}}"#;
    assert_eq!(whole(Framing::Json, body), Some(usage(2, 3, 5)));
    let body = br#"{"usage":{"prompt_tokens":18446744073709551615}}"#;
    assert_eq!(
        whole(Framing::Json, body),
        Some(usage(u64::MAX, 0, u64::MAX))
    );
    let body = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#;
    assert_eq!(
        whole(Framing::Json, body),
        Some(usage(u64::MAX, 1, u64::MAX))
    );
}

#[test]
fn json_invalid_usage_is_none() {
    for body in [
        &br#"{"usage":{"prompt_tokens":-1,"completion_tokens":3}}"#[..],
        br#"{"usage":{"prompt_tokens":"12","completion_tokens":3}}"#,
        br#"{"usage":{"prompt_tokens":1.5}}"#,
        br#"{"usage":{"prompt_tokens":1e30}}"#,
        br#"{"usage":{"prompt_tokens":1,"total_tokens":true}}"#,
        br#"{"usage":{}}"#,
        br#"{"usage":{"cached":3}}"#,
        br#"{"usage":"lots"}"#,
        br#"{"usage":[1,2]}"#,
        br#"{"usage":null}"#,
        br#"{"usage":null,"response":{"usage":null}}"#,
        br#"{"choices":[]}"#,
        br#"{"message":"the \"usage\": {\"prompt_tokens\":1} is in a string"}"#,
        br#"[{"usage":{"prompt_tokens":1}}]"#,
        br#"{"usage":{"prompt_tokens":1}"#, // unterminated
        br#"{"usage":{"prompt_tokens":1}}}"#.split_at(5).0,
        b"",
        b"   ",
        b"not json",
        b"{\"usage\":{\"prompt_tokens\":\"\xFF\"}}", // invalid UTF-8
    ] {
        assert_eq!(
            whole(Framing::Json, body),
            None,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn json_body_must_be_valid_json_as_a_whole() {
    // Brackets balanced, `usage` fine, but the object is not JSON (or not UTF-8) elsewhere:
    // a broken body is no report.
    for body in [
        &br#"{"x":tru,"usage":{"prompt_tokens":1}}"#[..],
        br#"{"usage":{"prompt_tokens":1},"x":[1,]}"#,
        br#"{"usage":{"prompt_tokens":1},"x":{"a" "b"}}"#,
        b"{\"x\":\"\xFF\",\"usage\":{\"prompt_tokens\":1}}",
    ] {
        assert_every_split(Framing::Json, MAX, body, None);
        assert!(
            run(Framing::Json, MAX, [body]).1,
            "done at the closing brace"
        );
    }
}

#[test]
fn json_leading_whitespace_bom_and_trailing_bytes() {
    let body = b"\xEF\xBB\xBF \r\n{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n";
    assert_every_split(Framing::Json, MAX, body, Some(usage(1, 2, 3)));
    // Bytes after the object are not looked at.
    let body = br#"{"usage":{"prompt_tokens":1}} garbage {"usage":{"prompt_tokens":9}}"#;
    assert_eq!(whole(Framing::Json, body), Some(usage(1, 0, 1)));
    // Nor are bytes that aren't UTF-8, however split.
    let body = b"{\"usage\":{\"prompt_tokens\":1}}\xFF\xFE{";
    assert_every_split(Framing::Json, MAX, body, Some(usage(1, 0, 1)));
}

#[test]
fn json_invalid_first_chunk_is_done_when_its_brackets_close() {
    // Not JSON from its 7th byte, but its last bracket comes in the third chunk.
    let mut p = UsageParser::new(Framing::Json, MAX);
    p.feed(br#"{"a":[}"#);
    assert!(!p.is_done());
    p.feed(b" x ");
    assert!(!p.is_done());
    p.feed(b"] {}");
    assert!(p.is_done());
    assert_eq!(p.finish(), None);
}

#[test]
fn json_only_top_level_members_count() {
    // Nested `usage` members and strings that look like names are not the usage.
    for body in [
        &br#"{"metadata":{"usage":{"prompt_tokens":5}}}"#[..],
        br#"{"stop":["usage",{"usage":{"prompt_tokens":5}}]}"#,
        br#"{"usage"  :  null , "response": [{"usage":{"prompt_tokens":5}}]}"#,
        br#"{"us\u0061ge":{"prompt_tokens":5}}"#,
    ] {
        assert_eq!(
            whole(Framing::Json, body),
            None,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // The last of duplicate members counts, as in a `serde_json::Value`.
    let body = br#"{"usage":{"prompt_tokens":1},"x":[1,{"a":"}"}],"usage" : {"prompt_tokens":2}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(2, 0, 2)));
    let body =
        br#"{"stop":["usage"],"response":{"id":"r","usage":{"input_tokens":4,"output_tokens":1}}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(4, 1, 5)));
    // Escapes inside strings don't end them.
    let body = br#"{"content":"a \"usage\": {\\\"x","usage":{"total_tokens":7}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(0, 0, 7)));
}

#[test]
fn json_oversize_is_none() {
    let body = br#"{"padding":"0123456789","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
    // Exactly the bound is fine; one byte less gives up.
    assert_every_split(Framing::Json, body.len(), body, Some(usage(1, 2, 3)));
    assert_every_split(Framing::Json, body.len() - 1, body, None);
    let mut p = UsageParser::new(Framing::Json, 16);
    p.feed(&body[..10]);
    assert!(!p.is_done());
    p.feed(&body[10..20]);
    assert!(p.is_done(), "gave up: nothing more to read");
    p.feed(&body[20..]);
    assert_eq!(p.finish(), None);
}

#[test]
fn json_is_done_at_closing_brace() {
    let mut p = UsageParser::new(Framing::Json, MAX);
    p.feed(br#"{"usage":{"prompt_tokens":4,"completion_tokens":1}"#);
    assert!(!p.is_done());
    p.feed(b"}");
    assert!(p.is_done());
    assert_eq!(p.finish(), Some(usage(4, 1, 5)));
}

#[test]
fn json_nested_values_split_anywhere() {
    // Brackets, quotes and backslashes inside nested strings; escapes at every split point;
    // nested values of every kind before and after the usage.
    let body = br#"{"a":[{"s":"x]}\"\\","t":["[",{"u":"{"}]}],"b":{"c":"\\","d":[[],{}],"usage":{"prompt_tokens":9}},"usage":{"prompt_tokens":1,"completion_tokens":2,"details":{"x":"}\""}},"e":["\"usage\":{"]}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(1, 2, 3)));
    // A member name split anywhere, with an escape.
    let body =
        br#"{"us\u0061ge":{"prompt_tokens":5},"x\"":1,"response":{"usage":{"input_tokens":2}}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(2, 0, 2)));
    // Long names and strings (past the in-register search).
    let body = br#"{"a_rather_long_member_name_indeed":"and a rather long string value, with a \" and a \\ in it","usage":{"completion_tokens":4,"a_long_name_that_is_not_a_count":"0123456789abcdef0123456789"}}"#;
    assert_every_split(Framing::Json, MAX, body, Some(usage(0, 4, 4)));
}

#[test]
fn json_usage_duplicates_nulls_and_response() {
    let cases: &[(&[u8], Option<Usage>)] = &[
        // Duplicate members inside `usage`: the last counts, `null` included.
        (
            br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            Some(usage(2, 0, 2)),
        ),
        (
            br#"{"usage":{"prompt_tokens":1,"prompt_tokens":null,"input_tokens":3}}"#,
            Some(usage(3, 0, 3)),
        ),
        (
            br#"{"usage":{"prompt_tokens":"x","prompt_tokens":4}}"#,
            Some(usage(4, 0, 4)),
        ),
        (
            br#"{"usage":{"prompt_tokens":4,"prompt_tokens":"x"}}"#,
            None,
        ),
        (
            br#"{"usage":{"prompt_tokens":null,"completion_tokens":null}}"#,
            None,
        ),
        // Names with escapes are decoded inside `usage`.
        (
            br#"{"usage":{"prompt\u005ftokens":6}}"#,
            Some(usage(6, 0, 6)),
        ),
        // Whitespace everywhere, and numbers the plain reader leaves to the parser.
        (
            b"{\"usage\" \n: \t{ \"prompt_tokens\" : 7 ,\r\n\"total_tokens\":8 } \n}",
            Some(usage(7, 0, 8)),
        ),
        (
            br#"{"usage":{"prompt_tokens":7.0,"completion_tokens":0}}"#,
            Some(usage(7, 0, 7)),
        ),
        (br#"{"usage":{"prompt_tokens":07}}"#, None),
        (
            br#"{"usage":{"prompt_tokens":1e2}}"#,
            Some(usage(100, 0, 100)),
        ),
        (
            br#"{"usage":{"prompt_tokens":12345678901234567890}}"#,
            Some(usage(12345678901234567890, 0, 12345678901234567890)),
        ),
        (
            br#"{"usage":{"prompt_tokens":123456789012345678901}}"#,
            None,
        ),
        (br#"{"usage":{"prompt_tokens":nul}}"#, None),
        (br#"{"usage":{"prompt_tokens":1,}}"#, None),
        (br#"{"usage":{"prompt_tokens":1} x}"#, None),
        (
            b"{\"usage\":{\"pr\xC3\xA9\":1,\"prompt_tokens\":1}}",
            Some(usage(1, 0, 1)),
        ),
        (b"{\"usage\":{\"pr\xFF\":1,\"prompt_tokens\":1}}", None),
        (b"{\"usage\":{\"p\x01\":1,\"prompt_tokens\":1}}", None),
        // `usage: null` falls back to `response.usage`; a broken `usage` doesn't.
        (
            br#"{"usage":null,"response":{"usage":{"input_tokens":1},"usage":{"input_tokens":2}}}"#,
            Some(usage(2, 0, 2)),
        ),
        (
            br#"{"usage":{"input_tokens":1},"response":{"usage":{"input_tokens":2}}}"#,
            Some(usage(1, 0, 1)),
        ),
        (
            br#"{"usage":nul,"response":{"usage":{"input_tokens":2}}}"#,
            None,
        ),
        (
            br#"{"usage":{},"response":{"usage":{"input_tokens":2}}}"#,
            None,
        ),
        (
            br#"{"response":{"usage":{"input_tokens":2}},"response":{"id":1}}"#,
            None,
        ),
        // Top-level duplicates: the last counts.
        (
            br#"{"usage":{"input_tokens":1},"usage":null,"response":{"usage":{"input_tokens":3}}}"#,
            Some(usage(3, 0, 3)),
        ),
    ];
    for &(body, expected) in cases {
        assert_every_split(Framing::Json, MAX, body, expected);
        assert_eq!(
            json_reference(body, MAX),
            (expected, true),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn plain_usage_objects_match_the_parser() {
    for text in [
        &br#"{"prompt_tokens":412,"completion_tokens":9,"total_tokens":421}"#[..],
        br#" { } "#,
        br#"{"a":null,"b":0,"c":9999999999999999999}"#,
        br#"{"a":00}"#,
        br#"{"a":0.5}"#,
        br#"{"a":1E1}"#,
        br#"{"a":-1}"#,
        br#"{"a":1"#,
        br#"{"a":1}}"#,
        br#"{"a" 1}"#,
        br#"{"a":1 "b":2}"#,
        br#"{"a":nulll}"#,
        b"{\"\x7F\":1}",
        b"{\"\t\":1}",
        br#"null"#,
        br#"[]"#,
        br#""#,
    ] {
        assert_eq!(
            usage_value(text),
            usage_value_reference(text),
            "{}",
            String::from_utf8_lossy(text)
        );
    }
}

// ----- SSE

#[test]
fn sse_usage_in_final_chunk_every_split() {
    assert_every_split(
        Framing::Sse,
        MAX,
        CHAT_STREAM.as_bytes(),
        Some(usage(19, 10, 29)),
    );
    assert!(run(Framing::Sse, MAX, [CHAT_STREAM.as_bytes()]).1);
}

#[test]
fn sse_null_usage_chunks_only_is_none() {
    let body = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\": null}\n\n",
        "data: [DONE]\n\n",
    );
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), None);
}

#[test]
fn sse_without_usage_is_none() {
    let body = "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\ndata: [DONE]\n\n";
    assert_eq!(run(Framing::Sse, MAX, [body.as_bytes()]), (None, true));
    assert_eq!(run(Framing::Sse, MAX, [&b""[..]]), (None, false));
}

#[test]
fn sse_last_usage_wins() {
    let body = concat!(
        "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n",
        "data: {\"usage\":null}\n\n",
        "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6,\"total_tokens\":11}}\n\n",
        "data: {\"usage\":{\"prompt_tokens\":-5}}\n\n", // invalid: ignored
        "data: {\"usage\":null}\n\n",
    );
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(5, 6, 11)));
    assert!(!run(Framing::Sse, MAX, [body.as_bytes()]).1, "no [DONE]");
}

#[test]
fn sse_responses_api_events() {
    let body = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":37,\"output_tokens\":11,\"total_tokens\":48}}}\n\n",
    );
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(37, 11, 48)));
}

#[test]
fn sse_crlf_and_cr_line_endings() {
    for eol in ["\r\n", "\r"] {
        let body = CHAT_STREAM.replace('\n', eol);
        assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(19, 10, 29)));
        assert!(run(Framing::Sse, MAX, [body.as_bytes()]).1, "{eol:?}");
    }
    // Mixed within one stream.
    let body =
        "data: {\"usage\":null}\r\n\rdata: {\"usage\":{\"prompt_tokens\":2}}\n\r\ndata: [DONE]\r\r";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(2, 0, 2)));
    assert!(run(Framing::Sse, MAX, [body.as_bytes()]).1);
}

#[test]
fn sse_cr_then_lf_is_one_line_end_not_a_blank_line() {
    // `\r\n` ends one line; were it two, the first data line would be dispatched alone.
    let body = "data: {\"usage\":\r\ndata: {\"prompt_tokens\":3}}\r\n\r\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(3, 0, 3)));
}

#[test]
fn sse_multi_line_data_is_joined_with_newlines() {
    let body = concat!(
        "data: {\"id\":\"x\",\n",
        "data:\"usage\":\n",
        "data:   {\"prompt_tokens\":7,\n",
        "data: \"completion_tokens\":8}}\n",
        "\n",
    );
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(7, 8, 15)));
    // Data lines joined with `\n` inside a string make invalid JSON: no usage.
    let body = "data: {\"a\":\"x\ndata: y\",\"usage\":{\"prompt_tokens\":1}}\n\n";
    assert_eq!(whole(Framing::Sse, body.as_bytes()), None);
}

#[test]
fn sse_done_split_over_lines_and_with_spaces() {
    // `data:` without a space, and `[DONE]` after it.
    assert_eq!(
        run(Framing::Sse, MAX, [&b"data:[DONE]\n\n"[..]]),
        (None, true)
    );
    // Two spaces: the second is part of the value; still recognised.
    assert_eq!(
        run(Framing::Sse, MAX, [&b"data:  [DONE]\n\n"[..]]),
        (None, true)
    );
    // Not dispatched yet: not done.
    assert_eq!(
        run(Framing::Sse, MAX, [&b"data: [DONE]\n"[..]]),
        (None, false)
    );
    assert_eq!(
        run(Framing::Sse, MAX, [&b"data: [DONE]"[..]]),
        (None, false)
    );
    // Not exactly [DONE].
    assert_eq!(
        run(Framing::Sse, MAX, [&b"data: [DONE] now\n\n"[..]]),
        (None, false)
    );
}

#[test]
fn sse_nothing_after_done_counts() {
    let body = "data: {\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(1, 0, 1)));
    let mut p = UsageParser::new(Framing::Sse, MAX);
    p.feed(b"data: [DONE]\n\n");
    assert!(p.is_done());
    p.feed(b"data: {\"usage\":{\"prompt_tokens\":2}}\n\n");
    assert_eq!(p.finish(), None);
}

#[test]
fn sse_comments_and_other_fields_are_ignored() {
    let body = concat!(
        ": this is a comment with \"usage\": {\"prompt_tokens\":100}\n",
        ":\n",
        "event: message\n",
        "id: 42\n",
        "retry: 1000\n",
        "dat: {\"usage\":{\"prompt_tokens\":100}}\n",
        "datas: {\"usage\":{\"prompt_tokens\":100}}\n",
        "Data: {\"usage\":{\"prompt_tokens\":100}}\n",
        "data: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n",
        ": trailing comment\n",
        "\n",
        ": keep-alive\n\n",
        "event: ping\n\n",
    );
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 2, 6)));
}

#[test]
fn sse_data_field_without_colon_is_an_empty_line_of_data() {
    // `data` alone adds an empty line: `{...}\n` still parses.
    let body = "data: {\"usage\":{\"prompt_tokens\":4}}\ndata\n\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
}

#[test]
fn sse_incomplete_final_event_is_discarded() {
    let body = "data: {\"usage\":{\"prompt_tokens\":4}}\n";
    assert_eq!(whole(Framing::Sse, body.as_bytes()), None);
    let body = "data: {\"usage\":{\"prompt_tokens\":4}}";
    assert_eq!(whole(Framing::Sse, body.as_bytes()), None);
}

#[test]
fn sse_leading_bom_is_stripped_once() {
    let body = "\u{feff}data: {\"usage\":{\"prompt_tokens\":4}}\n\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
    // A second BOM makes the first field name `\u{feff}data`: not data.
    let body = "\u{feff}\u{feff}data: {\"usage\":{\"prompt_tokens\":4}}\n\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), None);
    // A partial BOM is ordinary bytes (here it spoils the field name).
    let body = b"\xEF\xBBdata: {\"usage\":{\"prompt_tokens\":4}}\n\n";
    assert_every_split(Framing::Sse, MAX, body, None);
    let body = b"\xEF\n\ndata: {\"usage\":{\"prompt_tokens\":4}}\n\n";
    assert_every_split(Framing::Sse, MAX, body, Some(usage(4, 0, 4)));
}

#[test]
fn sse_oversize_event_is_skipped_and_the_stream_goes_on() {
    let big = format!(
        "data: {{\"usage\":{{\"prompt_tokens\":999}},\"pad\":\"{}\"}}\n\n",
        "x".repeat(200)
    );
    let small = "data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n";
    let max = 100;
    assert!(small.len() < max);
    // The big event after the small one doesn't replace it...
    let body = format!("{small}{big}data: [DONE]\n\n");
    assert_every_split(Framing::Sse, max, body.as_bytes(), Some(usage(5, 1, 6)));
    assert!(run(Framing::Sse, max, [body.as_bytes()]).1);
    // ...and doesn't stop a later one being read.
    let body = format!("{big}{small}data: [DONE]\n\n");
    assert_every_split(Framing::Sse, max, body.as_bytes(), Some(usage(5, 1, 6)));
    // With room enough, the big one is read.
    let body = format!("{small}{big}");
    assert_eq!(
        run(Framing::Sse, MAX, [body.as_bytes()]).0,
        Some(usage(999, 0, 999))
    );
}

#[test]
fn sse_oversize_multi_line_event_is_dropped_whole() {
    // Each line fits, the event doesn't: its first line must not be parsed alone.
    let body = "data: {\"usage\":{\"prompt_tokens\":1}}\ndata: \"0123456789012345678901234567890123456789\"\n\n";
    assert_every_split(Framing::Sse, 60, body.as_bytes(), None);
    assert_eq!(
        whole(Framing::Sse, body.as_bytes()),
        None,
        "invalid JSON anyway"
    );
}

#[test]
fn sse_huge_comment_is_not_buffered() {
    let mut p = UsageParser::new(Framing::Sse, 64);
    p.feed(b": ");
    for _ in 0..1000 {
        p.feed(&[b'x'; 1000]);
    }
    p.feed(b"\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n");
    assert_eq!(p.finish(), Some(usage(2, 0, 2)));
}

#[test]
fn never_buffers_more_than_the_bound() {
    for framing in [Framing::Json, Framing::Sse] {
        let mut p = UsageParser::new(framing, 1000);
        p.feed(b"data: {\"x\":\"");
        for _ in 0..100 {
            p.feed(&[b'y'; 97]);
            let held = match &p.state {
                State::Json(s) => s.held(),
                State::Sse(s) => s.held(),
            };
            assert!(held <= 1000, "{framing:?}: {held}");
        }
    }
}

#[test]
fn debug_does_not_dump_the_buffer() {
    let mut p = UsageParser::new(Framing::Json, MAX);
    p.feed(b"{\"secret\":\"hunter2\"");
    let debug = format!("{p:?}");
    assert!(debug.contains("UsageParser"));
    assert!(!debug.contains("hunter2"));
}

#[test]
fn substring_search() {
    assert!(has_usage_object(b"{\"usage\" :\n {}"));
    assert!(has_usage_object(b"\"usage\":null,\"usage\":{"));
    assert!(!has_usage_object(b"{\"usage\":null}"));
    assert!(!has_usage_object(b"{\"usage\":"));
    assert!(!has_usage_object(b"\"usage\""));
    assert!(!has_usage_object(b"\"usages\":{"));
}

#[test]
fn sse_one_line_events_with_every_line_end() {
    // The whole-event path: each line end, the blank line's `\r` at the chunk's end, an
    // event over the bound, `[DONE]` with spaces, and a stream going on after each.
    let usage_event = "data: {\"usage\":{\"prompt_tokens\":3}}";
    for eol in ["\n", "\r\n", "\r"] {
        for blank in ["\n", "\r\n", "\r"] {
            if eol == "\r" && blank == "\n" {
                continue; // one `\r\n`, not a blank line
            }
            let body = format!(
                "data: {{\"usage\":null}}{eol}{blank}{usage_event}{eol}{blank}data: {{\"x\":1}}{eol}{blank}"
            );
            assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(3, 0, 3)));
            let body = format!("{usage_event}{eol}{blank}data:  [DONE] {eol}{blank}");
            assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(3, 0, 3)));
            assert!(run(Framing::Sse, MAX, [body.as_bytes()]).1);
            // Over the bound (the data and its newline): dropped, and the next is read.
            let max = usage_event.len() - "data: ".len() + 1;
            let big = "data: {\"usage\":{\"prompt_tokens\":30}}";
            let body = format!("{big}{eol}{blank}{usage_event}{eol}{blank}");
            assert_every_split(Framing::Sse, max, body.as_bytes(), Some(usage(3, 0, 3)));
            assert_every_split(Framing::Sse, max - 1, body.as_bytes(), None);
        }
    }
    // One chunk, many events; a `\n` of a `\r\n` left for the next chunk.
    let mut p = UsageParser::new(Framing::Sse, MAX);
    p.feed(b"data: {\"usage\":null}\n\ndata: {\"usage\":{\"prompt_tokens\":1}}\r\n\r");
    p.feed(b"\ndata: {\"usage\":null}\n\n: c\n\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n");
    assert_eq!(p.finish(), Some(usage(2, 0, 2)));
    // A line over the bound drops its event, even when the next line starts a chunk.
    let mut p = UsageParser::new(Framing::Sse, 40);
    p.feed(b"data: 0123456789012345678901234567890123456789\n");
    p.feed(b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n");
    assert_eq!(p.finish(), None);
    // A data line then another line (not blank): not a one-line event.
    let body = "data: {\"usage\":\ndata: {\"prompt_tokens\":4}}\n\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
    let body = "data: {\"usage\":{\"prompt_tokens\":4}}\nevent: x\n\n";
    assert_every_split(Framing::Sse, MAX, body.as_bytes(), Some(usage(4, 0, 4)));
}

// ----- properties

/// The SSE rules written plainly, line by line, for the parser to be checked against.
fn sse_reference(body: &[u8], max: usize) -> (Option<Usage>, bool) {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\n' => {}
            b'\r' if body.get(i + 1) == Some(&b'\n') => {
                lines.push(&body[start..i]);
                i += 2;
                start = i;
                continue;
            }
            b'\r' => {}
            _ => {
                i += 1;
                continue;
            }
        }
        lines.push(&body[start..i]);
        i += 1;
        start = i;
    }
    // (An unterminated last line, or a `\r` waiting for its `\n`, ends nothing.)
    let (mut found, mut data) = (None, Vec::new());
    for line in lines {
        if line.is_empty() {
            if !data.is_empty() && data.len() <= max {
                data.pop();
                if data.trim_ascii() == b"[DONE]" {
                    return (found, true);
                }
                found = usage_in(&data).or(found);
            }
            data.clear();
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if name == b"data" {
            data.extend_from_slice(value);
            data.push(b'\n');
        }
    }
    (found, false)
}

/// The JSON framing's rules written plainly, byte by byte over the whole body, with the
/// `usage` value read through a built object.
fn json_reference(body: &[u8], max: usize) -> (Option<Usage>, bool) {
    let Some(start) = body
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0xEF | 0xBB | 0xBF))
    else {
        return (None, false);
    };
    if body[start] != b'{' {
        return (None, true);
    }
    let body = &body[start..];
    let (mut depth, mut in_string, mut escaped, mut expect_key) = (0usize, false, false, false);
    let mut name_start = None;
    let mut member: Option<(&[u8], usize)> = None;
    let (mut usage, mut response) = (None, None);
    let mut end = None;
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
                if let Some(from) = name_start.take() {
                    member = Some((&body[from..i], i + 1));
                }
            }
            continue;
        }
        let mut end_member = |at: usize| match member.take() {
            Some((b"usage", from)) => usage = Some((from, at)),
            Some((b"response", from)) => response = Some((from, at)),
            _ => {}
        };
        match b {
            b'"' => {
                in_string = true;
                if depth == 1 && expect_key {
                    expect_key = false;
                    name_start = Some(i + 1);
                }
            }
            b'{' | b'[' => {
                depth += 1;
                expect_key |= depth == 1;
            }
            b'}' | b']' => {
                if depth == 1 {
                    end_member(i);
                }
                depth -= 1;
                if depth == 0 {
                    end = Some(i + 1);
                    break;
                }
            }
            b',' if depth == 1 => {
                end_member(i);
                expect_key = true;
            }
            _ => {}
        }
    }
    let Some(end) = end else {
        return (None, body.len() > max);
    };
    if end > max {
        return (None, true);
    }
    // The object must be UTF-8 and valid JSON as a whole.
    let valid = std::str::from_utf8(&body[..end])
        .is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok());
    if !valid {
        return (None, true);
    }
    let value = |(from, to): (usize, usize)| {
        let v = body[from..to].trim_ascii_start();
        serde_json::from_slice::<Value>(v.strip_prefix(b":").unwrap_or(v)).ok()
    };
    let found = (|| {
        if let Some(span) = usage {
            match value(span)? {
                Value::Null => {}
                usage => return usage_of(&usage),
            }
        }
        match value(response?)?.get("usage") {
            None | Some(Value::Null) => None,
            Some(usage) => usage_of(usage),
        }
    })();
    (found, true)
}

/// What the parser makes of a `usage` value written in `text` (whitespace around it
/// allowed), checked as UTF-8 first as [`usage_in`] does: `None` if it is `null`; else the
/// usage it says if it is valid JSON and a valid usage.
fn usage_value(text: &[u8]) -> Option<Option<Usage>> {
    let Ok(text) = std::str::from_utf8(text) else {
        return Some(None);
    };
    match serde_json::from_str::<Reported>(text) {
        Ok(Reported::Null) => None,
        Ok(reported) => Some(reported.usage()),
        Err(_) => Some(None),
    }
}

/// [`usage_value`] through a built `serde_json::Value`.
fn usage_value_reference(text: &[u8]) -> Option<Option<Usage>> {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Null) => None,
        Ok(usage) => Some(usage_of(&usage)),
        Err(_) => Some(None),
    }
}

/// The usage a built `usage` value says, by the rules of [`Usage`].
fn usage_of(value: &Value) -> Option<Usage> {
    let fields = value.as_object()?;
    // The count of the first of `names` present and non-null: `Some(None)` if none is,
    // `None` if it isn't a non-negative integer (`12.0` is one).
    let first = |names: &[&str]| -> Option<Option<u64>> {
        for &name in names {
            match fields.get(name) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) => {
                    let count = n.as_u64().or_else(|| {
                        n.as_f64()
                            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0)
                            .filter(|f| *f < u64::MAX as f64)
                            .map(|f| f as u64)
                    });
                    return Some(Some(count?));
                }
                Some(_) => return None,
            }
        }
        Some(None)
    };
    let input = first(&["prompt_tokens", "input_tokens"])?;
    let output = first(&["completion_tokens", "output_tokens"])?;
    let total = first(&["total_tokens"])?;
    if input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
    Some(usage(
        input,
        output,
        total.unwrap_or(input.saturating_add(output)),
    ))
}

/// Bytes likely to exercise the JSON framing: member names that matter, nested values,
/// strings with escapes, numbers of every kind, noise.
fn json_noise() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..4),
        2 => Just(b"{".to_vec()),
        2 => Just(b"}".to_vec()),
        1 => Just(b"[".to_vec()),
        1 => Just(b"]".to_vec()),
        2 => Just(b"\"".to_vec()),
        1 => Just(b"\\".to_vec()),
        2 => Just(b",".to_vec()),
        2 => Just(b":".to_vec()),
        1 => Just(b" ".to_vec()),
        1 => Just(b"\n".to_vec()),
        3 => Just(b"\"usage\":".to_vec()),
        2 => Just(b"\"response\":".to_vec()),
        1 => Just(b"\"usage\"".to_vec()),
        1 => Just(b"\"us\\u0061ge\":".to_vec()),
        1 => Just(b"\"x\\\"\":".to_vec()),
        2 => Just(b"\"prompt_tokens\":".to_vec()),
        1 => Just(b"\"input_tokens\":".to_vec()),
        2 => Just(b"\"completion_tokens\":".to_vec()),
        1 => Just(b"\"output_tokens\":".to_vec()),
        2 => Just(b"\"total_tokens\":".to_vec()),
        1 => Just(b"\"a long string that goes past sixteen bytes\"".to_vec()),
        1 => Just(b"\"s]}\\\"{[\"".to_vec()),
        3 => Just(b"{\"prompt_tokens\":1,\"completion_tokens\":2}".to_vec()),
        1 => Just(b"{\"input_tokens\":3,\"total_tokens\":null}".to_vec()),
        1 => Just(b"null".to_vec()),
        1 => Just(b"0".to_vec()),
        2 => Just(b"12".to_vec()),
        1 => Just(b"007".to_vec()),
        1 => Just(b"-1".to_vec()),
        1 => Just(b"1.0".to_vec()),
        1 => Just(b"2e1".to_vec()),
        1 => Just(b"123456789012345678901".to_vec()),
        1 => Just(b"true".to_vec()),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| {
        let mut body = b"{".to_vec();
        body.extend(pieces.concat());
        body
    })
}

/// `usage` values: mostly objects of count-like members (names with escapes or not ASCII,
/// numbers of every kind, `null`, nested values, whitespace), sometimes with a byte changed.
fn usage_text() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("\"prompt_tokens\""),
        Just("\"input_tokens\""),
        Just("\"completion_tokens\""),
        Just("\"output_tokens\""),
        Just("\"total_tokens\""),
        Just("\"total\\u005ftokens\""),
        Just("\"cached\""),
        Just("\"caf\u{e9}\""),
        Just("\"\""),
    ];
    let value = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..1000).prop_map(|n| n.to_string()),
        Just("null".to_string()),
        Just("0".to_string()),
        Just("00".to_string()),
        Just("-3".to_string()),
        Just("4.0".to_string()),
        Just("4.5".to_string()),
        Just("5e0".to_string()),
        Just("99999999999999999999".to_string()),
        Just("\"7\"".to_string()),
        Just("true".to_string()),
        Just("{\"cached_tokens\":0}".to_string()),
        Just("[1,2]".to_string()),
    ];
    let ws = prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("\n\t")];
    let member = (name, ws.clone(), value, ws.clone())
        .prop_map(|(name, ws1, value, ws2)| format!("{name}{ws1}:{ws2}{value}{ws2}"));
    (
        prop::collection::vec(member, 0..6),
        ws,
        prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    )
        .prop_map(|(members, ws, change)| {
            let mut text = format!("{ws}{{{}}}{ws}", members.join(",")).into_bytes();
            if let Some((at, byte)) = change {
                let at = at.index(text.len());
                text[at] = byte;
            }
            text
        })
}

/// `has_usage_object` without the search: every position tried.
fn has_usage_object_naive(hay: &[u8]) -> bool {
    (0..hay.len()).any(|i| {
        hay[i..].starts_with(KEY) && {
            let rest = hay[i + KEY.len()..].trim_ascii_start();
            rest.strip_prefix(b":")
                .is_some_and(|r| r.trim_ascii_start().first() == Some(&b'{'))
        }
    })
}

/// Splits `body` at the given points (taken modulo its length).
fn chunked<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for p in points {
        chunks.push(&body[from..p]);
        from = p;
    }
    chunks.push(&body[from..]);
    chunks
}

/// Bytes likely to exercise the parsers: SSE and JSON syntax mixed with noise.
fn noisy_body() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..8),
        1 => Just(b"data:".to_vec()),
        1 => Just(b"data: ".to_vec()),
        1 => Just(b"data".to_vec()),
        2 => Just(b"\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        1 => Just(b":".to_vec()),
        1 => Just(b"[DONE]".to_vec()),
        1 => Just(b"\xEF\xBB\xBF".to_vec()),
        1 => Just(b"{".to_vec()),
        1 => Just(b"}".to_vec()),
        1 => Just(b"\"".to_vec()),
        1 => Just(b"\\".to_vec()),
        1 => Just(b"\"usage\":".to_vec()),
        1 => Just(b"{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}".to_vec()),
        1 => Just(b"{\"response\":{\"usage\":{\"input_tokens\":3}}}".to_vec()),
        1 => Just(b"null".to_vec()),
        1 => Just(b"\n\n".to_vec()),
        1 => Just(b"\r\n\r\n".to_vec()),
        1 => Just(b" ".to_vec()),
        1 => Just(b"data: [DONE]\n\n".to_vec()),
        1 => Just(b"data: {\"usage\":null}\n\n".to_vec()),
        1 => Just(b"\"usage\"usage\": {}".to_vec()),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![Just(Framing::Json), Just(Framing::Sse)]
}

/// A valid stream: `usage: null` chunks, comments and other fields, the usage (in chat or
/// Responses shape, maybe over several data lines), then maybe `[DONE]`; with random line
/// endings.
fn sse_stream() -> impl Strategy<Value = (Vec<u8>, Usage)> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::option::of(any::<u64>()),
        0usize..4,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(0usize..3, 32),
        any::<bool>(),
    )
        .prop_map(
            |(input, output, total, nulls, responses, done, eols, multi_line)| {
                let mut eols = eols.into_iter().cycle();
                let mut out = Vec::new();
                let mut line = |out: &mut Vec<u8>, text: &str| {
                    let mut eol = [&b"\n"[..], b"\r\n", b"\r"][eols.next().unwrap_or(0)];
                    // `\r` then a blank line ended by `\n` would be one `\r\n`.
                    if text.is_empty() && eol == b"\n" && out.last() == Some(&b'\r') {
                        eol = b"\r";
                    }
                    out.extend_from_slice(text.as_bytes());
                    out.extend_from_slice(eol);
                };
                for i in 0..nulls {
                    if i % 2 == 0 {
                        line(&mut out, ": keep-alive");
                    }
                    line(&mut out, "event: chunk");
                    line(
                        &mut out,
                        &format!(
                            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}],\"usage\":null}}"
                        ),
                    );
                    line(&mut out, "");
                }
                let (input_key, output_key) = if responses {
                    ("input_tokens", "output_tokens")
                } else {
                    ("prompt_tokens", "completion_tokens")
                };
                let total_field = total
                    .map(|t| format!(",\"total_tokens\":{t}"))
                    .unwrap_or_default();
                let usage_json = format!(
                    "{{\"{input_key}\":{input},\n\"{output_key}\":{output}{total_field}}}"
                );
                let event = if responses {
                    format!("{{\"type\":\"response.completed\",\"response\":{{\"usage\":{usage_json}}}}}")
                } else {
                    format!("{{\"choices\":[],\"usage\":{usage_json}}}")
                };
                if multi_line {
                    for part in event.split('\n') {
                        line(&mut out, &format!("data: {part}"));
                    }
                } else {
                    line(&mut out, &format!("data:{}", event.replace('\n', " ")));
                }
                line(&mut out, "");
                if done {
                    line(&mut out, "data: [DONE]");
                    line(&mut out, "");
                }
                let expected = Usage {
                    input_tokens: input,
                    output_tokens: output,
                    total_tokens: total.unwrap_or(input.saturating_add(output)),
                };
                (out, expected)
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_chunking_never_matters(
        framing in framing(),
        body in noisy_body(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        max in prop_oneof![0usize..64, Just(MAX)],
    ) {
        let whole = run(framing, max, [&body[..]]);
        prop_assert_eq!(run(framing, max, chunked(&body, &cuts)), whole);
        prop_assert_eq!(run(framing, max, body.chunks(1)), whole);
    }

    #[test]
    fn sse_matches_the_reference(
        body in noisy_body(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        max in prop_oneof![0usize..64, Just(MAX)],
    ) {
        let expected = sse_reference(&body, max);
        prop_assert_eq!(run(Framing::Sse, max, [&body[..]]), expected);
        prop_assert_eq!(run(Framing::Sse, max, chunked(&body, &cuts)), expected);
    }

    #[test]
    fn sse_streams_match_the_reference(
        (body, _) in sse_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let expected = sse_reference(&body, MAX);
        prop_assert_eq!(run(Framing::Sse, MAX, chunked(&body, &cuts)), expected);
    }

    #[test]
    fn json_matches_the_reference(
        body in json_noise(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        max in prop_oneof![0usize..64, Just(MAX)],
    ) {
        let expected = json_reference(&body, max);
        prop_assert_eq!(run(Framing::Json, max, [&body[..]]), expected);
        prop_assert_eq!(run(Framing::Json, max, chunked(&body, &cuts)), expected);
        prop_assert_eq!(run(Framing::Json, max, body.chunks(1)), expected);
    }

    #[test]
    fn usage_objects_match_the_parser(text in usage_text()) {
        prop_assert_eq!(usage_value(&text), usage_value_reference(&text));
    }

    #[test]
    fn usage_values_match_the_parser(body in json_noise()) {
        // The object as written, and what follows its first `:` (a value, maybe).
        prop_assert_eq!(usage_value(&body), usage_value_reference(&body));
        if let Some(colon) = body.iter().position(|&b| b == b':') {
            let text = &body[colon + 1..];
            prop_assert_eq!(usage_value(text), usage_value_reference(text));
        }
    }

    #[test]
    fn usage_object_search_matches_the_naive_one(body in noisy_body()) {
        prop_assert_eq!(has_usage_object(&body), has_usage_object_naive(&body));
    }

    #[test]
    fn random_bytes_never_panic(
        framing in framing(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = run(framing, MAX, [&body[..]]);
        prop_assert_eq!(run(framing, MAX, chunked(&body, &cuts)), whole);
    }

    #[test]
    fn valid_sse_streams_give_the_same_usage_however_chunked(
        (body, expected) in sse_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let (found, _) = run(Framing::Sse, MAX, [&body[..]]);
        prop_assert_eq!(found, Some(expected));
        prop_assert_eq!(run(Framing::Sse, MAX, chunked(&body, &cuts)).0, Some(expected));
        prop_assert_eq!(run(Framing::Sse, MAX, body.chunks(1)).0, Some(expected));
    }

    #[test]
    fn valid_json_bodies_give_the_same_usage_however_chunked(
        input in any::<u64>(),
        output in any::<u64>(),
        total in any::<u64>(),
        pad in "[a-z \\\\\"{}\\[\\]]{0,40}",
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let body = serde_json::json!({
            "id": pad,
            "choices": [{"message": {"content": pad}}],
            "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": total},
        })
        .to_string();
        let expected = Some(usage(input, output, total));
        let whole = run(Framing::Json, MAX, [body.as_bytes()]);
        prop_assert_eq!(whole, (expected, true));
        prop_assert_eq!(run(Framing::Json, MAX, chunked(body.as_bytes(), &cuts)), whole);
    }
}
