use super::*;

use bytes::Bytes;
use http::{Request, StatusCode};
use proptest::prelude::*;
use serde_json::{json, Value};

fn run(est: &OpenAiTokens, path: &str, body: &Value) -> Result<Cost, CostError> {
    let req = Request::post(path).body(()).unwrap();
    let bytes = Bytes::from(body.to_string());
    let given = est.estimate(&RequestView::from_request(&req).with_body(&bytes, Some(body)));
    // The layer's path: the estimator parses the bytes itself (a borrowed document).
    let parsed = est.estimate(&RequestView::from_request(&req).with_body(&bytes, None));
    assert_eq!(given, parsed, "{body}");
    given
}

fn cost(path: &str, body: Value) -> Cost {
    run(&openai(), path, &body).unwrap()
}

fn input(path: &str, body: Value) -> u64 {
    cost(path, body).input_tokens()
}

fn output(path: &str, body: Value) -> u64 {
    cost(path, body).output_tokens()
}

/// The 400 for `body`; asserts its message names `field`.
fn rejects(path: &str, body: Value, field: &str) {
    let err = run(&openai(), path, &body).unwrap_err();
    assert_eq!(err.status, StatusCode::BAD_REQUEST);
    assert!(
        err.message.contains(&format!("`{field}`")),
        "{:?} should name `{field}`",
        err.message
    );
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMBEDDINGS: &str = "/v1/embeddings";
const RESPONSES: &str = "/v1/responses";

fn user(content: Value) -> Value {
    json!({"messages": [{"role": "user", "content": content}]})
}

fn t(s: &str) -> u64 {
    estimate_text_tokens(s)
}

/// What [`openai`] counts for `s` in a request to `model`: with the `tokenizer` feature the
/// model's tokenizer when known, else the heuristic.
fn tm(model: &str, s: &str) -> u64 {
    openai()
        .counter(&Json::from_value(&json!({ "model": model })))
        .text(s)
}

/// The estimator that always uses the heuristic.
fn heuristic() -> OpenAiTokens {
    #[cfg(feature = "tokenizer")]
    return openai().exact_tokens(false);
    #[cfg(not(feature = "tokenizer"))]
    openai()
}

#[test]
fn chat_counts_messages_with_overhead_and_reserves_max_tokens_times_n() {
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "max_tokens": 100,
        "n": 3
    });
    let c = cost(CHAT, body);
    let text = tm("gpt-4o", "You are terse.") + tm("gpt-4o", "What is the capital of France?");
    assert_eq!(
        c.input_tokens(),
        REPLY_PRIMER + 2 * TOKENS_PER_MESSAGE + text
    );
    assert_eq!(c.output_tokens(), 300);
    assert_eq!(c.tokens(), c.input_tokens() + 300);
}

#[test]
fn chat_prefers_max_completion_tokens_and_defaults_the_rest() {
    let mut body = user(json!("hi"));
    body["max_tokens"] = json!(50);
    body["max_completion_tokens"] = json!(70);
    body["n"] = json!(2);
    assert_eq!(output(CHAT, body), 140);

    // No limit: the default (x n), null counting as absent.
    let mut body = user(json!("hi"));
    body["max_tokens"] = Value::Null;
    assert_eq!(
        output(CHAT, body.clone()),
        OpenAiTokens::DEFAULT_OUTPUT_TOKENS
    );
    body["n"] = json!(2);
    assert_eq!(output(CHAT, body.clone()), 2 * 4_096);
    let est = openai().default_output_tokens(1_000);
    assert_eq!(run(&est, CHAT, &body).unwrap().output_tokens(), 2_000);
}

#[test]
fn per_model_defaults_exact_then_longest_prefix() {
    let est = openai()
        .default_output_tokens(1_000)
        .model_output_tokens("gpt*", 2_000)
        .model_output_tokens("gpt-4o-mini*", 3_000)
        .model_output_tokens("gpt-4o-mini", 16_384)
        .model_output_tokens("o3", 50_000)
        .model_output_tokens("o3", 60_000); // replaces
    let out = |model: Value| {
        let mut body = user(json!("hi"));
        body["model"] = model;
        run(&est, CHAT, &body).unwrap().output_tokens()
    };
    assert_eq!(out(json!("gpt-4o-mini")), 16_384);
    assert_eq!(out(json!("gpt-4o-mini-2024-07-18")), 3_000);
    assert_eq!(out(json!("gpt-4.1")), 2_000);
    assert_eq!(out(json!("o3")), 60_000);
    assert_eq!(out(json!("o3-mini")), 1_000);
    assert_eq!(out(json!("claude")), 1_000);
    assert_eq!(out(Value::Null), 1_000);
    // An explicit limit wins over any default.
    let mut body = user(json!("hi"));
    body["model"] = json!("gpt-4o-mini");
    body["max_tokens"] = json!(10);
    assert_eq!(run(&est, CHAT, &body).unwrap().output_tokens(), 10);
    // Responses use the same defaults.
    let body = json!({"model": "o3", "input": "hi"});
    assert_eq!(run(&est, RESPONSES, &body).unwrap().output_tokens(), 60_000);
}

#[test]
fn n_is_capped_and_arithmetic_saturates() {
    let mut body = user(json!("hi"));
    body["max_tokens"] = json!(10);
    body["n"] = json!(1_000_000);
    assert_eq!(output(CHAT, body.clone()), 10 * OpenAiTokens::MAX_N);
    body["max_tokens"] = json!(u64::MAX);
    assert_eq!(output(CHAT, body), u64::MAX);
    let est = openai().image_tokens(u64::MAX, u64::MAX);
    let image = json!({"type": "image_url", "image_url": {"url": "https://x/y.png"}});
    let body = user(json!([image, image]));
    assert_eq!(run(&est, CHAT, &body).unwrap().input_tokens(), u64::MAX);
}

#[test]
fn content_parts_text_images_and_other_parts() {
    let text = json!({"type": "text", "text": "Describe these pictures."});
    let low =
        json!({"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}});
    let high =
        json!({"type": "image_url", "image_url": {"url": "https://x/b.png", "detail": "high"}});
    let auto = json!({"type": "image_url", "image_url": {"url": "https://x/c.png"}});
    let base = REPLY_PRIMER + TOKENS_PER_MESSAGE;
    let words = t("Describe these pictures.");
    assert_eq!(input(CHAT, user(json!([text]))), base + words);
    assert_eq!(
        input(CHAT, user(json!([text, low, high, auto]))),
        base + words + 85 + 765 + 765
    );
    let est = openai().image_tokens(10, 100);
    let body = user(json!([low, high]));
    assert_eq!(run(&est, CHAT, &body).unwrap().input_tokens(), base + 110);

    // A megabyte of base64 audio is one attachment, not a million tokens of text.
    let audio = json!({"type": "input_audio", "input_audio": {"data": "QUJD".repeat(250_000), "format": "wav"}});
    let tokens = input(CHAT, user(json!([audio])));
    assert_eq!(tokens, base + 765 + t("wav"));
    let est = openai().attachment_tokens(2_000);
    let body = user(json!([audio]));
    assert_eq!(
        run(&est, CHAT, &body).unwrap().input_tokens(),
        base + 2_000 + t("wav")
    );
    let file = json!({"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQK".repeat(10), "filename": "report.pdf"}});
    assert_eq!(
        input(CHAT, user(json!([file]))),
        base + 765 + t("report.pdf")
    );

    // Other parts: their string fields, identifiers aside.
    let refusal = json!({"type": "refusal", "refusal": "I can't help with that."});
    assert_eq!(
        input(CHAT, user(json!([refusal]))),
        base + t("I can't help with that.")
    );
}

#[test]
fn names_tool_calls_and_tool_definitions_count() {
    let plain = input(CHAT, user(json!("hi")));
    let mut named = user(json!("hi"));
    named["messages"][0]["name"] = json!("alice");
    assert_eq!(input(CHAT, named), plain + TOKENS_PER_NAME + t("alice"));

    let call = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_abc123", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
            }]},
            {"role": "tool", "tool_call_id": "call_abc123", "content": "18C, sunny"}
        ]
    });
    let expected = REPLY_PRIMER
        + 3 * TOKENS_PER_MESSAGE
        + t("Weather in Paris?")
        + TOKENS_PER_TOOL_CALL
        + t("get_weather")
        + t("{\"city\":\"Paris\"}")
        + t("18C, sunny");
    assert_eq!(input(CHAT, call.clone()), expected);

    let tool = json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }});
    let mut with_tools = call.clone();
    with_tools["tools"] = json!([tool]);
    let defs = json_tokens(&Json::from_value(&json!([tool])));
    assert!(
        defs >= t(&json!([tool]).to_string()) / 2 && defs > 20,
        "{defs}"
    );
    assert_eq!(input(CHAT, with_tools), expected + defs);
    let mut with_functions = call.clone();
    with_functions["functions"] = json!([tool["function"]]);
    assert_eq!(
        input(CHAT, with_functions),
        expected + json_tokens(&Json::from_value(&json!([tool["function"]])))
    );
    let mut empty = call.clone();
    empty["tools"] = json!([]);
    assert_eq!(input(CHAT, empty), expected);
    let mut schema = call;
    schema["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}});
    assert!(input(CHAT, schema) > expected);
}

#[test]
fn json_tokens_matches_the_serialized_text() {
    let v = json!({"a": [1, 2.5, -3, true, false, null, "x y"], "b": {"c": "d"}});
    assert_eq!(json_tokens(&Json::from_value(&v)), t(&v.to_string()));
}

#[test]
fn completions_prompt_shapes_and_batches() {
    let c = cost(COMPLETIONS, json!({"prompt": "Once upon a time"}));
    assert_eq!(c, Cost::new(t("Once upon a time"), 16));
    assert_eq!(cost(COMPLETIONS, json!({})), Cost::new(1, 16));
    let c = cost(
        COMPLETIONS,
        json!({"prompt": "Say", "suffix": "done", "max_tokens": 5}),
    );
    assert_eq!(c, Cost::new(t("Say") + t("done"), 5));
    // A batch of prompts: each gets n (or best_of) completions.
    let c = cost(
        COMPLETIONS,
        json!({"prompt": ["one", "two", "three"], "max_tokens": 10, "n": 2}),
    );
    assert_eq!(c, Cost::new(t("one") + t("two") + t("three"), 60));
    let c = cost(
        COMPLETIONS,
        json!({"prompt": "x", "max_tokens": 10, "n": 2, "best_of": 5}),
    );
    assert_eq!(c.output_tokens(), 50);
    // Token ids, counted exactly.
    let c = cost(
        COMPLETIONS,
        json!({"prompt": [1, 2, 3, 4, 5], "max_tokens": 10}),
    );
    assert_eq!(c, Cost::new(5, 10));
    let c = cost(
        COMPLETIONS,
        json!({"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 10}),
    );
    assert_eq!(c, Cost::new(5, 20));
    assert_eq!(cost(COMPLETIONS, json!({"prompt": []})), Cost::new(0, 0));
}

#[test]
fn embeddings_input_shapes_and_no_output() {
    assert_eq!(
        cost(EMBEDDINGS, json!({"input": "hello world"})),
        Cost::new(t("hello world"), 0)
    );
    assert_eq!(
        cost(EMBEDDINGS, json!({"input": ["hello world", "bye"]})),
        Cost::new(t("hello world") + t("bye"), 0)
    );
    assert_eq!(
        cost(EMBEDDINGS, json!({"input": [9, 8, 7]})),
        Cost::new(3, 0)
    );
    assert_eq!(
        cost(EMBEDDINGS, json!({"input": [[1, 2, 3], [4], []]})),
        Cost::new(4, 0)
    );
    // max_tokens means nothing here.
    assert_eq!(
        cost(EMBEDDINGS, json!({"input": "x", "max_tokens": 99})).output_tokens(),
        0
    );
}

#[test]
fn responses_inputs_instructions_tools_and_output() {
    let c = cost(
        RESPONSES,
        json!({"input": "Tell me a joke.", "max_output_tokens": 300}),
    );
    assert_eq!(
        c,
        Cost::new(
            REPLY_PRIMER + TOKENS_PER_MESSAGE + t("Tell me a joke."),
            300
        )
    );
    assert_eq!(output(RESPONSES, json!({"input": "x"})), 4_096);

    let body = json!({
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "Hello"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is in this image?"},
                {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}
            ]},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "A cat."}
            ]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "nothing found"}
        ]
    });
    let expected = REPLY_PRIMER
        + TOKENS_PER_MESSAGE
        + t("Be brief.")
        + 5 * TOKENS_PER_MESSAGE
        + t("Hello")
        + t("What is in this image?")
        + 85
        + t("A cat.")
        + t("lookup")
        + t("{}")
        + t("nothing found");
    assert_eq!(input(RESPONSES, body.clone()), expected);

    let mut tools = body;
    let tool = json!([{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]);
    tools["tools"] = tool.clone();
    assert_eq!(
        input(RESPONSES, tools),
        expected + json_tokens(&Json::from_value(&tool))
    );
}

#[test]
fn other_paths_count_every_string_and_reserve_as_chat() {
    let body = json!({"model": "m", "system": "Be kind.", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}], "max_tokens": 64});
    let c = cost("/v1/messages", body);
    assert_eq!(c, Cost::new(t("Be kind.") + t("Hi there"), 64));
    assert_eq!(
        cost(
            "/generate",
            json!({"inputs": "abc", "max_output_tokens": 7})
        ),
        Cost::new(t("abc"), 7)
    );
    assert_eq!(
        cost("/generate", json!(["abc", "def"])),
        Cost::new(t("abc") + t("def"), 4_096)
    );
    assert_eq!(cost("/", json!(42)), Cost::new(0, 4_096));
    rejects("/generate", json!({"n": 0}), "n");
}

#[test]
fn the_endpoint_is_the_end_of_the_path() {
    assert_eq!(Endpoint::of("/v1/chat/completions"), Endpoint::Chat);
    assert_eq!(Endpoint::of("/v1/chat/completions/"), Endpoint::Chat);
    assert_eq!(
        Endpoint::of("/openai/deployments/gpt4o/chat/completions"),
        Endpoint::Chat
    );
    assert_eq!(Endpoint::of("/v1/completions"), Endpoint::Completions);
    assert_eq!(Endpoint::of("/v1/embeddings"), Endpoint::Embeddings);
    assert_eq!(Endpoint::of("/v1/responses"), Endpoint::Responses);
    assert_eq!(Endpoint::of("/v1/chatcompletions"), Endpoint::Other);
    assert_eq!(Endpoint::of("/v1/xcompletions"), Endpoint::Other);
    assert_eq!(Endpoint::of("/"), Endpoint::Other);
    let body = user(json!("hi"));
    let req = Request::post("https://api.example/v1/chat/completions?api-version=1")
        .body(())
        .unwrap();
    let bytes = Bytes::new();
    let view = RequestView::from_request(&req).with_body(&bytes, Some(&body));
    assert_eq!(openai().estimate(&view).unwrap().output_tokens(), 4_096);
}

#[test]
fn wrong_types_answer_400_naming_the_field() {
    let with = |k: &str, v: Value| {
        let mut b = user(json!("hi"));
        b[k] = v;
        b
    };
    rejects(CHAT, with("max_tokens", json!("x")), "max_tokens");
    rejects(CHAT, with("max_tokens", json!(-1)), "max_tokens");
    rejects(CHAT, with("max_tokens", json!(1.5)), "max_tokens");
    rejects(
        CHAT,
        with("max_completion_tokens", json!(true)),
        "max_completion_tokens",
    );
    rejects(CHAT, with("n", json!(0)), "n");
    rejects(CHAT, with("n", json!("2")), "n");
    rejects(CHAT, with("model", json!(4)), "model");
    rejects(CHAT, with("tools", json!({})), "tools");
    rejects(CHAT, with("functions", json!("f")), "functions");
    rejects(CHAT, with("messages", json!("hi")), "messages");
    rejects(CHAT, json!({}), "messages");
    rejects(
        CHAT,
        json!({"messages": [{"content": "a"}, 5]}),
        "messages[1]",
    );
    rejects(CHAT, user(json!(5)), "messages[0].content");
    rejects(
        CHAT,
        user(json!([{"type": "text", "text": "a"}, 5])),
        "messages[0].content[1]",
    );
    rejects(
        CHAT,
        user(json!([{"type": "text"}])),
        "messages[0].content[0].text",
    );
    rejects(
        CHAT,
        json!({"messages": [{"content": "a", "name": 1}]}),
        "messages[0].name",
    );
    rejects(
        CHAT,
        json!({"messages": [{"content": "a", "tool_calls": {}}]}),
        "messages[0].tool_calls",
    );

    rejects(COMPLETIONS, json!({"prompt": 5}), "prompt");
    rejects(COMPLETIONS, json!({"prompt": ["a", 1]}), "prompt");
    rejects(COMPLETIONS, json!({"prompt": [1, "a"]}), "prompt");
    rejects(COMPLETIONS, json!({"prompt": [1, -1]}), "prompt");
    rejects(COMPLETIONS, json!({"prompt": [[1], ["a"]]}), "prompt");
    rejects(COMPLETIONS, json!({"prompt": "a", "best_of": 0}), "best_of");
    rejects(COMPLETIONS, json!({"prompt": "a", "suffix": 1}), "suffix");
    rejects(
        COMPLETIONS,
        json!({"prompt": "a", "max_tokens": "16"}),
        "max_tokens",
    );

    rejects(EMBEDDINGS, json!({}), "input");
    rejects(EMBEDDINGS, json!({"input": {"text": "a"}}), "input");
    rejects(EMBEDDINGS, json!({"input": [[1, 2], 3]}), "input");
    rejects(EMBEDDINGS, json!({"input": [null]}), "input");

    rejects(RESPONSES, json!({"input": 5}), "input");
    rejects(RESPONSES, json!({"input": ["a"]}), "input[0]");
    rejects(
        RESPONSES,
        json!({"input": [{"content": 1}]}),
        "input[0].content",
    );
    rejects(
        RESPONSES,
        json!({"input": [{"content": [7]}]}),
        "input[0].content[0]",
    );
    rejects(
        RESPONSES,
        json!({"input": "a", "instructions": []}),
        "instructions",
    );
    rejects(
        RESPONSES,
        json!({"input": "a", "max_output_tokens": "x"}),
        "max_output_tokens",
    );
    rejects(RESPONSES, json!({"input": "a", "tools": 1}), "tools");
}

#[test]
fn bodies_that_are_not_json_objects_answer_400() {
    let req = Request::post(CHAT).body(()).unwrap();
    let bytes = Bytes::from_static(b"not json");
    let view = RequestView::from_request(&req).with_body(&bytes, None);
    let err = openai().estimate(&view).unwrap_err();
    assert_eq!(err.status, StatusCode::BAD_REQUEST);
    assert!(err.message.contains("must be JSON"), "{}", err.message);
    // The layer didn't read the body at all.
    assert!(openai().estimate(&RequestView::from_request(&req)).is_err());
    for path in [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES] {
        let err = run(&openai(), path, &json!([1, 2])).unwrap_err();
        assert!(err.message.contains("JSON object"), "{}", err.message);
    }
    assert!(openai().needs_body());
}

#[test]
fn text_heuristic_basics() {
    assert_eq!(t(""), 0);
    assert_eq!(t(" "), 0);
    assert_eq!(t("a"), 1); // 29/32
    assert_eq!(t("Hello, world!"), 4); // 29 + 12 + 21 + 29 + 12 + 21 = 124/32
    assert_eq!(t("hello hello hello hello hello hello"), 8); // 41/32 a word
    assert_eq!(t("internationalization"), 4); // 29 + 19 x 3 + a rare pair (32)
    assert!(t("getName") > t("getname")); // camelCase: two words
    assert_eq!(t("123"), 2); // 39 + 2 x 11
    assert!(t("1234567") > t("123"));
    assert!(t("a 1") > t("a1")); // a space before digits is its own token
    assert_eq!(t("----------------"), 2); // 21 + 15 x 2
    assert_eq!(t("\"},{\""), 2); // 21 + 4 x 10
    assert_eq!(t("\n"), 2);
    assert_eq!(t("\n\n\n\n"), 3); // 43 + 3 x 11
    assert_eq!(t("中文字"), 3);
    assert_eq!(t("한국어"), 3);
    assert_eq!(t("🎉"), 3);
    assert_eq!(t("—"), 2);
    assert_eq!(t("Grüße"), 3); // 29 + 3 + 9 + 9 + 32 (a letter after a non-ASCII one)
    assert_eq!(t("привет"), 3); // 35 + 5 x 9
    assert_eq!(t("\u{0}\u{1}"), 3); // 2 x 37
                                    // Gibberish costs more than a word of the same length.
    assert!(t("xqzvkj") > t("garden"));
    assert!(t("aGVsbG8gd29ybGQ=") > 4);
    // Long runs of spaces or dashes still cost something.
    assert_eq!(t(&" ".repeat(161)), 10);
    assert_eq!(t(&"=".repeat(161)), 11);
}

#[test]
fn text_fed_in_pieces_counts_as_one() {
    let text = "Hello  wörld 123 getWeather ---- 中文 🎉\n\nxqz";
    for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
        let (a, b) = text.split_at(cut);
        let mut c = TextCounter::new();
        c.feed(a);
        c.feed(b);
        assert_eq!(c.finish(), t(text), "cut at {cut}");
    }
}

/// Real counts from `tiktoken` (`o200k_base`, `cl100k_base`); the estimate must not be
/// below the `o200k_base` count, nor above twice it.
#[test]
fn accuracy_on_sample_texts() {
    let samples: [(&str, u64, u64); 8] = [
        ("Rate limiting protects a service from overload and keeps usage fair between customers. When a request arrives, the middleware estimates how many tokens it will consume and reserves that amount before forwarding it.", 36, 36),
        ("fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n    println!(\"{:?}\", v.iter().sum::<u32>());\n}", 43, 43),
        (r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"max_tokens":100}"#, 46, 45),
        ("Die Ratenbegrenzung schützt einen Dienst vor Überlastung und sorgt für eine faire Verteilung zwischen den Kunden.", 24, 30),
        ("速率限制可以保护服务免于过载，并确保客户之间的公平使用。", 18, 26),
        ("Ограничение скорости защищает сервис от перегрузки.", 13, 23),
        ("Hello, world!", 4, 4),
        ("你好，世界", 3, 6),
    ];
    for (text, o200k, _cl100k) in samples {
        let est = t(text);
        assert!(
            (o200k..=2 * o200k).contains(&est),
            "{text:?}: estimate {est}, o200k {o200k}"
        );
    }
}

/// Run with `cargo test --release --lib cost::openai -- --ignored`.
#[test]
#[ignore = "timing; meaningful in release builds only"]
fn a_16_kb_chat_body_estimates_in_well_under_20_us() {
    let paragraph = "Rate limiting protects a service from overload and keeps usage fair \
        between customers. When a request arrives, the middleware estimates how many tokens \
        it will consume (say 1,234) and reserves that amount: `reserve(key, n)`.\n";
    let messages: Vec<Value> = (0..8)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": paragraph.repeat(9)}))
        .collect();
    let body = json!({"model": "gpt-4o", "messages": messages, "max_tokens": 500});
    let len = body.to_string().len();
    assert!((15_000..20_000).contains(&len), "{len}");
    let est = heuristic();
    let req = Request::post(CHAT).body(()).unwrap();
    let bytes = Bytes::from(body.to_string());
    let view = RequestView::from_request(&req).with_body(&bytes, Some(&body));
    let rounds = 5_000u32;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(est.estimate(std::hint::black_box(&view)).unwrap());
    }
    let each = start.elapsed() / rounds;
    println!("{len} bytes: {each:?} per estimate");
    if !cfg!(debug_assertions) {
        assert!(each < std::time::Duration::from_micros(20), "{each:?}");
    }
}

const KEYS: &[&str] = &[
    "messages",
    "content",
    "role",
    "name",
    "tool_calls",
    "function",
    "arguments",
    "tools",
    "functions",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "model",
    "prompt",
    "input",
    "suffix",
    "best_of",
    "instructions",
    "type",
    "text",
    "image_url",
    "detail",
    "response_format",
    "json_schema",
    "format",
    "schema",
    "data",
    "refusal",
    "function_call",
    "output",
    "id",
];
const STRINGS: &[&str] = &[
    "text",
    "input_text",
    "output_text",
    "image_url",
    "input_image",
    "image",
    "low",
    "high",
    "refusal",
    "input_audio",
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "user",
    "data:x;base64,",
];

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..200).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        "[a-zA-Z0-9 +/=]{0,300}".prop_map(Value::String),
        prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        let key = prop_oneof![
            3 => prop::sample::select(KEYS).prop_map(str::to_owned),
            1 => "[a-z_]{0,10}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_request() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb_json(),
        prop::collection::vec((prop::sample::select(KEYS), arb_json()), 0..10).prop_map(|kv| {
            Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        }),
    ]
}

fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            CHAT,
            COMPLETIONS,
            EMBEDDINGS,
            RESPONSES,
            "/",
            "/v1/messages"
        ])
        .prop_map(str::to_owned),
        "(/[a-z0-9._~-]{0,12}){0,4}/?".prop_map(|p| if p.is_empty() { "/".to_owned() } else { p }),
    ]
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9 \t\r\n.,;:!?'\"(){}_=+/-]{0,80}",
        "[a-zA-Zéüßжя中文한글🎉\u{0}\u{7f}\u{a0}\u{2014} 0-9.\n-]{0,80}",
    ]
}

proptest! {
    #[test]
    fn arbitrary_json_and_paths_never_panic(body in arb_request(), path in arb_path()) {
        let est = openai().model_output_tokens("gpt-4o", 10).model_output_tokens("gpt*", 20);
        let req = Request::post(path.as_str()).body(()).unwrap();
        let bytes = Bytes::new();
        let view = RequestView::from_request(&req).with_body(&bytes, Some(&body));
        match est.estimate(&view) {
            Ok(_) => {}
            Err(e) => {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    /// A string of the body counts what its decoded text does, whichever characters are escaped and however
    /// close together: `\"`, `\n`, `\uXXXX` and surrogate pairs, after any text.
    #[test]
    fn escaped_text_counts_as_its_decoded_text(
        before in arb_text(),
        chars in prop::collection::vec(
            (
                prop_oneof![
                    any::<char>(),
                    prop::sample::select(vec![
                        '"', '\\', '/', '\n', '\t', '\u{8}', 'a', 'Z', ' ', '{', ':', '1', 'é',
                        '😀', '\u{1f}',
                    ]),
                ],
                0u8..3,
            ),
            0..160,
        ),
    ) {
        // As serde_json writes it (only what must be escaped, short forms first).
        let json = |c: char| {
            let s = serde_json::to_string(&c.to_string()).unwrap();
            s[1..s.len() - 1].to_owned()
        };
        let mut written = String::new();
        let mut decoded = String::new();
        for (c, how) in chars {
            decoded.push(c);
            match how {
                1 => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        written.push_str(&format!("\\u{unit:04X}"));
                    }
                }
                2 if c == '/' => written.push_str("\\/"),
                _ => written.push_str(&json(c)),
            }
        }
        let before_written: String = before.chars().map(json).collect();
        let body = format!("\"{before_written}{written}\"");
        let Ok(Json::String(s)) = Json::parse(body.as_bytes()) else {
            panic!("{body}")
        };
        let whole = format!("{before}{decoded}");
        prop_assert_eq!(&*s, whole.as_str());
        prop_assert_eq!(Counter::Heuristic.text(&s), t(&whole), "{:?}", written);
    }

    /// Appending never lowers the estimate, and joining two texts adds at most one token
    /// (a space before digits, or before a space). Prepending can lower it: a letter after
    /// a symbol's last byte isn't charged a word start, after nothing it is.
    #[test]
    fn text_estimate_is_monotone_and_nearly_additive(
        text in arb_text(),
        cut in any::<prop::sample::Index>(),
    ) {
        let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        let (a, b) = text.split_at(cuts[cut.index(cuts.len())]);
        let (whole, ea, eb) = (t(&text), t(a), t(b));
        prop_assert!(whole >= ea, "{a:?} + {b:?}: {whole} < {ea}");
        prop_assert!(whole <= ea + eb + 1, "{a:?} + {b:?}: {whole} > {ea} + {eb} + 1");
        let mut c = TextCounter::new();
        c.feed(a);
        c.feed(b);
        prop_assert_eq!(c.finish(), whole);
    }
}
