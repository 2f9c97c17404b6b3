//! The OpenAI body estimator on arbitrary bodies and paths: never panics, and the layer's
//! parse of the bytes (serde_json into a borrowed document) gives what a `serde_json::Value`
//! of them does.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower_llm_ratelimit::cost::{self, CostEstimator};
use tower_llm_ratelimit::key::RequestView;

const PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/other",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(which) % PATHS.len()];
    let req = http::Request::post(path).body(()).expect("static request");
    let bytes = Bytes::copy_from_slice(body);
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let est = cost::openai();
    let given = est.estimate(&RequestView::from_request(&req).with_body(&bytes, json.as_ref()));
    // With no `Value`, the estimator parses the bytes itself, as the layer does.
    let parsed = est.estimate(&RequestView::from_request(&req).with_body(&bytes, None));
    if json.is_some() {
        assert_eq!(given, parsed, "the two parses disagree");
    } else {
        assert!(parsed.is_err(), "not JSON to serde_json, yet estimated");
    }
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = cost::estimate_text_tokens(text);
    }
});
