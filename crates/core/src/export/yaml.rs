//! A small YAML emitter over a tree that can hold comments.
//!
//! The exported manifests explain in comments what did not carry over, and serde-based
//! serializers have no place for a comment next to an arbitrary field, so the export
//! builds this tree and prints it by hand. Only block style is produced, with two-space
//! indentation, the way `kubectl` users read and write manifests.
//!
//! # Guarantees
//! A string is printed plain only when every YAML 1.1 and 1.2 reader takes it for that
//! same string (no `yes`/`on`/`null`, nothing number-like, no indicator characters);
//! everything else is double-quoted with escapes. Kubernetes' own reader follows YAML 1.1
//! rules, where `on` is a boolean and `010` is octal, so being strict here is what keeps
//! an env value of `"on"` a string.

use std::fmt::Write as _;

/// A value in the tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// A string, quoted when needed.
    Str(String),
    /// An integer, printed as is.
    Int(i64),
    /// A mapping, in insertion order, with comment lines between entries.
    Map(Map),
    /// A sequence, with comment lines between items.
    Seq(Seq),
}

impl From<&str> for Node {
    fn from(s: &str) -> Self {
        Node::Str(s.to_string())
    }
}

impl From<String> for Node {
    fn from(s: String) -> Self {
        Node::Str(s)
    }
}

impl From<i64> for Node {
    fn from(n: i64) -> Self {
        Node::Int(n)
    }
}

impl From<u32> for Node {
    fn from(n: u32) -> Self {
        Node::Int(i64::from(n))
    }
}

impl From<Map> for Node {
    fn from(m: Map) -> Self {
        Node::Map(m)
    }
}

impl From<Seq> for Node {
    fn from(s: Seq) -> Self {
        Node::Seq(s)
    }
}

/// A mapping under construction.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Map(Vec<Line<(String, Node)>>);

/// A sequence under construction.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Seq(Vec<Line<Node>>);

/// An entry of a collection: a comment line or a value.
#[derive(Debug, Clone, PartialEq)]
enum Line<T> {
    Comment(String),
    Value(T),
}

impl Map {
    pub(crate) fn new() -> Self {
        Map::default()
    }

    /// Adds `key: value` (builder style).
    pub(crate) fn with(mut self, key: &str, value: impl Into<Node>) -> Self {
        self.push(key, value);
        self
    }

    /// Adds a comment line that is printed before the next entry.
    pub(crate) fn note(mut self, text: &str) -> Self {
        self.comment(text);
        self
    }

    pub(crate) fn push(&mut self, key: &str, value: impl Into<Node>) {
        self.0.push(Line::Value((key.to_string(), value.into())));
    }

    pub(crate) fn comment(&mut self, text: &str) {
        self.0
            .extend(text.lines().map(|l| Line::Comment(l.to_string())));
    }

    /// Appends the entries and comments of `other`.
    pub(crate) fn extend(&mut self, other: Map) {
        self.0.extend(other.0);
    }

    /// The value under `key`, for tests and for assembling documents.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        self.0.iter().find_map(|line| match line {
            Line::Value((k, v)) if k == key => Some(v),
            _ => None,
        })
    }
}

impl Seq {
    pub(crate) fn new() -> Self {
        Seq::default()
    }

    pub(crate) fn push(&mut self, value: impl Into<Node>) {
        self.0.push(Line::Value(value.into()));
    }
    pub(crate) fn comment(&mut self, text: &str) {
        self.0
            .extend(text.lines().map(|l| Line::Comment(l.to_string())));
    }
}

impl<T: Into<Node>> FromIterator<T> for Seq {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Seq(iter.into_iter().map(|v| Line::Value(v.into())).collect())
    }
}

/// Prints one document: `map` at the top level.
pub(crate) fn document(map: &Map) -> String {
    let mut out = String::new();
    write_map(&mut out, map, 0);
    out
}

fn write_map(out: &mut String, map: &Map, indent: usize) {
    let pad = " ".repeat(indent);
    for line in &map.0 {
        match line {
            Line::Comment(text) => comment(out, &pad, text),
            Line::Value((key, value)) => {
                let key = scalar(key);
                match value {
                    Node::Map(inner) if inner.0.is_empty() => {
                        let _ = writeln!(out, "{pad}{key}: {{}}");
                    }
                    Node::Seq(inner) if inner.0.is_empty() => {
                        let _ = writeln!(out, "{pad}{key}: []");
                    }
                    Node::Map(inner) => {
                        let _ = writeln!(out, "{pad}{key}:");
                        write_map(out, inner, indent + 2);
                    }
                    Node::Seq(inner) => {
                        let _ = writeln!(out, "{pad}{key}:");
                        write_seq(out, inner, indent + 2);
                    }
                    Node::Str(_) | Node::Int(_) => {
                        let _ = writeln!(out, "{pad}{key}: {}", inline(value));
                    }
                }
            }
        }
    }
}

fn write_seq(out: &mut String, seq: &Seq, indent: usize) {
    let pad = " ".repeat(indent);
    for line in &seq.0 {
        match line {
            Line::Comment(text) => comment(out, &pad, text),
            Line::Value(Node::Map(inner)) if !inner.0.is_empty() => {
                // Print the mapping two columns in, then turn the indentation of its first
                // entry into the `- ` marker; comments before that entry stay above it.
                let mut body = String::new();
                write_map(&mut body, inner, indent + 2);
                let mut marked = false;
                for body_line in body.lines() {
                    if !marked && !body_line.trim_start().starts_with('#') {
                        let _ = writeln!(out, "{pad}- {}", &body_line[indent + 2..]);
                        marked = true;
                    } else {
                        let _ = writeln!(out, "{body_line}");
                    }
                }
            }
            Line::Value(Node::Seq(inner)) if !inner.0.is_empty() => {
                let _ = writeln!(out, "{pad}-");
                write_seq(out, inner, indent + 2);
            }
            Line::Value(value) => {
                let _ = writeln!(out, "{pad}- {}", inline(value));
            }
        }
    }
}

fn comment(out: &mut String, pad: &str, text: &str) {
    if text.is_empty() {
        let _ = writeln!(out, "{pad}#");
    } else {
        let _ = writeln!(out, "{pad}# {text}");
    }
}

/// A node that fits on one line: a scalar or an empty collection.
fn inline(node: &Node) -> String {
    match node {
        Node::Str(s) => scalar(s),
        Node::Int(n) => n.to_string(),
        Node::Map(_) => "{}".to_string(),
        Node::Seq(_) => "[]".to_string(),
    }
}

/// Words that some YAML reader turns into a boolean or null when unquoted.
const RESERVED: [&str; 9] = ["y", "n", "yes", "no", "true", "false", "on", "off", "null"];

/// `s` as a YAML scalar that every reader takes for the string `s`.
pub(crate) fn scalar(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !RESERVED.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Outside YAML's printable set (C0, DEL, C1), or line breaks YAML 1.1 would
            // fold (NEL, LS, PS), or a BOM: escape so the text survives any reader.
            c if c < ' '
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') =>
            {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(s: &str) -> serde_json::Value {
        let text = document(&Map::new().with("k", s));
        let value: serde_json::Value = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
        value["k"].clone()
    }

    #[test]
    fn tricky_strings_stay_strings() {
        let cases = [
            "",
            "yes",
            "No",
            "ON",
            "off",
            "y",
            "true",
            "null",
            "~",
            "123",
            "0777",
            "0x1f",
            "1e3",
            "1.5",
            ".inf",
            "-.5",
            "12:30",
            "a: b",
            "a #b",
            "#x",
            "- x",
            "-x",
            "*alias",
            "&a",
            "!tag",
            "%d",
            "@at",
            "`t",
            "{a}",
            "[a]",
            "'q'",
            "\"dq\"",
            " lead",
            "trail ",
            "multi\nline",
            "tab\there",
            "back\\slash",
            "é ü",
            "\u{7f}\u{85}\u{2028}",
            ">fold",
            "|lit",
            "?q",
            ",",
            "=",
            "<<",
            "$(VAR)",
        ];
        for s in cases {
            assert_eq!(
                round_trip(s),
                serde_json::Value::String(s.to_string()),
                "case {s:?}"
            );
        }
    }

    #[test]
    fn plain_where_safe() {
        for s in [
            "node",
            "apps/v1",
            "/srv/web",
            "www-data",
            "app.kubernetes.io/name",
            "RollingUpdate",
        ] {
            assert_eq!(scalar(s), s);
        }
        for s in ["yes", "8080", "", "a b", "nginx:1.25", "-x"] {
            assert!(scalar(s).starts_with('"'), "{s} should be quoted");
        }
    }

    #[test]
    fn prints_nested_blocks_with_comments() {
        let mut ports = Seq::new();
        ports.comment("first port");
        ports.push(
            Map::new()
                .note("inside")
                .with("name", "http")
                .with("containerPort", 8080_i64),
        );
        ports.push(Map::new().with("name", "dns").with("protocol", "UDP"));
        let doc = Map::new()
            .note("header")
            .with("kind", "Deployment")
            .with("empty", Map::new())
            .with("none", Seq::new())
            .with("args", ["a", "yes"].into_iter().collect::<Seq>())
            .with("ports", ports);
        let text = document(&doc);
        assert_eq!(
            text,
            "# header\nkind: Deployment\nempty: {}\nnone: []\nargs:\n  - a\n  - \"yes\"\nports:\n  # first port\n    # inside\n  - name: http\n    containerPort: 8080\n  - name: dns\n    protocol: UDP\n"
        );
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(value["ports"][0]["containerPort"], 8080);
        assert_eq!(value["args"][1], "yes");
        assert_eq!(doc.get("kind"), Some(&Node::Str("Deployment".into())));
    }

    proptest! {
        #[test]
        fn any_string_round_trips(s in any::<String>()) {
            prop_assert_eq!(round_trip(&s), serde_json::Value::String(s.clone()));
        }

        #[test]
        fn ascii_round_trips(s in "[ -~\\t\\n]{0,12}") {
            prop_assert_eq!(round_trip(&s), serde_json::Value::String(s.clone()));
        }
    }
}
