use super::*;

#[test]
fn parses_like_serde_json_value() {
    let text = br#"{"a":"x","b":[1,-2,3.5,true,null],"c":{"d":"e\"scaped"},"a":"last"}"#;
    let doc = Json::parse(text).unwrap();
    let value: Value = serde_json::from_slice(text).unwrap();
    assert_eq!(doc.get("a").and_then(Json::as_str).as_deref(), Some("last"));
    // Escaped strings are kept as written and decoded on demand; plain ones borrowed.
    let Some(Json::String(d)) = doc.get("c").unwrap().get("d") else {
        panic!("a string")
    };
    assert!(d.escaped);
    assert_eq!(d.decoded(), "e\"scaped");
    let mut pieces = Vec::new();
    d.feed(|p| pieces.push(p.to_owned()));
    assert_eq!(pieces, ["e", "\"", "scaped"]);
    assert!(matches!(
        doc.get("a").and_then(Json::as_str),
        Some(Cow::Borrowed("last"))
    ));
    let emoji = Json::parse(br#""\u00e9t\u00e9 \ud83d\ude00 a\/b\\""#).unwrap();
    assert_eq!(emoji.as_str().as_deref(), Some("été 😀 a/b\\"));
    assert_eq!(Json::from_value(&value).get("b"), doc.get("b"));
    let keys: Vec<_> = doc.as_object().unwrap().iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["b", "c", "a"]);
    let sorted: Vec<_> = doc
        .as_object()
        .unwrap()
        .sorted()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(sorted, ["a", "b", "c"]);
    for p in [
        "/a", "/b/0", "/b/2", "/b/01", "/b/+1", "/b/9", "/c/d", "/x", "a",
    ] {
        let ours = doc.pointer(p).map(to_value);
        assert_eq!(ours.as_ref(), value.pointer(p), "pointer {p}");
    }
    assert!(Json::parse(b"{\"a\":}").is_err());
    assert!(Json::parse(b"[1] x").is_err());
    // serde_json's recursion limit holds.
    let deep = "[".repeat(200) + &"]".repeat(200);
    assert!(Json::parse(deep.as_bytes()).is_err());
}

/// The value as a `serde_json::Value` (members inserted in order: the last duplicate
/// wins, as when serde_json builds its map).
fn to_value(j: &Json<'_>) -> Value {
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => Value::Number(n.clone()),
        Json::String(s) => Value::String(s.decoded().into_owned()),
        Json::Array(items) => Value::Array(items.iter().map(to_value).collect()),
        Json::Object(o) => {
            let mut m = serde_json::Map::new();
            for (k, v) in &o.0 {
                m.insert(k.to_string(), to_value(v));
            }
            Value::Object(m)
        }
    }
}

/// Equal, floats within a relative 1e-15 (serde_json's float parsing may round the last
/// bit differently from the standard library's, which is exact).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn agree(bytes: &[u8]) {
    let ours = Json::parse(bytes);
    let theirs = serde_json::from_slice::<Value>(bytes);
    match (&ours, &theirs) {
        (Ok(o), Ok(t)) => assert!(
            same(&to_value(o), t),
            "{:?}: {o:?} vs {t:?}",
            String::from_utf8_lossy(bytes)
        ),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "{:?}: ours {ours:?}, serde_json {theirs:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

#[test]
fn integers_at_the_u64_boundary() {
    for text in [
        "0",
        "-0",
        "7",
        "1000000000000000000",
        "9999999999999999999",
        "10000000000000000000",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "[412, 9, 421]",
        "00",
        "01",
    ] {
        agree(text.as_bytes());
    }
    let n = Json::parse(b"9999999999999999999").unwrap();
    assert_eq!(n.as_u64(), Some(9_999_999_999_999_999_999));
}

#[test]
fn accepts_and_rejects_what_serde_json_does() {
    for text in [
        &b"0"[..],
        b"-0",
        b"01",
        b"1.",
        b".5",
        b"1.5e3",
        b"1E+2",
        b"1e-2",
        b"-",
        b"1e",
        b"18446744073709551615",
        b"18446744073709551616",
        b"-9223372036854775808",
        b"-9223372036854775809",
        b"1e400",
        b"-1e400",
        b"123456789012345678901234567890",
        b"0.1",
        b"2.5e-308",
        b"true",
        b"tru",
        b"nul",
        b"null ",
        b" \t\r\n[]",
        b"[1,]",
        b"[,1]",
        b"{}",
        b"{\"a\":1,}",
        b"{\"a\" 1}",
        b"{1:2}",
        b"{\"a\":1}x",
        b"\"\\u00e9\\ud83d\\ude00\"",
        b"\"\\ud83d\"",
        b"\"\\ude00\"",
        b"\"\\ud83d\\u0041\"",
        b"\"\\x\"",
        b"\"\\u12\"",
        b"\"a\tb\"",
        b"\"\xff\"",
        b"\"\xc3\xa9\"",
        b"\"unterminated",
        b"\"\\",
        b"[\"\\/\\b\\f\"]",
        b"",
        b"  ",
        b"{\"a\":{\"b\":[true,false,null,\"\\\"x\\\"\"]}}",
    ] {
        agree(text);
    }
    for depth in [127, 128, 129] {
        agree(("[".repeat(depth) + &"]".repeat(depth)).as_bytes());
        agree(("{\"a\":".repeat(depth) + "1" + &"}".repeat(depth)).as_bytes());
    }
}

proptest::proptest! {
    #[test]
    fn random_json_like_bytes_parse_as_serde_json_does(
        parts in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just("{".to_owned()),
                proptest::strategy::Just("}".to_owned()),
                proptest::strategy::Just("[".to_owned()),
                proptest::strategy::Just("]".to_owned()),
                proptest::strategy::Just(",".to_owned()),
                proptest::strategy::Just(":".to_owned()),
                proptest::strategy::Just(" ".to_owned()),
                proptest::strategy::Just("true".to_owned()),
                proptest::strategy::Just("null".to_owned()),
                proptest::strategy::Just("\"k\"".to_owned()),
                "-?[0-9]{1,3}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
                "\"([a-z\\\\\"/é]|\\\\u[0-9a-fA-F]{4}){0,6}\"",
            ],
            0..24,
        ),
    ) {
        agree(parts.concat().as_bytes());
    }

    #[test]
    fn values_round_trip(v in arb_value()) {
        let text = serde_json::to_vec(&v).unwrap();
        let parsed = Json::parse(&text).unwrap();
        proptest::prop_assert!(same(&to_value(&parsed), &v));
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        proptest::prop_assert!(same(&to_value(&Json::parse(&pretty).unwrap()), &v));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
        agree(&bytes);
    }
}

fn arb_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e300f64..1e300)
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
