//! The SSE/JSON usage parser on arbitrary bytes, in arbitrary chunkings: never panics, and
//! the chunking never changes the answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_ratelimit::cost::usage::{Framing, UsageParser};

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    for framing in [Framing::Json, Framing::Sse] {
        let mut whole = UsageParser::new(framing, 1 << 16);
        whole.feed(body);
        let expected = whole.finish();

        let mut chunked = UsageParser::new(framing, 1 << 16);
        let step = usize::from(split).max(1);
        for chunk in body.chunks(step) {
            chunked.feed(chunk);
        }
        assert_eq!(chunked.finish(), expected);
    }
});
