//! Token estimates for OpenAI-compatible request bodies: [`openai`] builds an
//! [`OpenAiTokens`] estimator.
//!
//! The layer buffers the body and parses its JSON once ([`RequestView::json`]); the estimator
//! picks the endpoint from the end of the URI path, walks the fields that reach the model
//! (messages, prompts, inputs, tool definitions) and counts their text: with
//! [`estimate_text_tokens`] (a table of what each byte costs after the byte before it, fitted
//! to slightly over-estimate OpenAI's `o200k_base` tokenizer; 7-9 µs for a 16 KB body),
//! or, with the `tokenizer` feature, exactly, with the tokenizer of the body's `model` (below).
//! The output reservation is the request's own limit (`max_tokens` and friends, times `n`), or
//! a configurable default. [`OpenAiTokens`] documents every rule.
//!
//! # Exact counts (feature `tokenizer`)
//!
//! With the `tokenizer` feature, every text the estimate reads (contents, names, tool calls,
//! prompts, inputs, instructions; tool definitions and schemas as their JSON) is tokenized
//! with OpenAI's own tokenizer when the body's `model` says which one (`model` compared by
//! prefix; a fine-tune's `ft:` ignored):
//!
//! | `model` | tokenizer |
//! |---|---|
//! | `gpt-4o*`, `chatgpt-4o*`, `gpt-4.1*`, `gpt-4.5*`, `gpt-5*`, `o1*`, `o3*`, `o4*` | `o200k_base` |
//! | `gpt-4`, `gpt-4-*`, `gpt-3.5*` (Azure: `gpt-35-*`), `text-embedding-3*`, `text-embedding-ada-002` | `cl100k_base` |
//! | any other, or none | the heuristic, [`estimate_text_tokens`] |
//!
//! The vocabularies come with `tiktoken-rs`, compiled in (5 MB of text; no network, no
//! files), and are loaded once per process, on first use: `o200k_base` in about 250 ms and
//! 45 MB, `cl100k_base` in 130 ms and 23 MB. Exact counting costs 45-80 ns a byte of text, on
//! the request's task: a 16 KB body takes 0.6-1.4 ms, against 7-9 µs for the heuristic and
//! 11-19 µs for the JSON parse the layer does anyway (serde_json); 256 KB, 10-36 ms
//! (`benches/tokens.rs`). Bound bodies with `max_inspect_bytes`. Texts are tokenized in segments of at most 8 KiB,
//! cut where the tokenizers split anyway: counts stay exact, and pathological texts
//! (megabytes of one character) can't make the tokenizer fail. `exact_tokens(false)` on the
//! builder counts with the heuristic whatever the model, e.g. to compare. The framing
//! constants (4 per message, 3 for the reply) and image and attachment sizes stay estimates.
//!
//! # The heuristic against the tokenizers
//!
//! The heuristic's estimate divided by the real count, per text, on generated prompts: 16
//! texts of 100 B to 8 KB per kind, prose in eight languages from small lists of common words
//! (with punctuation, numbers and paragraphs), Rust and Python functions with random
//! identifiers, JSON documents, random base64 and hex (the test
//! `heuristic_error_against_the_tokenizers` in `cost/openai/tokenizer.rs` generates them, prints this
//! table and asserts its bounds):
//!
//! | text | o200k min | median | max | cl100k min | median | max |
//! |---|---|---|---|---|---|---|
//! | English prose | 1.18 | 1.20 | 1.31 | 1.18 | 1.20 | 1.31 |
//! | German prose | 1.36 | 1.44 | 1.60 | 1.13 | 1.15 | 1.22 |
//! | French prose | 1.41 | 1.48 | 1.61 | 1.37 | 1.39 | 1.49 |
//! | Spanish prose | 1.34 | 1.43 | 1.61 | 1.25 | 1.28 | 1.40 |
//! | Russian prose | 1.54 | 1.65 | 1.81 | 0.99 | 1.06 | 1.09 |
//! | Chinese prose | 1.48 | 1.53 | 1.56 | 0.96 | 1.00 | 1.13 |
//! | Japanese prose | 1.30 | 1.38 | 1.45 | 0.90 | 0.92 | 0.94 |
//! | Korean prose | 1.54 | 1.59 | 1.68 | 0.78 | 0.82 | 0.86 |
//! | Rust code | 1.25 | 1.34 | 1.38 | 1.25 | 1.33 | 1.37 |
//! | Python code | 1.32 | 1.38 | 1.42 | 1.33 | 1.40 | 1.43 |
//! | JSON, minified | 1.15 | 1.21 | 1.23 | 1.16 | 1.22 | 1.25 |
//! | JSON, pretty | 1.29 | 1.34 | 1.35 | 1.29 | 1.34 | 1.35 |
//! | base64 | 1.07 | 1.12 | 1.17 | 1.03 | 1.07 | 1.10 |
//! | hex, UUIDs | 1.16 | 1.20 | 1.23 | 1.16 | 1.20 | 1.23 |
//!
//! Against `o200k_base` the heuristic never under-counts (1.07x at least) and over-counts by
//! about 20% on English prose and JSON, 30-40% on code, 30-80% on other languages; the test
//! asserts each range within 0.05-0.1 of this table (English prose 1.10-1.40x, base64
//! 1.00-1.25x, ...). Against `cl100k_base` it under-counts Korean (by up to 22%), Japanese
//! (10%), Chinese and Russian (4%). Prose made of common words tokenizes more compactly than
//! real text, so real prose sees smaller ratios (see the table of [`estimate_text_tokens`]).
//!
//! # Examples
//!
//! ```
//! use bytes::Bytes;
//! use http::Request;
//! use serde_json::json;
//! use tower_llm_ratelimit::cost::{self, CostEstimator};
//! use tower_llm_ratelimit::key::RequestView;
//!
//! let body = json!({
//!     "model": "gpt-4o-mini",
//!     "messages": [{"role": "user", "content": "Say hello."}],
//!     "max_tokens": 100,
//!     "n": 2
//! });
//! let bytes = Bytes::from(body.to_string());
//! let req = Request::post("/v1/chat/completions").body(()).unwrap();
//! let view = RequestView::from_request(&req).with_body(&bytes, Some(&body));
//!
//! let est = cost::openai();
//! let cost = est.estimate(&view).unwrap();
//! assert_eq!(cost.output_tokens(), 200); // max_tokens x n
//! assert!(cost.input_tokens() >= 10); // 3 words + 4 per message + 3 for the reply
//!
//! // Without max_tokens: the default reservation, here set per model.
//! let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]});
//! let view = RequestView::from_request(&req).with_body(&bytes, Some(&body));
//! let est = cost::openai().model_output_tokens("gpt-4o-mini", 16_384);
//! assert_eq!(est.estimate(&view).unwrap().output_tokens(), 16_384);
//! ```

use std::fmt;

use crate::document::{Json, Object};

use super::{Cost, CostError, CostEstimator};
use crate::key::RequestView;

mod heuristic;
#[cfg(test)]
mod tests;
// The exact counters (feature `tokenizer`).
#[cfg(feature = "tokenizer")]
mod tokenizer;

pub use self::heuristic::estimate_text_tokens;
use self::heuristic::TextCounter;

/// Tokens of framing per chat message (OpenAI's cookbook counts 3, plus 1 for the role).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Extra tokens for a message's `name`.
const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMER: u64 = 3;
/// Framing per tool call in an assistant message.
const TOKENS_PER_TOOL_CALL: u64 = 3;
/// How deep the estimator walks nested JSON; deeper values are not counted (serde_json, which
/// parses the body, refuses 128 levels anyway).
const MAX_DEPTH: usize = 128;
/// A string of at least this many bytes that is a `data:` URL or pure base64 is an attachment.
const BLOB_MIN_LEN: usize = 256;
/// Keys whose values are identifiers or enums, not text the model reads.
const METADATA_KEYS: [&str; 6] = ["type", "id", "call_id", "status", "role", "model"];
/// The shapes `prompt` (completions) and `input` (embeddings) may take.
const TOKEN_INPUT_SHAPES: &str =
    "a string, an array of strings, an array of token ids, or an array of token-id arrays";

/// Token estimates for OpenAI-compatible request bodies. See [`openai`].
///
/// # Endpoints
///
/// The endpoint is the end of the URI path (a trailing `/` ignored), so `/v1/...`, Azure's
/// `/openai/deployments/{name}/...` and proxies' prefixes all work.
///
/// | path ends with | input tokens | output tokens reserved |
/// |---|---|---|
/// | `/chat/completions` | `messages`: each `content` (a string, or content parts), `name`, `tool_calls` / `function_call`, `refusal`; 4 per message and 3 for the reply primer; `tools` / `functions` definitions and `response_format.json_schema` as serialized JSON | (`max_completion_tokens`, else `max_tokens`, else the [default](Self::default_output_tokens)) x `n` |
/// | `/completions` | `prompt`: a string, strings, token ids or token-id arrays (ids counted exactly); `suffix`; no prompt counts 1 (`<\|endoftext\|>`) | `max_tokens` (default [16](Self::COMPLETIONS_DEFAULT_MAX_TOKENS), as OpenAI's) x max(`n`, `best_of`) x the number of prompts in a batch |
/// | `/embeddings` | `input`: the same shapes as `prompt` (required) | 0 |
/// | `/responses` | `input`: a string, or items (4 each) whose `content` is a string or content parts, other items' text fields (function calls and outputs); `instructions`; `tools` and `text.format` as serialized JSON; 3 for the reply primer | `max_output_tokens`, else the default |
/// | anything else | every string in the JSON (attachments counted as below) | as for chat, also reading `max_output_tokens` |
///
/// Content parts (chat and responses): `text` / `input_text` / `output_text` count their
/// `text`; `image_url` / `input_image` count a fixed [85 tokens](Self::IMAGE_TOKENS_LOW) for
/// `detail: "low"` and [765](Self::IMAGE_TOKENS_HIGH) otherwise (what a 1024x1024 image costs
/// GPT-4o at high detail; the real cost depends on the image's size, which the estimator does
/// not decode); any other part (audio, files, refusals) counts the text of its string fields,
/// identifiers (`type`, `id`, ...) aside, except that a `data:` URL or a base64 string of 256
/// bytes or more counts as one [attachment](Self::attachment_tokens) (765 by default).
///
/// `n` and `best_of` default to 1 and are capped at [`MAX_N`](Self::MAX_N) (128, OpenAI's own
/// maximum for `n`), so a request can't make the reservation absurd. All sums saturate.
///
/// # The default reservation
///
/// A request without an output limit reserves [4,096 tokens](Self::DEFAULT_OUTPUT_TOKENS):
/// more than most answers, far less than most models' maximum (16,384 for GPT-4o, 100,000 for
/// o-series reasoning models). The charge is corrected to the real usage afterwards, so the
/// default only decides how much room an in-flight request holds. Set it with
/// [`default_output_tokens`](Self::default_output_tokens) and per model with
/// [`model_output_tokens`](Self::model_output_tokens) (keyed by the body's `model`).
///
/// # Errors
///
/// A [`CostError`] (400, nothing charged) when the body is not JSON, is not a JSON object
/// (known endpoints), or a field the estimate reads has the wrong type: the message names the
/// field, e.g. "`max_tokens` must be a non-negative integer", "`messages[2].content` must be
/// a string or an array of content parts", "`n` must be a positive integer". Fields the
/// estimate does not read are not checked. No JSON value makes the estimator panic.
///
/// # Exact counts (feature `tokenizer`)
///
/// With the `tokenizer` feature, the text of a request whose `model` names a known tokenizer
/// is counted exactly, with that tokenizer: `o200k_base` for `gpt-4o*`, `chatgpt-4o*`,
/// `gpt-4.1*`, `gpt-4.5*`, `gpt-5*` and the o-series (`o1*`, `o3*`, `o4*`); `cl100k_base` for
/// `gpt-4` and `gpt-4-*`, `gpt-3.5*` (Azure: `gpt-35-*`), `text-embedding-3*` and
/// `text-embedding-ada-002` (a fine-tune's `ft:` prefix ignored). Other models, and bodies
/// without a `model`, get the heuristic. Every text above is counted so, tool definitions and
/// schemas as their JSON; the framing constants and image and attachment sizes stay
/// estimates. Each vocabulary is loaded on first use (`o200k_base`: about 250 ms, 45 MB), and
/// exact counting costs 45-80 ns a byte (a 16 KB body: 0.6-1.4 ms, against 7-9 µs for the
/// heuristic), so bound bodies with `max_inspect_bytes`. `exact_tokens(false)` counts with
/// the heuristic whatever the model.
///
/// On generated text the heuristic never under-counts `o200k_base`: it over-counts English
/// prose about 1.2x, JSON 1.2-1.35x, code 1.3-1.4x, base64 and hex 1.1-1.2x, other languages
/// 1.3-1.8x. Against `cl100k_base` it under-counts Korean, Japanese, Chinese and Russian, by
/// up to 22%.
///
/// # Not counted
///
/// What the server adds on its own: a `previous_response_id` conversation or a stored prompt
/// (responses), files referenced by id, and, for a request without an output limit, whatever
/// the model writes beyond the default reservation. The settled usage accounts for them.
#[derive(Debug, Clone)]
pub struct OpenAiTokens {
    default_output: u64,
    models: Vec<(String, u64)>,
    image_low: u64,
    image_high: u64,
    attachment: u64,
    #[cfg(feature = "tokenizer")]
    exact: bool,
}

/// An [`OpenAiTokens`] estimator with the defaults: 4,096 output tokens reserved when a
/// request sets no limit, images 85 / 765 tokens, attachments 765.
pub fn openai() -> OpenAiTokens {
    OpenAiTokens::default()
}

impl Default for OpenAiTokens {
    fn default() -> Self {
        Self {
            default_output: Self::DEFAULT_OUTPUT_TOKENS,
            models: Vec::new(),
            image_low: Self::IMAGE_TOKENS_LOW,
            image_high: Self::IMAGE_TOKENS_HIGH,
            attachment: Self::IMAGE_TOKENS_HIGH,
            #[cfg(feature = "tokenizer")]
            exact: true,
        }
    }
}

impl OpenAiTokens {
    /// Output tokens reserved for a chat or responses request that sets no limit, unless
    /// [`default_output_tokens`](Self::default_output_tokens) says otherwise.
    pub const DEFAULT_OUTPUT_TOKENS: u64 = 4_096;

    /// The most choices (`n`, `best_of`) a reservation counts.
    pub const MAX_N: u64 = 128;

    /// `max_tokens` of a legacy completions request that sets none (OpenAI's default).
    pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

    /// Tokens of an image part with `detail: "low"` (OpenAI's fixed cost for GPT-4o).
    pub const IMAGE_TOKENS_LOW: u64 = 85;

    /// Tokens of an image part at any other detail: a 1024x1024 image at high detail for
    /// GPT-4o (85 + 4 tiles of 170).
    pub const IMAGE_TOKENS_HIGH: u64 = 765;

    /// Output tokens reserved when a request sets no output limit (default
    /// [`DEFAULT_OUTPUT_TOKENS`](Self::DEFAULT_OUTPUT_TOKENS)); per-model values set with
    /// [`model_output_tokens`](Self::model_output_tokens) take precedence.
    pub fn default_output_tokens(mut self, tokens: u64) -> Self {
        self.default_output = tokens;
        self
    }

    /// Output tokens reserved for requests to `model` that set no output limit. `model` is
    /// compared with the body's `model` string exactly, or, when it ends with `*`, as a prefix
    /// (`"gpt-4o-mini*"` also covers `"gpt-4o-mini-2024-07-18"`). An exact match wins over a
    /// prefix, a longer prefix over a shorter one; setting the same `model` again replaces it.
    pub fn model_output_tokens(mut self, model: impl Into<String>, tokens: u64) -> Self {
        let model = model.into();
        match self.models.iter_mut().find(|(m, _)| *m == model) {
            Some(entry) => entry.1 = tokens,
            None => self.models.push((model, tokens)),
        }
        self
    }

    /// Tokens counted for an image part: `low` for `detail: "low"`, `other` for any other
    /// detail (defaults [85](Self::IMAGE_TOKENS_LOW) and [765](Self::IMAGE_TOKENS_HIGH)).
    pub fn image_tokens(mut self, low: u64, other: u64) -> Self {
        self.image_low = low;
        self.image_high = other;
        self
    }

    /// Tokens counted for an attachment that is not an image part: a `data:` URL or base64
    /// string of 256 bytes or more in an audio or file part, or anywhere in the body of an
    /// unknown endpoint (default 765).
    pub fn attachment_tokens(mut self, tokens: u64) -> Self {
        self.attachment = tokens;
        self
    }

    /// Counts the text of requests to models whose tokenizer is known with that tokenizer,
    /// exactly (`true`, the default), or with the [heuristic](estimate_text_tokens) like
    /// every other model (`false`). See [exact counts](Self#exact-counts-feature-tokenizer) for
    /// the models and what exact counting costs.
    #[cfg(feature = "tokenizer")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokenizer")))]
    pub fn exact_tokens(mut self, exact: bool) -> Self {
        self.exact = exact;
        self
    }

    /// How the text of `body` is counted: by its model's tokenizer when the estimator counts
    /// exactly and the model is known, else by the heuristic.
    #[cfg(feature = "tokenizer")]
    fn counter(&self, body: &Json<'_>) -> Counter {
        if self.exact {
            if let Some(bpe) = body
                .get("model")
                .and_then(Json::as_str)
                .and_then(tokenizer::for_model)
            {
                return Counter::Exact(bpe);
            }
        }
        Counter::Heuristic
    }

    /// Without the `tokenizer` feature, text is always counted by the heuristic.
    #[cfg(not(feature = "tokenizer"))]
    #[inline(always)]
    fn counter(&self, _body: &Json<'_>) -> Counter {
        Counter::Heuristic
    }

    /// The output reservation for `model` when the request sets no limit.
    fn default_for(&self, model: Option<&str>) -> u64 {
        let Some(model) = model else {
            return self.default_output;
        };
        let mut best: Option<(usize, u64)> = None;
        for (pattern, tokens) in &self.models {
            match pattern.strip_suffix('*') {
                None if pattern == model => return *tokens,
                Some(prefix)
                    if model.starts_with(prefix)
                        && best.is_none_or(|(len, _)| prefix.len() > len) =>
                {
                    best = Some((prefix.len(), *tokens));
                }
                _ => {}
            }
        }
        best.map_or(self.default_output, |(_, tokens)| tokens)
    }

    fn chat(&self, body: &Object<'_>, c: Counter) -> Result<Cost, CostError> {
        let Some(Json::Array(messages)) = body.get("messages") else {
            return Err(bad_field("messages", "an array of message objects"));
        };
        let mut input = REPLY_PRIMER;
        for (i, message) in messages.iter().enumerate() {
            input = input.saturating_add(self.message(message, i, c)?);
        }
        input = input
            .saturating_add(definitions(body, "tools", c)?)
            .saturating_add(definitions(body, "functions", c)?);
        if let Some(schema) = body
            .get("response_format")
            .and_then(|f| f.get("json_schema"))
        {
            input = input.saturating_add(c.json(schema));
        }
        Ok(Cost::new(input, self.chat_output(body, false)?))
    }

    fn message(&self, message: &Json<'_>, i: usize, c: Counter) -> Result<u64, CostError> {
        let Some(m) = message.as_object() else {
            return Err(bad_field(format_args!("messages[{i}]"), "an object"));
        };
        let mut tokens = TOKENS_PER_MESSAGE;
        match m.get("content") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => tokens = tokens.saturating_add(c.text(s)),
            Some(Json::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let part = self.part(part, c, &|| format!("messages[{i}].content[{j}]"))?;
                    tokens = tokens.saturating_add(part);
                }
            }
            Some(_) => {
                return Err(bad_field(
                    format_args!("messages[{i}].content"),
                    "a string or an array of content parts",
                ))
            }
        }
        match m.get("name") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => {
                tokens = tokens.saturating_add(TOKENS_PER_NAME + c.text(s));
            }
            Some(_) => return Err(bad_field(format_args!("messages[{i}].name"), "a string")),
        }
        match m.get("tool_calls") {
            None | Some(Json::Null) => {}
            Some(Json::Array(calls)) => {
                for call in calls {
                    tokens = tokens
                        .saturating_add(TOKENS_PER_TOOL_CALL)
                        .saturating_add(self.strings(call, 0, c));
                }
            }
            Some(_) => {
                return Err(bad_field(
                    format_args!("messages[{i}].tool_calls"),
                    "an array",
                ))
            }
        }
        if let Some(call) = m.get("function_call") {
            tokens = tokens.saturating_add(self.strings(call, 0, c));
        }
        if let Some(Json::String(refusal)) = m.get("refusal") {
            tokens = tokens.saturating_add(c.text(refusal));
        }
        Ok(tokens)
    }

    /// One content part of a chat message or a responses input item; `at` names it in errors.
    fn part(&self, part: &Json<'_>, c: Counter, at: &dyn Fn() -> String) -> Result<u64, CostError> {
        let Some(p) = part.as_object() else {
            return Err(bad_field(at(), "a content part object"));
        };
        match p.get("type").and_then(Json::as_str) {
            Some("text" | "input_text" | "output_text") => match p.get("text") {
                Some(Json::String(s)) => Ok(c.text(s)),
                _ => Err(bad_field(format_args!("{}.text", at()), "a string")),
            },
            Some("image_url" | "input_image" | "image") => {
                let detail = p
                    .get("image_url")
                    .and_then(|u| u.get("detail"))
                    .or_else(|| p.get("detail"))
                    .and_then(Json::as_str);
                Ok(if detail == Some("low") {
                    self.image_low
                } else {
                    self.image_high
                })
            }
            _ => Ok(self.strings(part, 0, c)),
        }
    }

    /// The output reservation of chat (and unknown endpoints, which also read
    /// `max_output_tokens`).
    fn chat_output(&self, body: &Object<'_>, any: bool) -> Result<u64, CostError> {
        let model = model(body)?;
        let n = choices(body, "n")?;
        let completion = opt_u64(body, "max_completion_tokens")?;
        let max_tokens = opt_u64(body, "max_tokens")?;
        let max_output = if any {
            opt_u64(body, "max_output_tokens")?
        } else {
            None
        };
        let per_choice = completion
            .or(max_tokens)
            .or(max_output)
            .unwrap_or_else(|| self.default_for(model));
        Ok(per_choice.saturating_mul(n))
    }

    fn completions(&self, body: &Object<'_>, c: Counter) -> Result<Cost, CostError> {
        let (mut input, prompts) = match body.get("prompt") {
            None | Some(Json::Null) => (1, 1),
            Some(prompt) => token_inputs(prompt, "prompt", c)?,
        };
        match body.get("suffix") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => input = input.saturating_add(c.text(s)),
            Some(_) => return Err(bad_field("suffix", "a string")),
        }
        let max_tokens =
            opt_u64(body, "max_tokens")?.unwrap_or(Self::COMPLETIONS_DEFAULT_MAX_TOKENS);
        let choices = choices(body, "n")?.max(choices(body, "best_of")?);
        let output = max_tokens.saturating_mul(choices).saturating_mul(prompts);
        Ok(Cost::new(input, output))
    }

    fn embeddings(body: &Object<'_>, c: Counter) -> Result<Cost, CostError> {
        match body.get("input") {
            None | Some(Json::Null) => Err(bad_field("input", TOKEN_INPUT_SHAPES)),
            Some(input) => Ok(Cost::new(token_inputs(input, "input", c)?.0, 0)),
        }
    }

    fn responses(&self, body: &Object<'_>, c: Counter) -> Result<Cost, CostError> {
        let mut input = REPLY_PRIMER;
        match body.get("input") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => {
                input = input.saturating_add(TOKENS_PER_MESSAGE + c.text(s));
            }
            Some(Json::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    input = input.saturating_add(self.response_item(item, i, c)?);
                }
            }
            Some(_) => return Err(bad_field("input", "a string or an array of input items")),
        }
        match body.get("instructions") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => {
                input = input.saturating_add(TOKENS_PER_MESSAGE + c.text(s));
            }
            Some(_) => return Err(bad_field("instructions", "a string")),
        }
        input = input.saturating_add(definitions(body, "tools", c)?);
        if let Some(format) = body.get("text").and_then(|t| t.get("format")) {
            if format.get("schema").is_some() {
                input = input.saturating_add(c.json(format));
            }
        }
        let model = model(body)?;
        let output = opt_u64(body, "max_output_tokens")?.unwrap_or_else(|| self.default_for(model));
        Ok(Cost::new(input, output))
    }

    fn response_item(&self, item: &Json<'_>, i: usize, c: Counter) -> Result<u64, CostError> {
        let Some(m) = item.as_object() else {
            return Err(bad_field(format_args!("input[{i}]"), "an object"));
        };
        let content = match m.get("content") {
            // Function calls, their outputs, reasoning summaries...: their text fields.
            None => self.strings(item, 0, c),
            Some(Json::Null) => 0,
            Some(Json::String(s)) => c.text(s),
            Some(Json::Array(parts)) => {
                let mut tokens = 0u64;
                for (j, part) in parts.iter().enumerate() {
                    let part = self.part(part, c, &|| format!("input[{i}].content[{j}]"))?;
                    tokens = tokens.saturating_add(part);
                }
                tokens
            }
            Some(_) => {
                return Err(bad_field(
                    format_args!("input[{i}].content"),
                    "a string or an array of content parts",
                ))
            }
        };
        Ok(TOKENS_PER_MESSAGE.saturating_add(content))
    }

    fn other(&self, body: &Json<'_>, c: Counter) -> Result<Cost, CostError> {
        let input = self.strings(body, 0, c);
        let output = match body.as_object() {
            Some(body) => self.chat_output(body, true)?,
            None => self.default_output,
        };
        Ok(Cost::new(input, output))
    }

    /// The text of every string in `v` (not under [`METADATA_KEYS`]); attachments count
    /// [`attachment_tokens`](Self::attachment_tokens) each.
    fn strings(&self, v: &Json<'_>, depth: usize, c: Counter) -> u64 {
        match v {
            Json::String(s) if is_blob(s) => self.attachment,
            Json::String(s) => c.text(s),
            Json::Array(items) if depth < MAX_DEPTH => items.iter().fold(0, |sum, item| {
                sum.saturating_add(self.strings(item, depth + 1, c))
            }),
            Json::Object(fields) if depth < MAX_DEPTH => fields
                .iter()
                .filter(|(k, _)| !METADATA_KEYS.contains(k))
                .fold(0, |sum, (_, item)| {
                    sum.saturating_add(self.strings(item, depth + 1, c))
                }),
            _ => 0,
        }
    }
}

impl CostEstimator for OpenAiTokens {
    fn estimate(&self, req: &RequestView<'_>) -> Result<Cost, CostError> {
        let Some(body) = req.doc() else {
            return Err(CostError::bad_request(
                "the request body must be JSON (an OpenAI-style request object)",
            ));
        };
        let body: &Json<'_> = &body;
        let endpoint = Endpoint::of(req.uri().path());
        let c = self.counter(body);
        if endpoint == Endpoint::Other {
            return self.other(body, c);
        }
        let Some(fields) = body.as_object() else {
            return Err(CostError::bad_request(
                "the request body must be a JSON object",
            ));
        };
        match endpoint {
            Endpoint::Chat => self.chat(fields, c),
            Endpoint::Completions => self.completions(fields, c),
            Endpoint::Embeddings => Self::embeddings(fields, c),
            Endpoint::Responses => self.responses(fields, c),
            Endpoint::Other => self.other(body, c),
        }
    }

    fn needs_body(&self) -> bool {
        true
    }
}

/// How one request's text is counted; chosen once per request from its `model`. Without the
/// `tokenizer` feature it has one variant and no size, and every count is a direct call of
/// [`estimate_text_tokens`].
#[derive(Clone, Copy)]
enum Counter {
    /// [`estimate_text_tokens`].
    Heuristic,
    /// The model's own tokenizer.
    #[cfg(feature = "tokenizer")]
    Exact(&'static tiktoken_rs::CoreBPE),
}

impl Counter {
    /// The tokens of a string of the body.
    #[inline(always)]
    fn text(self, text: &str) -> u64 {
        match self {
            Self::Heuristic => estimate_text_tokens(text),
            #[cfg(feature = "tokenizer")]
            Self::Exact(bpe) => tokenizer::count(bpe, text),
        }
    }

    /// The tokens of `v` serialized as JSON (see [`feed_json`]).
    fn json(self, v: &Json<'_>) -> u64 {
        match self {
            Self::Heuristic => json_tokens(v),
            #[cfg(feature = "tokenizer")]
            Self::Exact(bpe) => {
                let mut text = String::new();
                feed_json(&mut text, v, 0);
                tokenizer::count(bpe, &text)
            }
        }
    }
}

/// The API a request is for, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Endpoint {
    fn of(path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Self::Chat
        } else if path.ends_with("/completions") {
            Self::Completions
        } else if path.ends_with("/embeddings") {
            Self::Embeddings
        } else if path.ends_with("/responses") {
            Self::Responses
        } else {
            Self::Other
        }
    }
}

/// "`field` must be what".
fn bad_field(field: impl fmt::Display, what: &str) -> CostError {
    CostError::bad_request(format!("`{field}` must be {what}"))
}

/// An optional non-negative integer field (`null` counts as absent).
fn opt_u64(body: &Object<'_>, field: &str) -> Result<Option<u64>, CostError> {
    match body.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad_field(field, "a non-negative integer")),
    }
}

/// `n` or `best_of`: 1 when absent, at most [`OpenAiTokens::MAX_N`].
fn choices(body: &Object<'_>, field: &str) -> Result<u64, CostError> {
    match body.get(field) {
        None | Some(Json::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(n.min(OpenAiTokens::MAX_N)),
            _ => Err(bad_field(field, "a positive integer")),
        },
    }
}

/// The body's `model`, if a string.
fn model<'b>(body: &'b Object<'_>) -> Result<Option<&'b str>, CostError> {
    match body.get("model") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(m)) => Ok(Some(m)),
        Some(_) => Err(bad_field("model", "a string")),
    }
}

/// `tools` or `functions`: the serialized JSON of the definitions.
fn definitions(body: &Object<'_>, field: &str, c: Counter) -> Result<u64, CostError> {
    match body.get(field) {
        None | Some(Json::Null) => Ok(0),
        Some(Json::Array(defs)) if defs.is_empty() => Ok(0),
        Some(defs @ Json::Array(_)) => Ok(c.json(defs)),
        Some(_) => Err(bad_field(field, "an array")),
    }
}

/// A completions `prompt` or embeddings `input`: (tokens, number of prompts in the batch).
fn token_inputs(v: &Json<'_>, field: &str, c: Counter) -> Result<(u64, u64), CostError> {
    let bad = || bad_field(field, TOKEN_INPUT_SHAPES);
    let Json::Array(items) = v else {
        return match v {
            Json::String(s) => Ok((c.text(s), 1)),
            _ => Err(bad()),
        };
    };
    match items.first() {
        None => Ok((0, 0)),
        Some(Json::Number(_)) => {
            if items.iter().all(Json::is_u64) {
                Ok((len_u64(items.len()), 1))
            } else {
                Err(bad())
            }
        }
        Some(_) => items
            .iter()
            .try_fold((0u64, 0u64), |(tokens, count), item| {
                let t = match item {
                    Json::String(s) => c.text(s),
                    Json::Array(ids) if ids.iter().all(Json::is_u64) => len_u64(ids.len()),
                    _ => return Err(bad()),
                };
                Ok((tokens.saturating_add(t), count.saturating_add(1)))
            }),
    }
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// A `data:` URL or a base64 string, long enough to be a file rather than text.
fn is_blob(s: &str) -> bool {
    s.len() >= BLOB_MIN_LEN
        && (s.starts_with("data:")
            || s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
            }))
}

/// The estimate of `v` serialized as JSON, without allocating: its strings, keys, numbers and
/// punctuation fed to one [`TextCounter`].
fn json_tokens(v: &Json<'_>) -> u64 {
    let mut counter = TextCounter::new();
    feed_json(&mut counter, v, 0);
    counter.finish()
}

/// Writes `v` as compact JSON, strings unescaped (the model reads the text, not its escapes),
/// at most [`MAX_DEPTH`] levels deep. Writing to a [`TextCounter`] or a `String` never fails,
/// so write results are ignored.
fn feed_json<W: fmt::Write>(w: &mut W, v: &Json<'_>, depth: usize) {
    match v {
        Json::Null => put(w, "null"),
        Json::Bool(true) => put(w, "true"),
        Json::Bool(false) => put(w, "false"),
        Json::Number(n) => {
            let _ = w.write_fmt(format_args!("{n}"));
        }
        Json::String(s) => {
            put(w, "\"");
            put(w, s);
            put(w, "\"");
        }
        Json::Array(items) => {
            put(w, "[");
            if depth < MAX_DEPTH {
                for (k, item) in items.iter().enumerate() {
                    if k > 0 {
                        put(w, ",");
                    }
                    feed_json(w, item, depth + 1);
                }
            }
            put(w, "]");
        }
        Json::Object(fields) => {
            put(w, "{");
            if depth < MAX_DEPTH {
                // In key order, as a `serde_json::Value` (a sorted map) serializes.
                for (k, (key, item)) in fields.sorted().into_iter().enumerate() {
                    put(w, if k > 0 { ",\"" } else { "\"" });
                    put(w, key);
                    put(w, "\":");
                    feed_json(w, item, depth + 1);
                }
            }
            put(w, "}");
        }
    }
}

#[inline(always)]
fn put<W: fmt::Write>(w: &mut W, s: &str) {
    let _ = w.write_str(s);
}
