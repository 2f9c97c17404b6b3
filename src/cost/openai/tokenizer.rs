//! Exact token counts with OpenAI's tokenizers (feature `tokenizer`), for
//! [`super::OpenAiTokens`].
//!
//! The vocabularies are `tiktoken-rs`'s, compiled into the binary (no network, no files) and
//! loaded once, on first use, by its singletons: `o200k_base` takes about 250 ms and 45 MB,
//! `cl100k_base` about 130 ms and 23 MB (release build). Each text is then tokenized like
//! OpenAI does (`encode_ordinary`: special-token markup such as `<|endoftext|>` in a prompt is
//! counted as the text it is).
//!
//! Texts longer than [`SEGMENT_BYTES`] are tokenized in segments, cut where the tokenizers'
//! pre-tokenization always splits (see [`cut`]), so the count stays exact; only a run of
//! [`SEGMENT_BYTES`] without such a place (a single huge "word", base64 without line breaks,
//! a whitespace run) is cut anywhere, which may change its count by a token. This bounds the
//! work of each tokenizer call: unbounded runs make the tokenizer's regex engine fail, which
//! `tiktoken-rs` turns into a panic (a few MB of `"\t "` does it).

use tiktoken_rs::CoreBPE;

/// The longest text given to the tokenizer in one call.
const SEGMENT_BYTES: usize = 8 * 1024;

/// An OpenAI tokenizer vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vocabulary {
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o-series.
    O200k,
    /// GPT-4, GPT-3.5, text-embedding-3, text-embedding-ada-002.
    Cl100k,
}

/// Models (by prefix of the body's `model`) that use `o200k_base`.
const O200K_MODELS: [&str; 8] = [
    "gpt-4o",
    "chatgpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
];

/// Models (by prefix) that use `cl100k_base`; `gpt-4` itself is matched exactly, other GPT-4
/// models by `gpt-4-`, so `gpt-4o` and `gpt-4.1` are not.
const CL100K_MODELS: [&str; 4] = ["gpt-4-", "gpt-3.5", "gpt-35-", "text-embedding-3"];

impl Vocabulary {
    /// The vocabulary of `model`, a body's `model` (a fine-tune's `ft:` prefix ignored);
    /// `None` for models whose tokenizer is unknown.
    pub(super) fn of(model: &str) -> Option<Self> {
        let model = model.strip_prefix("ft:").unwrap_or(model);
        if O200K_MODELS.iter().any(|p| model.starts_with(p)) {
            Some(Self::O200k)
        } else if matches!(model, "gpt-4" | "text-embedding-ada-002")
            || CL100K_MODELS.iter().any(|p| model.starts_with(p))
        {
            Some(Self::Cl100k)
        } else {
            None
        }
    }

    /// The tokenizer, loaded on first use.
    pub(super) fn bpe(self) -> &'static CoreBPE {
        match self {
            Self::O200k => tiktoken_rs::o200k_base_singleton(),
            Self::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        }
    }
}

/// The tokenizer of `model`, if known.
pub(super) fn for_model(model: &str) -> Option<&'static CoreBPE> {
    Vocabulary::of(model).map(Vocabulary::bpe)
}

/// The tokens of `text`.
pub(super) fn count(bpe: &CoreBPE, text: &str) -> u64 {
    count_in(bpe, text, SEGMENT_BYTES)
}

/// The tokens of `text`, tokenized in segments of at most `max` bytes (one character more when
/// `max` is smaller than a character).
fn count_in(bpe: &CoreBPE, text: &str, max: usize) -> u64 {
    let mut total = 0u64;
    let mut rest = text;
    while rest.len() > max {
        let (head, tail) = rest.split_at(cut(rest, max).0);
        total = total.saturating_add(tokens(bpe, head));
        rest = tail;
    }
    total.saturating_add(tokens(bpe, rest))
}

fn tokens(bpe: &CoreBPE, text: &str) -> u64 {
    u64::try_from(bpe.count_ordinary(text)).unwrap_or(u64::MAX)
}

/// Where to cut `text` (longer than `max` bytes) so that the first part is at most `max` bytes
/// and not empty, and whether the cut is exact.
///
/// Exact: before the last space (U+0020) that follows a non-whitespace character. Both
/// tokenizers split there, whatever surrounds it: in their pre-tokenization patterns a space
/// can only be the first character of a piece that is not all whitespace, and whitespace
/// pieces hold nothing else; so no piece holds a non-whitespace character followed by a space.
/// The patterns look ahead (`\s+(?!\S)`, `\s+$`) only past whitespace, which never ends a
/// first part. Otherwise the cut is at the last character boundary, and may change the count.
fn cut(text: &str, max: usize) -> (usize, bool) {
    debug_assert!(text.len() > max);
    let bytes = text.as_bytes();
    let mut i = max;
    while i > 0 {
        // `bytes[i]` is a space, so `i` is a character boundary.
        if bytes[i] == b' '
            && !text[..i]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace)
        {
            return (i, true);
        }
        i -= 1;
    }
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    if at == 0 {
        at = text.chars().next().map_or(text.len(), char::len_utf8);
    }
    (at, false)
}

#[cfg(test)]
mod tests {
    use super::super::{estimate_text_tokens, openai, CostEstimator, OpenAiTokens, RequestView};
    use super::*;

    use bytes::Bytes;
    use http::Request;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn o200k() -> &'static CoreBPE {
        Vocabulary::O200k.bpe()
    }

    fn cl100k() -> &'static CoreBPE {
        Vocabulary::Cl100k.bpe()
    }

    #[test]
    fn models_map_to_their_vocabulary() {
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-08-06",
            "chatgpt-4o-latest",
            "gpt-4.1",
            "gpt-4.1-nano",
            "gpt-4.5-preview",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.1",
            "o1",
            "o1-mini",
            "o3",
            "o3-mini",
            "o4-mini",
            "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        ] {
            assert_eq!(Vocabulary::of(model), Some(Vocabulary::O200k), "{model}");
        }
        for model in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-4-0613",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "gpt-3.5-turbo-0125",
            "gpt-35-turbo",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
            "ft:gpt-3.5-turbo:acme::xyz",
        ] {
            assert_eq!(Vocabulary::of(model), Some(Vocabulary::Cl100k), "{model}");
        }
        for model in [
            "",
            "gpt-4x",
            "gpt4o",
            "GPT-4O",
            "claude-3-5-sonnet",
            "llama-3.1-70b",
            "mistral-large",
            "text-embedding-ada-001",
            "davinci-002",
        ] {
            assert_eq!(Vocabulary::of(model), None, "{model}");
        }
    }

    /// Sums over exact cuts equal the whole count: segmenting is invisible.
    fn assert_segments_exact(text: &str, max: usize) {
        for bpe in [o200k(), cl100k()] {
            let mut rest = text;
            let mut sum = 0;
            let mut exact = true;
            while rest.len() > max {
                let (at, ok) = cut(rest, max);
                assert!(at > 0 && rest.is_char_boundary(at));
                assert!(at <= max || !ok);
                exact &= ok;
                sum += tokens(bpe, &rest[..at]);
                rest = &rest[at..];
            }
            sum += tokens(bpe, rest);
            assert_eq!(sum, count_in(bpe, text, max));
            if exact {
                assert_eq!(sum, tokens(bpe, text), "{text:?} in segments of {max}");
            }
        }
    }

    #[test]
    fn segments_are_cut_where_the_tokenizers_split() {
        let texts = [
            "Hello  world, it's  a test.\n\n  Indented\tline  ",
            "foo   bar\u{a0} baz\u{3000} qux  \n  end  ",
            "a 1 22 333 4444 55555 ... !!! ??? 'll 's 've",
            "fn main() {\n    let x = 1;  // two  spaces\n}\n",
            "Grüße  aus  Köln — “quoted”  ¿qué?  привет  мир",
            "中文 字符 测试  日本語 テキスト 한국어  텍스트",
            "   leading spaces and trailing   ",
            "x\r\n y \r\n\r\n z /path /to\n/file",
        ];
        for text in texts {
            for max in 1..text.len() {
                assert_segments_exact(text, max);
            }
        }
        // Prose is cut exactly at every segment size worth using.
        let prose = "Rate limiting keeps usage fair.  It reserves tokens first. ".repeat(40);
        for max in [16, 64, 500] {
            let mut rest = prose.as_str();
            while rest.len() > max {
                let (at, exact) = cut(rest, max);
                assert!(exact);
                rest = &rest[at..];
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_texts_segment_exactly(
            text in "[a-zA-Z0-9 \t\r\n.,;:!?'\"(){}_=+/-]{0,60}|[a-zA-Zéüßжя中文한글🎉 \u{a0}\u{2003}\u{3000}\t\n0-9.'-]{0,40}",
            max in 1usize..24,
        ) {
            assert_segments_exact(&text, max);
        }
    }

    /// Run with `cargo test --release --features tokenizer --lib cost::openai::tokenizer --
    /// --ignored`: `tiktoken-rs` alone panics on the first of these (regex stack overflow).
    #[test]
    #[ignore = "slow in debug builds (seconds of tokenizing)"]
    fn pathological_texts_count_without_panicking() {
        for (text, o200k_tokens) in [
            ("\t ".repeat(1_500_000), 1_500_000),
            ("a".repeat(3_000_000), 375_000),
            (" ".repeat(3_000_000), 23_438),
        ] {
            let start = std::time::Instant::now();
            let n = count(o200k(), &text);
            eprintln!("{} bytes: {n} tokens in {:?}", text.len(), start.elapsed());
            assert!(n.abs_diff(o200k_tokens) <= o200k_tokens / 100, "{n}");
            count(cl100k(), &text);
        }
    }

    fn chat(model: &str, content: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1})
    }

    fn input(est: &OpenAiTokens, path: &str, body: &Value) -> u64 {
        let req = Request::post(path).body(()).unwrap();
        let bytes = Bytes::from(body.to_string());
        let view = RequestView::from_request(&req).with_body(&bytes, Some(body));
        est.estimate(&view).unwrap().input_tokens()
    }

    #[test]
    fn the_estimator_counts_exactly_for_known_models() {
        let text = "速率限制可以保护服务免于过载，并确保客户之间的公平使用。";
        let (o, c, h) = (
            count(o200k(), text),
            count(cl100k(), text),
            estimate_text_tokens(text),
        );
        assert_ne!(o, c);
        let frame = 3 + 4; // reply primer, one message
        let chat_path = "/v1/chat/completions";
        let est = openai();
        assert_eq!(
            input(&est, chat_path, &chat("gpt-4o-mini", text)),
            frame + o
        );
        assert_eq!(
            input(&est, chat_path, &chat("gpt-4-turbo", text)),
            frame + c
        );
        assert_eq!(input(&est, chat_path, &chat("llama-3", text)), frame + h);
        let body = json!({"messages": [{"role": "user", "content": text}]});
        assert_eq!(input(&est, chat_path, &body), frame + h);
        let heuristic = openai().exact_tokens(false);
        assert_eq!(
            input(&heuristic, chat_path, &chat("gpt-4o", text)),
            frame + h
        );

        // Every text the estimate reads: names, content parts, tool calls and definitions,
        // prompts, inputs, instructions.
        let tool = json!({"type": "function", "function": {"name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let body = json!({"model": "gpt-4o", "tools": [tool], "messages": [
            {"role": "user", "name": "alice", "content": [{"type": "text", "text": text}]},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}
        ]});
        let n = |s: &str| count(o200k(), s);
        let mut defs = String::new();
        super::super::feed_json(
            &mut defs,
            &crate::document::Json::from_value(&json!([tool])),
            0,
        );
        assert_eq!(defs, json!([tool]).to_string());
        let expected = 3
            + 4
            + 1
            + n("alice")
            + n(text)
            + 4
            + 3
            + n("get_weather")
            + n("{\"city\":\"Paris\"}")
            + n(&defs);
        assert_eq!(input(&est, chat_path, &body), expected);
        let c = |s: &str| count(cl100k(), s);
        let body = json!({"model": "text-embedding-3-small", "input": [text, "hello world"]});
        assert_eq!(
            input(&est, "/v1/embeddings", &body),
            c(text) + c("hello world")
        );
        let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": text, "suffix": "end"});
        assert_eq!(input(&est, "/v1/completions", &body), c(text) + c("end"));
        let body = json!({"model": "o3", "instructions": "Be brief.", "input": text});
        assert_eq!(
            input(&est, "/v1/responses", &body),
            3 + 4 + n("Be brief.") + 4 + n(text)
        );
        // Other endpoints: every string but identifiers (`model` among them).
        let body = json!({"model": "gpt-5", "prompt": text});
        assert_eq!(input(&est, "/generate", &body), n(text));
    }

    // ---- The heuristic's error against the tokenizers, on generated prompts. ----

    /// SplitMix64: deterministic, so the table in the module docs can be reproduced.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }

        fn chance(&mut self, one_in: usize) -> bool {
            self.below(one_in) == 0
        }
    }

    const ENGLISH: &[&str] = &[
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "with",
        "as",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "from",
        "at",
        "or",
        "an",
        "have",
        "not",
        "they",
        "which",
        "one",
        "you",
        "all",
        "their",
        "has",
        "more",
        "can",
        "will",
        "about",
        "when",
        "there",
        "been",
        "would",
        "time",
        "service",
        "request",
        "limit",
        "model",
        "tokens",
        "customer",
        "server",
        "window",
        "minute",
        "usage",
        "quota",
        "answer",
        "data",
        "system",
        "first",
        "other",
        "because",
        "between",
        "through",
        "people",
        "language",
        "during",
        "without",
        "important",
        "however",
        "information",
        "available",
        "different",
        "following",
        "government",
        "development",
        "understanding",
        "we",
        "our",
        "should",
        "each",
        "small",
    ];
    const GERMAN: &[&str] = &[
        "der",
        "die",
        "das",
        "und",
        "ist",
        "nicht",
        "ein",
        "eine",
        "zu",
        "mit",
        "von",
        "für",
        "auf",
        "den",
        "dem",
        "sich",
        "auch",
        "es",
        "wird",
        "werden",
        "Anfrage",
        "Dienst",
        "Kunden",
        "Begrenzung",
        "Überlastung",
        "schützt",
        "Verteilung",
        "zwischen",
        "größer",
        "können",
        "müssen",
        "über",
        "Straße",
        "Schlüssel",
        "Gebühr",
        "Minute",
        "Zeitraum",
        "Verbrauch",
        "Antwort",
        "Modell",
        "Sprache",
        "während",
        "Entwicklung",
        "Regierung",
        "Geschwindigkeit",
        "wir",
        "unsere",
        "jeder",
        "klein",
        "heute",
        "Anwendung",
    ];
    const FRENCH: &[&str] = &[
        "le",
        "la",
        "les",
        "de",
        "des",
        "et",
        "est",
        "un",
        "une",
        "pour",
        "que",
        "qui",
        "dans",
        "avec",
        "sur",
        "pas",
        "plus",
        "être",
        "été",
        "très",
        "à",
        "où",
        "ça",
        "français",
        "l'utilisateur",
        "d'une",
        "requête",
        "service",
        "limite",
        "élevé",
        "système",
        "modèle",
        "réponse",
        "client",
        "données",
        "après",
        "déjà",
        "première",
        "façon",
        "problème",
        "entre",
        "pendant",
        "développement",
        "gouvernement",
        "nous",
        "chaque",
        "aujourd'hui",
    ];
    const SPANISH: &[&str] = &[
        "el",
        "la",
        "los",
        "las",
        "de",
        "y",
        "que",
        "en",
        "un",
        "una",
        "por",
        "para",
        "con",
        "no",
        "es",
        "se",
        "más",
        "está",
        "también",
        "año",
        "niño",
        "español",
        "petición",
        "servicio",
        "límite",
        "sistema",
        "modelo",
        "respuesta",
        "cliente",
        "información",
        "después",
        "según",
        "mañana",
        "pequeño",
        "compañía",
        "desarrollo",
        "gobierno",
        "nosotros",
        "cada",
        "hoy",
        "tiempo",
        "uso",
    ];
    const RUSSIAN: &[&str] = &[
        "и",
        "в",
        "не",
        "на",
        "что",
        "с",
        "по",
        "это",
        "как",
        "он",
        "она",
        "мы",
        "для",
        "от",
        "из",
        "но",
        "все",
        "так",
        "его",
        "только",
        "было",
        "запрос",
        "сервис",
        "ограничение",
        "скорости",
        "защищает",
        "перегрузки",
        "клиент",
        "модель",
        "ответ",
        "система",
        "данные",
        "минута",
        "пользователь",
        "время",
        "правительство",
        "развитие",
        "между",
        "после",
        "информация",
        "каждый",
        "сегодня",
    ];
    const CHINESE: &[&str] = &[
        "我们", "服务", "请求", "限制", "速率", "保护", "客户", "公平", "使用", "模型", "回答",
        "系统", "数据", "时间", "分钟", "今天", "中国", "发展", "政府", "问题", "因为", "所以",
        "但是", "可以", "没有", "已经", "一个", "这个", "什么", "他们", "工作", "学习", "生活",
        "经济", "社会", "技术", "网络", "用户", "信息", "安全", "的", "是", "在", "了", "和",
    ];
    const JAPANESE: &[&str] = &[
        "私",
        "は",
        "が",
        "の",
        "を",
        "に",
        "で",
        "と",
        "サービス",
        "リクエスト",
        "制限",
        "速度",
        "顧客",
        "公平",
        "使用",
        "モデル",
        "回答",
        "システム",
        "データ",
        "時間",
        "分",
        "今日",
        "日本",
        "します",
        "しました",
        "です",
        "ます",
        "ありません",
        "できる",
        "ために",
        "について",
        "コンピュータ",
        "東京",
        "経済",
        "社会",
        "技術",
        "利用者",
        "情報",
    ];
    const KOREAN: &[&str] = &[
        "서비스",
        "요청",
        "제한",
        "속도",
        "고객",
        "공정",
        "사용",
        "모델",
        "답변",
        "시스템",
        "데이터",
        "시간",
        "분",
        "오늘",
        "한국",
        "합니다",
        "했습니다",
        "입니다",
        "있습니다",
        "없습니다",
        "그리고",
        "하지만",
        "우리는",
        "사용자",
        "정부",
        "경제",
        "사회",
        "기술",
        "정보",
        "안전",
        "를",
        "이",
        "가",
        "은",
    ];
    const IDENT: &[&str] = &[
        "request", "limit", "token", "count", "window", "key", "store", "rule", "bucket", "cost",
        "user", "model", "body", "header", "value", "index", "total", "max", "min", "next", "buf",
        "len", "state", "config", "retry", "parse", "item", "result",
    ];

    /// Prose of about `len` bytes from `words`: sentences of 5-16 words with commas, the
    /// occasional number, paragraphs; `spaced` separates words with spaces (not Chinese and
    /// Japanese), `stop` and `comma` are the script's punctuation.
    fn prose(
        r: &mut Rng,
        words: &[&str],
        len: usize,
        spaced: bool,
        stop: &str,
        comma: &str,
    ) -> String {
        let mut out = String::new();
        while out.len() < len {
            for sentence in 0..3 + r.below(4) {
                if sentence > 0 && spaced {
                    out.push(' ');
                }
                let n = 5 + r.below(12);
                for i in 0..n {
                    if i > 0 && spaced {
                        out.push(' ');
                    }
                    let word = if r.chance(30) {
                        [
                            1 + r.below(9),
                            10 + r.below(90),
                            1990 + r.below(40),
                            1_000 + r.below(9_000),
                        ][r.below(4)]
                        .to_string()
                    } else {
                        r.pick(words).to_owned()
                    };
                    if i == 0 {
                        let mut chars = word.chars();
                        out.extend(chars.next().into_iter().flat_map(char::to_uppercase));
                        out.push_str(chars.as_str());
                    } else {
                        out.push_str(&word);
                    }
                    if i + 1 < n && r.chance(8) {
                        out.push_str(comma);
                    }
                }
                out.push_str(if r.chance(8) { "?" } else { stop });
            }
            out.push_str("\n\n");
        }
        out
    }

    fn ident(r: &mut Rng, camel: bool) -> String {
        let mut out = String::new();
        for i in 0..1 + r.below(3) {
            let part = r.pick(IDENT);
            if camel && i > 0 {
                out.push_str(&part[..1].to_uppercase());
                out.push_str(&part[1..]);
            } else {
                if i > 0 {
                    out.push('_');
                }
                out.push_str(part);
            }
        }
        out
    }

    fn type_name(r: &mut Rng) -> String {
        let name = ident(r, true);
        name[..1].to_uppercase() + &name[1..]
    }

    fn rust(r: &mut Rng, len: usize) -> String {
        let mut out = String::new();
        while out.len() < len {
            let (f, a, b, t) = (
                ident(r, false),
                ident(r, false),
                ident(r, false),
                type_name(r),
            );
            out += &format!("/// Returns the {} of the {}.\npub fn {f}({a}: &{t}, {b}: u32) -> Result<{t}, Error> {{\n", r.pick(IDENT), r.pick(IDENT));
            for _ in 0..2 + r.below(5) {
                let (x, y, m) = (ident(r, false), ident(r, false), ident(r, false));
                let n = r.below(1000);
                out += &match r.below(5) {
                    0 => format!("    let {x} = {a}.{m}({n});\n"),
                    1 => format!("    if {x} > {n} {{\n        return Err(Error::{}(\"{} {}\".to_string()));\n    }}\n", type_name(r), r.pick(ENGLISH), r.pick(ENGLISH)),
                    2 => format!("    for i in 0..{b} {{\n        {x}.push(i * {n});\n    }}\n"),
                    3 => format!("    let mut {x}: Vec<{t}> = Vec::with_capacity({n});\n"),
                    _ => format!("    {x}.{y} += {m}.len() as u64; // {} {}\n", r.pick(ENGLISH), r.pick(ENGLISH)),
                };
            }
            out += &format!("    Ok({t} {{ {a}, {b} }})\n}}\n\n");
        }
        out
    }

    fn python(r: &mut Rng, len: usize) -> String {
        let mut out = String::new();
        while out.len() < len {
            let (f, a, b) = (ident(r, false), ident(r, false), ident(r, false));
            out += &format!(
                "def {f}({a}, {b}=None):\n    \"\"\"{} {} {}.\"\"\"\n",
                r.pick(ENGLISH),
                r.pick(ENGLISH),
                r.pick(ENGLISH)
            );
            for _ in 0..2 + r.below(5) {
                let (x, m) = (ident(r, false), ident(r, false));
                let n = r.below(1000);
                out += &match r.below(4) {
                    0 => format!("    {x} = {a}.{m}({n})\n"),
                    1 => format!("    if {x} is None or {x} > {n}:\n        raise ValueError(f\"{{{x}}} is too large\")\n"),
                    2 => format!("    for i in range({n}):\n        {b}.append(i * {n})  # {}\n", r.pick(ENGLISH)),
                    _ => format!("    {x} = [{m} for {m} in {a} if {m}]\n"),
                };
            }
            out += &format!("    return {a}\n\n\n");
        }
        out
    }

    fn json_value(r: &mut Rng, depth: usize) -> Value {
        match r.below(if depth > 2 { 4 } else { 6 }) {
            0 => json!(r.below(100_000)),
            1 => json!(r.below(10_000) as f64 / 100.0),
            2 => json!(r.chance(2)),
            3 => {
                let n = 1 + r.below(8);
                Value::String(
                    (0..n)
                        .map(|_| r.pick(ENGLISH))
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            }
            4 => Value::Array(
                (0..1 + r.below(4))
                    .map(|_| json_value(r, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..1 + r.below(5))
                    .map(|_| {
                        let camel = r.chance(2);
                        (ident(r, camel), json_value(r, depth + 1))
                    })
                    .collect(),
            ),
        }
    }

    fn json_text(r: &mut Rng, len: usize, pretty: bool) -> String {
        let mut items = Vec::new();
        let mut size = 0;
        while size < len {
            let v = json_value(r, 1);
            size += v.to_string().len();
            items.push(v);
        }
        let v = json!({"id": format!("req_{}", r.next()), "items": items});
        if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            v.to_string()
        }
    }

    fn random_bytes(r: &mut Rng, n: usize) -> Vec<u8> {
        (0..n).map(|_| r.next() as u8).collect()
    }

    fn base64(r: &mut Rng, len: usize) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bytes = random_bytes(r, len * 3 / 4);
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn hex(r: &mut Rng, len: usize) -> String {
        let mut out = String::new();
        while out.len() < len {
            let b = random_bytes(r, 16);
            let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
            if r.chance(2) {
                // A UUID.
                out += &format!(
                    "{}-{}-{}-{}-{}\n",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                );
            } else {
                out += &h;
                out.push(' ');
            }
        }
        out
    }

    type Generator = fn(&mut Rng, usize) -> String;

    /// The categories of the accuracy table: (name, generator, bounds of estimate / o200k,
    /// bounds of estimate / cl100k).
    #[allow(clippy::type_complexity)]
    fn categories() -> Vec<(&'static str, Generator, (f64, f64), (f64, f64))> {
        vec![
            (
                "English prose",
                |r, n| prose(r, ENGLISH, n, true, ".", ","),
                (1.10, 1.40),
                (1.10, 1.40),
            ),
            (
                "German prose",
                |r, n| prose(r, GERMAN, n, true, ".", ","),
                (1.25, 1.70),
                (1.05, 1.30),
            ),
            (
                "French prose",
                |r, n| prose(r, FRENCH, n, true, ".", ","),
                (1.30, 1.70),
                (1.30, 1.60),
            ),
            (
                "Spanish prose",
                |r, n| prose(r, SPANISH, n, true, ".", ","),
                (1.25, 1.70),
                (1.15, 1.50),
            ),
            (
                "Russian prose",
                |r, n| prose(r, RUSSIAN, n, true, ".", ","),
                (1.45, 1.90),
                (0.90, 1.20),
            ),
            (
                "Chinese prose",
                |r, n| prose(r, CHINESE, n, false, "。", "，"),
                (1.40, 1.65),
                (0.90, 1.20),
            ),
            (
                "Japanese prose",
                |r, n| prose(r, JAPANESE, n, false, "。", "、"),
                (1.20, 1.55),
                (0.85, 1.00),
            ),
            (
                "Korean prose",
                |r, n| prose(r, KOREAN, n, true, ".", ","),
                (1.45, 1.75),
                (0.70, 0.95),
            ),
            ("Rust code", rust, (1.15, 1.45), (1.15, 1.45)),
            ("Python code", python, (1.20, 1.50), (1.20, 1.50)),
            (
                "JSON, minified",
                |r, n| json_text(r, n, false),
                (1.05, 1.30),
                (1.05, 1.35),
            ),
            (
                "JSON, pretty",
                |r, n| json_text(r, n, true),
                (1.20, 1.45),
                (1.20, 1.45),
            ),
            ("base64", base64, (1.00, 1.25), (0.95, 1.20)),
            ("hex, UUIDs", hex, (1.05, 1.30), (1.05, 1.30)),
        ]
    }

    /// Sample lengths in bytes (about): 16 per category, 100 B to 8 KB.
    const LENGTHS: [usize; 16] = [
        100, 200, 300, 500, 700, 1_000, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 6_000, 7_000,
        8_000, 400,
    ];

    /// (min, median, max) of `ratios`.
    fn spread(mut ratios: Vec<f64>) -> (f64, f64, f64) {
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let median = if n % 2 == 1 {
            ratios[n / 2]
        } else {
            (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
        };
        (ratios[0], median, ratios[n - 1])
    }

    /// The heuristic's estimate divided by the real counts, per category of generated text;
    /// prints the table of the module docs and checks its documented bounds.
    #[test]
    fn heuristic_error_against_the_tokenizers() {
        let mut r = Rng(0x5EED);
        let mut table = String::from(
            "| text | o200k min | median | max | cl100k min | median | max |\n\
             |---|---|---|---|---|---|---|\n",
        );
        let mut failures = Vec::new();
        for (name, generate, o_bounds, c_bounds) in categories() {
            let (mut o, mut c) = (Vec::new(), Vec::new());
            for len in LENGTHS {
                let text = generate(&mut r, len);
                let est = estimate_text_tokens(&text) as f64;
                o.push(est / count(o200k(), &text) as f64);
                c.push(est / count(cl100k(), &text) as f64);
            }
            let (o, c) = (spread(o), spread(c));
            table += &format!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                o.0, o.1, o.2, c.0, c.1, c.2
            );
            for (vocab, (min, _, max), (lo, hi)) in
                [("o200k", o, o_bounds), ("cl100k", c, c_bounds)]
            {
                if min < lo || max > hi {
                    failures.push(format!(
                        "{name} / {vocab}: {min:.2}..{max:.2} not in {lo}..{hi}"
                    ));
                }
            }
        }
        eprintln!("{table}");
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
