//! What one request costs.
//!
//! A request rule charges 1 per request. A token rule ([`crate::Quota::tokens`]) charges what
//! the layer's [`CostEstimator`] says the request will cost, **before** the request is
//! admitted, so concurrent requests can't overshoot a tokens-per-minute limit. The charge can
//! be corrected afterwards through [`crate::store::Store::settle`] with the real usage, which
//! [`usage::UsageParser`] reads from the response body as it streams past.
//!
//! | built-in | estimate |
//! |---|---|
//! | [`openai()`] | OpenAI-compatible request bodies (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`): prompt tokens by a fast heuristic, output reserved as `max_tokens x n` |
//! | [`extension`] | a [`TokenEstimate`] an earlier layer put in the request extensions |
//! | [`from_fn`] | a closure over the request |
//!
//! An estimator that can't estimate answers a [`CostError`]: the request is rejected with its
//! status (400 by default) and a JSON body, and nothing is charged.
//!
//! # Examples
//!
//! ```
//! use http::Request;
//! use tower_llm_ratelimit::cost::{self, CostEstimator, TokenEstimate};
//! use tower_llm_ratelimit::key::RequestView;
//!
//! let mut req = Request::new(());
//! req.extensions_mut().insert(TokenEstimate(1_200));
//! let est = cost::extension();
//! assert_eq!(est.estimate(&RequestView::from_request(&req)).unwrap().tokens(), 1_200);
//!
//! // From a header set by the client, defaulting to 1,000 tokens.
//! let est = cost::from_fn(|req| {
//!     Some(req.headers().get("x-max-tokens")
//!         .and_then(|v| v.to_str().ok()?.parse().ok())
//!         .unwrap_or(1_000))
//! });
//! let req = Request::new(());
//! assert_eq!(est.estimate(&RequestView::from_request(&req)).unwrap().tokens(), 1_000);
//! ```

use std::collections::HashMap;
use std::fmt;

use http::StatusCode;

use crate::key::RequestView;

pub mod usage;

mod openai;
pub use self::openai::{estimate_text_tokens, openai, OpenAiTokens};

/// The estimated cost of one request, in tokens: what the prompt takes (input) and what the
/// answer may take (output, usually the reservation `max_tokens x n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Cost {
    input_tokens: u64,
    output_tokens: u64,
}

impl Cost {
    /// A cost of `tokens` tokens in all (counted as input).
    pub const fn tokens_of(tokens: u64) -> Self {
        Self::new(tokens, 0)
    }

    /// A cost of `input_tokens` prompt tokens and `output_tokens` reserved for the answer.
    pub const fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
        }
    }

    /// All tokens: input plus output.
    pub const fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Prompt tokens.
    pub const fn input_tokens(&self) -> u64 {
        self.input_tokens
    }

    /// Output tokens reserved.
    pub const fn output_tokens(&self) -> u64 {
        self.output_tokens
    }
}

/// Why a request's cost could not be estimated; answered to the client as a JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostError {
    /// The response status (400 unless the estimator says otherwise).
    pub status: StatusCode,
    /// What is wrong, for the client.
    pub message: String,
}

impl CostError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl fmt::Display for CostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for CostError {}

/// Estimates what a request costs, before it is admitted.
pub trait CostEstimator: Send + Sync + 'static {
    /// The cost of `req`.
    fn estimate(&self, req: &RequestView<'_>) -> Result<Cost, CostError>;

    /// True when the estimate reads the request body ([`RequestView::json`]): the layer then
    /// buffers the body (bounded) before deciding.
    fn needs_body(&self) -> bool {
        false
    }
}

/// A token estimate as a request extension. See [`extension`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate(pub u64);

/// Reads [`TokenEstimate`]. See [`extension`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FromExtension(());

/// The [`TokenEstimate`] an earlier layer stored in the request extensions; a request without
/// one is answered 400.
pub fn extension() -> FromExtension {
    FromExtension(())
}

impl CostEstimator for FromExtension {
    fn estimate(&self, req: &RequestView<'_>) -> Result<Cost, CostError> {
        req.extensions()
            .get::<TokenEstimate>()
            .map(|t| Cost::tokens_of(t.0))
            .ok_or_else(|| CostError::bad_request("the request carries no token estimate"))
    }
}

/// Tokens computed by a closure. See [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
    reads_body: bool,
}

/// The tokens `f` returns; `None` answers 400 ("could not estimate the token cost").
pub fn from_fn<F>(f: F) -> FromFn<F>
where
    F: Fn(&RequestView<'_>) -> Option<u64> + Send + Sync + 'static,
{
    FromFn {
        f,
        reads_body: false,
    }
}

impl<F> FromFn<F> {
    /// The closure reads the body ([`RequestView::json`], [`RequestView::body`]): the layer
    /// buffers and parses it before calling the closure.
    pub fn reading_body(mut self) -> Self {
        self.reads_body = true;
        self
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cost::FromFn")
    }
}

impl<F> CostEstimator for FromFn<F>
where
    F: Fn(&RequestView<'_>) -> Option<u64> + Send + Sync + 'static,
{
    fn estimate(&self, req: &RequestView<'_>) -> Result<Cost, CostError> {
        (self.f)(req).map(Cost::tokens_of).ok_or_else(|| {
            CostError::bad_request("could not estimate the token cost of the request")
        })
    }

    fn needs_body(&self) -> bool {
        self.reads_body
    }
}

/// Per-model prices of input and output tokens, for rules that count [`crate::Unit::Cost`]:
/// a request's cost units are `ceil(input x input_weight + output x output_weight)` for its
/// model (the body's `model` field), or the default weights for models not listed.
///
/// # Examples
///
/// A daily budget of $50 per API key, counted in micro-dollars, with prices per token:
///
/// ```
/// use tower_llm_ratelimit::cost::Weights;
/// use tower_llm_ratelimit::{key, Quota, Rule};
///
/// // $2.50 / $10 per million tokens = 2.5 / 10 micro-dollars per token.
/// let prices = Weights::new(1.0, 4.0)
///     .model("gpt-4o", 2.5, 10.0)
///     .model("gpt-4o-mini", 0.15, 0.6);
/// assert_eq!(prices.weigh(Some("gpt-4o"), 1_000, 500), 7_500);
/// assert_eq!(prices.weigh(Some("unknown"), 1_000, 500), 3_000);
///
/// let budget = Rule::new("daily-spend", key::bearer_token(), Quota::per_day(50_000_000).cost_units());
/// # let _ = budget;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    default: (f64, f64),
    models: HashMap<String, (f64, f64)>,
}

impl Default for Weights {
    /// Every token weighs 1.
    fn default() -> Self {
        Self::new(1.0, 1.0)
    }
}

impl Weights {
    /// Weights for models not listed: `input` per input token, `output` per output token.
    /// Negative or non-finite weights count as 0.
    pub fn new(input: f64, output: f64) -> Self {
        Self {
            default: (sane(input), sane(output)),
            models: HashMap::new(),
        }
    }

    /// Weights for `model`.
    pub fn model(mut self, model: impl Into<String>, input: f64, output: f64) -> Self {
        self.models
            .insert(model.into(), (sane(input), sane(output)));
        self
    }

    /// The cost units of `input` and `output` tokens of `model`, rounded up. A result within
    /// one part in 10^12 of a whole number is that number: prices such as 0.1 are not exact in
    /// binary, and `0.1 x 24 + 0.3 x 2` comes out a hair above 3.
    pub fn weigh(&self, model: Option<&str>, input: u64, output: u64) -> u64 {
        let (wi, wo) = model
            .and_then(|m| self.models.get(m))
            .copied()
            .unwrap_or(self.default);
        let units = input as f64 * wi + output as f64 * wo;
        // Two products and a sum err by a few parts in 10^16 (IEEE 754 rounds each operation
        // to within half an ulp); 10^-12 leaves a wide margin above that and far below the
        // smallest fraction a price with up to 6 decimals can leave on a count under 10^6.
        let whole = units.round();
        let units = if (units - whole).abs() <= whole * 1e-12 {
            whole
        } else {
            units.ceil()
        };
        // `as` saturates for floats: huge values give u64::MAX, never wrap.
        units as u64
    }
}

fn sane(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 {
        w
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::Weights;

    /// Cost units at 0.1 and 0.3 a token, worked out in integers: ceil((input + 3 output) / 10).
    fn tenths(input: u64, output: u64) -> u64 {
        (input + 3 * output).div_ceil(10)
    }

    #[test]
    fn prices_not_exact_in_binary_round_up_only_real_fractions() {
        let w = Weights::new(0.1, 0.3);
        // 0.1 x 24 + 0.3 x 2 is 3.0000000000000004 in f64: 3 units, not 4.
        assert_eq!(w.weigh(None, 24, 2), 3);
        for input in 0..500 {
            for output in 0..60 {
                assert_eq!(
                    w.weigh(None, input, output),
                    tenths(input, output),
                    "{input} {output}"
                );
            }
        }
        let w = Weights::new(0.15, 0.6);
        assert_eq!(w.weigh(None, 20, 0), 3);
        assert_eq!(w.weigh(None, 1, 0), 1);
        assert_eq!(w.weigh(None, 1_000_001, 0), 150_001); // 150000.15
        assert_eq!(w.weigh(None, 0, 0), 0);
        assert_eq!(
            Weights::new(1e300, 1e300).weigh(None, u64::MAX, u64::MAX),
            u64::MAX
        );
    }
}
