//! `examples/gateway/gateway.toml`'s convention: every key (set, or shown commented out)
//! says whether SIGHUP reloads it, with `# SIGHUP: reloaded` or `# SIGHUP: needs a restart`
//! in its comment block or its table header's. A key added without one fails here.

/// The keys of a `gateway.toml`-style file (set, or shown commented as `# key = value`) that
/// carry no `# SIGHUP: reloaded` / `# SIGHUP: needs a restart` line in their comment block
/// (the comment lines directly above, up to a blank line or a table header; a key with no
/// comment of its own shares the block of the keys it is grouped with) nor in their table
/// header's block (the comment lines directly above the header); and every key found, as
/// `table.key`.
fn unannotated(text: &str) -> (Vec<String>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let header = |l: &str| l.trim_start().starts_with('[');
    let annotation = |l: &str| {
        l.trim_start()
            .strip_prefix('#')
            .map(str::trim_start)
            .and_then(|c| c.strip_prefix("SIGHUP:"))
            .map(str::trim_start)
            .is_some_and(|v| v.starts_with("reloaded") || v.starts_with("needs a restart"))
    };
    // A key line: `key = value`, or a comment that is exactly one TOML key-value.
    let key_of = |l: &str| -> Option<String> {
        let t = l.trim();
        if t.is_empty() || header(t) {
            return None;
        }
        let kv = match t.strip_prefix('#') {
            Some(c) => c.trim_start(),
            None => t,
        };
        let table: toml::Table = kv.parse().ok()?;
        (table.len() == 1).then(|| table.keys().next().unwrap().clone())
    };
    let mut missing = Vec::new();
    let mut found = Vec::new();
    let mut section: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        if header(line) {
            section = Some(i);
            continue;
        }
        let Some(key) = key_of(line) else { continue };
        let table = section.map_or(String::new(), |h| {
            lines[h]
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned()
                + "."
        });
        let name = format!("{table}{key}");
        // The comment lines above; through key lines with none of their own (a group of
        // keys shares its block), not past a key with its own comments.
        let mut own = false;
        let mut comments = 0;
        for l in lines[..i].iter().rev() {
            if l.trim().is_empty() || header(l) {
                break;
            }
            if key_of(l).is_some() {
                if comments > 0 {
                    break;
                }
                continue;
            }
            comments += 1;
            own |= annotation(l);
        }
        let of_table = section.is_some_and(|h| {
            lines[..h]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with('#'))
                .any(|l| annotation(l))
        });
        if !own && !of_table {
            missing.push(name.clone());
        }
        found.push(name);
    }
    (missing, found)
}

#[test]
fn every_key_of_gateway_toml_says_whether_sighup_reloads_it() {
    let text = include_str!("../../examples/gateway/gateway.toml");
    let (missing, found) = unannotated(text);
    assert!(
        missing.is_empty(),
        "keys of gateway.toml without `# SIGHUP: reloaded` or `# SIGHUP: needs a restart` in \
         their comment block or their table's: {missing:?}"
    );
    // The check saw the file's keys, set and commented out.
    for key in [
        "listen",
        "server.forward_headers",
        "store.url",
        "store.max_keys",
        "limiter.idempotency_header",
        "mock.token_delay_ms",
        "models.mock-gpt.api_key_env",
        "models.mock-gpt.input_tpm",
        "tiers.free.output_tpm",
        "tiers.pro.daily_cost",
        "keys.demo-pro",
    ] {
        assert!(
            found.iter().any(|k| k == key),
            "{key} not found in {found:?}"
        );
    }
    assert!(found.len() > 45, "{found:?}");
}

#[test]
fn the_annotation_check_finds_a_key_without_one() {
    let text = "\
# SIGHUP: reloaded
a = 1
b = 2
# Its own comment, without one.
i = 3

# prose with = in it: not a key
c = 3
# d = \"shown\"

# SIGHUP: needs a restart
[t]
e = 1

[u]
# SIGHUP: reloaded
f = 1

g = 2
# SIGHUP: maybe
h = 3
";
    let (missing, found) = unannotated(text);
    assert_eq!(missing, ["i", "c", "d", "u.g", "u.h"]);
    assert_eq!(found, ["a", "b", "i", "c", "d", "t.e", "u.f", "u.g", "u.h"]);
}
