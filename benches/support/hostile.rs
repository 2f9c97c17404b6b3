//! Request bodies shaped to be costly to read, each within the size bounds, with what the
//! estimator and a `json_field` key must make of them (worked out without the estimator).
//! Shared by the "hostile bodies" bench group (`benches/tokens.rs`) and `tests/bodies.rs`.

use serde_json::{json, Value};
use tower_llm_ratelimit::cost::estimate_text_tokens as t;

/// One shape at one size.
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    /// The URI path (which endpoint the estimator reads it as).
    pub(crate) path: &'static str,
    pub(crate) body: String,
    /// The estimator's input tokens (with the heuristic).
    pub(crate) input_tokens: u64,
    /// A JSON pointer into the body, and the key `json_field` of it gives.
    pub(crate) pointer: String,
    pub(crate) key: String,
}

/// Every shape, sized by `n` (100,000 is the largest the crate promises to read in linear
/// time): a tool schema of `n` properties, `n` members all named alike, `n / 25` arrays 120
/// deep, `n` one-letter strings, `n / 10` tool calls.
pub(crate) fn hostile_shapes(n: usize) -> Vec<Shape> {
    const CHAT: &str = "/v1/chat/completions";
    let hi = 3 + 4 + t("hi");
    let messages = r#""messages":[{"role":"user","content":"hi"}]"#;
    let properties: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("p{i}"), json!({"type": "string"})))
        .collect();
    let tools = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": properties}}}]);
    // Tool definitions count as their JSON, keys sorted (as a `Value` writes it).
    let tool_schema = Shape {
        name: "tool_schema",
        path: CHAT,
        body: format!(r#"{{"model":"m",{messages},"tools":{tools}}}"#),
        input_tokens: hi + t(&tools.to_string()),
        pointer: format!("/tools/0/function/parameters/properties/p{}/type", n - 1),
        key: "string".into(),
    };
    // The same name over and over: the last value counts.
    let repeated: String = (0..n).map(|i| format!(r#""dup":"v{i}","#)).collect();
    let duplicates = Shape {
        name: "duplicate_names",
        path: CHAT,
        body: format!(r#"{{{repeated}"model":"m",{messages}}}"#),
        input_tokens: hi,
        pointer: "/dup".into(),
        key: format!("v{}", n - 1),
    };
    // Arrays 120 deep (serde_json refuses 128), a string at the bottom of each; an unknown
    // endpoint, so that the estimate reads every string.
    let arrays = n / 25;
    let deep_one = format!("{}\"ab\"{}", "[".repeat(120), "]".repeat(120));
    let deep = Shape {
        name: "deep_arrays",
        path: "/v1/other",
        body: format!(
            r#"{{"model":"m","x":[{}]}}"#,
            vec![deep_one; arrays].join(",")
        ),
        input_tokens: arrays as u64 * t("ab"),
        pointer: format!("/x/{}{}", arrays - 1, "/0".repeat(120)),
        key: "ab".into(),
    };
    let tiny = Shape {
        name: "tiny_strings",
        path: "/v1/embeddings",
        body: format!(
            r#"{{"model":"m","input":[{}]}}"#,
            vec!["\"a\""; n].join(",")
        ),
        input_tokens: n as u64 * t("a"),
        pointer: format!("/input/{}", n - 1),
        key: "a".into(),
    };
    // Tool calls in one assistant message: 3 each, plus their text (`id`, `type` aside).
    let calls = n / 10;
    let call = r#"{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}"#;
    let tool_calls = Shape {
        name: "tool_calls",
        path: CHAT,
        body: format!(
            r#"{{"model":"m","messages":[{{"role":"assistant","tool_calls":[{}]}}]}}"#,
            vec![call; calls].join(",")
        ),
        input_tokens: 3 + 4 + calls as u64 * (3 + t("f") + t("{}")),
        pointer: format!("/messages/0/tool_calls/{}/function/name", calls - 1),
        key: "f".into(),
    };
    vec![tool_schema, duplicates, deep, tiny, tool_calls]
}
