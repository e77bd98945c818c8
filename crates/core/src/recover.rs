//! Keeps reading a document past its first structural error, so `validate` reports every
//! bad field of a file at once instead of one per run.
//!
//! serde stops at the first error (an unknown field, a wrong type, a missing field). To
//! find the next one, the offending entry is cut out of the text and the typed parse runs
//! again. Cutting replaces characters with spaces, never removes them, so every other
//! position in the document stays where it was and later errors keep their true
//! `line:column`. A required field that had to be cut (or was missing) gets a placeholder
//! value, so its absence does not hide the errors after it; errors that only follow from
//! our own cuts (a mapping left empty, the field we removed now "missing") are not
//! reported.
//!
//! # Guarantees
//! - Bounded: at most [`MAX_ROUNDS`] parses per document, and a round that makes no
//!   progress ends recovery.
//! - Never invents a problem: every reported problem is one serde reported on text that
//!   differs from the user's only by removed entries and placeholders for required fields.
//! - Syntax errors are not recovered from (the structure after them is unknown): the
//!   caller reports them once.

use std::collections::BTreeMap;

use crate::model::AppManifest;
use crate::yaml::{self, parent, Chunk, ParseProblem, Pos, PosIndex};

/// Most typed parses of one document (so most structural errors reported for it).
pub const MAX_ROUNDS: usize = 32;

/// What a recovering parse found.
#[derive(Debug)]
pub struct Recovered {
    /// The manifest read from the edited text, if the last round parsed.
    pub manifest: Option<AppManifest>,
    /// Every structural problem, in the order found.
    pub problems: Vec<ParseProblem>,
    /// Paths cut out or replaced: validation issues at, under or above them are
    /// consequences of the edits, not of the user's text.
    pub edited: Vec<String>,
}

/// A value any manifest accepts for a required field, so cutting (or missing) it does not
/// stop the parse. Keyed by path with sequence indices removed.
fn placeholder(path: &str) -> Option<&'static str> {
    Some(match strip_indices(path).as_str() {
        "apiVersion" => "clusterd/v1",
        "kind" => "App",
        "metadata" => "{name: x}",
        "metadata.name" | "spec.command" => "x",
        "spec" => "{command: x}",
        "spec.listen[].port" => "1",
        "spec.liveness.type" => "tcp",
        _ => return None,
    })
}

fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[]");
            }
            ']' => in_index = false,
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// Whether `a` is `b` or lies under it (`spec.listen[0]` under `spec`).
pub(crate) fn is_within(a: &str, b: &str) -> bool {
    a == b
        || (a.starts_with(b) && matches!(a.as_bytes().get(b.len()), Some(b'.' | b'[')))
        || b.is_empty()
}

/// The document's text as editable lines, with lines inserted between them.
struct Text {
    /// Lines of the document without their `\n`, as characters.
    lines: Vec<Vec<char>>,
    /// Lines inserted before line `i` (0-based index into `lines`).
    inserted: BTreeMap<usize, Vec<String>>,
    line_offset: usize,
}

impl Text {
    fn new(chunk: Chunk<'_>) -> Self {
        Text {
            lines: chunk.text.lines().map(|l| l.chars().collect()).collect(),
            inserted: BTreeMap::new(),
            line_offset: chunk.line_offset,
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            for extra in self.inserted.get(&i).into_iter().flatten() {
                out.push_str(extra);
                out.push('\n');
            }
            out.extend(line.iter());
            out.push('\n');
        }
        out
    }

    /// The original file position of a position in the rendered text (`None` inside an
    /// inserted line).
    fn original(&self, rendered: Pos) -> Option<Pos> {
        let mut line = self.line_offset;
        for i in 0..self.lines.len() {
            for _ in self.inserted.get(&i).into_iter().flatten() {
                line += 1;
                if line == rendered.line {
                    return None;
                }
            }
            line += 1;
            if line == rendered.line {
                return Some(Pos {
                    line: i + 1 + self.line_offset,
                    column: rendered.column,
                });
            }
        }
        None
    }

    /// (line index, char index) of a file position.
    fn at(&self, pos: Pos) -> Option<(usize, usize)> {
        let line = pos.line.checked_sub(self.line_offset + 1)?;
        (line < self.lines.len()).then_some((line, pos.column.saturating_sub(1)))
    }

    /// Replaces `[from, to)` with spaces (keeping line breaks, so positions hold).
    fn blank(&mut self, from: Pos, to: Pos) -> bool {
        let (Some((l0, c0)), Some((l1, c1))) = (
            self.at(from),
            self.at(to)
                .or(Some((self.lines.len().saturating_sub(1), usize::MAX))),
        ) else {
            return false;
        };
        for l in l0..=l1.min(self.lines.len() - 1) {
            let line = &mut self.lines[l];
            let start = if l == l0 { c0 } else { 0 };
            let end = if l == l1 {
                c1.min(line.len())
            } else {
                line.len()
            };
            for c in line.iter_mut().take(end).skip(start) {
                *c = ' ';
            }
        }
        true
    }

    /// Cuts the entry or item at `path` out of the document.
    fn cut(&mut self, index: &PosIndex, path: &str) -> bool {
        let (Some(start), Some((_, end))) = (index.start(path), index.span(path)) else {
            return false;
        };
        if !self.blank(start, end) {
            return false;
        }
        let Some((l, c)) = self.at(start) else {
            return false;
        };
        // A block sequence item: its `-` goes too, or the item would become a null.
        if path.ends_with(']') {
            let line = &mut self.lines[l];
            if let Some(dash) = line[..c.min(line.len())]
                .iter()
                .rposition(|ch| *ch != ' ')
                .filter(|i| line[*i] == '-')
            {
                line[dash] = ' ';
            }
        }
        // A flow entry: the comma after it goes too (`{a: 1, b: 2}` -> `{      b: 2}`).
        if let Some((el, ec)) = self.at(end) {
            let mut l = el;
            let mut c = ec;
            while l < self.lines.len() {
                match self.lines[l].get(c) {
                    Some(' ') => c += 1,
                    Some(',') => {
                        self.lines[l][c] = ' ';
                        break;
                    }
                    Some(_) => break,
                    None => {
                        l += 1;
                        c = 0;
                    }
                }
            }
        }
        true
    }

    /// Replaces the value at `path` with `value`; the line may grow only when nothing
    /// follows the value on its first line.
    fn replace_value(&mut self, index: &PosIndex, path: &str, value: &str) -> bool {
        let Some((start, end)) = index.span(path) else {
            return false;
        };
        let (Some((l0, c0)), end_at) = (self.at(start), self.at(end)) else {
            return false;
        };
        let first_line_end = match end_at {
            Some((l1, c1)) if l1 == l0 => c1,
            _ => self.lines[l0].len(),
        };
        let tail_free = self.lines[l0][first_line_end.min(self.lines[l0].len())..]
            .iter()
            .all(|c| *c == ' ')
            || end_at.is_none_or(|(l1, _)| l1 > l0);
        let room = first_line_end.saturating_sub(c0);
        if value.chars().count() > room && !tail_free {
            return false;
        }
        self.blank(start, end);
        let line = &mut self.lines[l0];
        if line.len() < c0 {
            return false;
        }
        let tail: Vec<char> = line.split_off(c0);
        line.extend(value.chars());
        let skip = value.chars().count();
        line.extend(tail.into_iter().skip(skip));
        true
    }

    /// Adds `key: value` to the block mapping whose first entry is at `first_key` (the
    /// path of that entry): a new line after that entry, at its indentation.
    fn insert_entry(&mut self, index: &PosIndex, first_key: &str, key: &str, value: &str) -> bool {
        let (Some(kpos), Some((_, end))) = (index.start(first_key), index.span(first_key)) else {
            return false;
        };
        let indent = " ".repeat(kpos.column - 1);
        let line = match self.at(end) {
            Some((l, c))
                if self.lines[l][..c.min(self.lines[l].len())]
                    .iter()
                    .all(|ch| *ch == ' ') =>
            {
                l
            }
            Some((l, _)) => l + 1,
            None => self.lines.len(),
        };
        if line >= self.lines.len() {
            // After the last line: append a line of our own.
            self.lines.push(Vec::new());
        }
        self.inserted
            .entry(line)
            .or_default()
            .push(format!("{indent}{key}: {value}"));
        true
    }
}

/// Parses one document into the typed model, collecting every structural problem it
/// can instead of only the first.
#[must_use]
pub fn parse_typed_all(chunk: Chunk<'_>, index: &PosIndex) -> Recovered {
    let mut text = Text::new(chunk);
    let mut problems: Vec<ParseProblem> = Vec::new();
    let mut edited: Vec<String> = Vec::new();
    let mut rendered = chunk.text.to_string();
    for _ in 0..MAX_ROUNDS {
        let err = match yaml::parse_typed(Chunk {
            text: &rendered,
            line_offset: chunk.line_offset,
        }) {
            Ok(m) => {
                return Recovered {
                    manifest: Some(m),
                    problems,
                    edited,
                }
            }
            Err(e) => e,
        };
        let Some(pos) = text.original(err.pos) else {
            break;
        };
        let problem = ParseProblem {
            pos,
            message: err.message.clone(),
            recoverable: err.recoverable,
        };
        if problems.contains(&problem) {
            break;
        }
        if !err.recoverable {
            // After an edit it can only be a flaw of the edit: say nothing of it.
            if edited.is_empty() {
                problems.push(problem);
            }
            break;
        }
        let progressed = if let Some(field) = missing_field(&err.message) {
            // serde-saphyr puts it at some key of the mapping that lacks the field (or
            // at a flow mapping's `{`): find that mapping, and report at its start.
            let owner = match index.key_at(pos) {
                Some(key) => parent(key).unwrap_or("").to_string(),
                None => match index.value_at(pos) {
                    Some(owner) => owner.to_string(),
                    None => {
                        problems.push(problem);
                        break;
                    }
                },
            };
            let path = if owner.is_empty() {
                field.to_string()
            } else {
                format!("{owner}.{field}")
            };
            if !edited.contains(&path) {
                problems.push(ParseProblem {
                    pos: index.value(&owner),
                    ..problem
                });
            }
            edited.push(path.clone());
            let first = index.first_key(&owner).map(str::to_string);
            match (placeholder(&path), first) {
                (Some(v), Some(first)) => text.insert_entry(index, &first, field, v),
                _ => false,
            }
        } else {
            let Some(path) = index.element_at(pos).map(str::to_string) else {
                problems.push(problem);
                break;
            };
            // An error about a mapping we emptied ourselves is ours, not the user's.
            if !edited.iter().any(|e| is_within(e, &path)) {
                problems.push(problem);
            }
            let fixed = match placeholder(&path) {
                Some(v) => text.replace_value(index, &path, v) || text.cut(index, &path),
                None => text.cut(index, &path),
            };
            edited.push(path);
            fixed
        };
        if !progressed {
            break;
        }
        let next = text.render();
        if next == rendered {
            break;
        }
        rendered = next;
    }
    Recovered {
        manifest: None,
        problems,
        edited,
    }
}

/// The field name of a "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> (Vec<String>, bool) {
        let chunk = yaml::split_documents(text)[0];
        let index = yaml::index(chunk).unwrap();
        let r = parse_typed_all(chunk, &index);
        (
            r.problems
                .iter()
                .map(|p| format!("{}:{}: {}", p.pos.line, p.pos.column, p.message))
                .collect(),
            r.manifest.is_some(),
        )
    }

    const HEAD: &str = "apiVersion: clusterd/v1\nkind: App\nmetadata: {name: web}\n";

    #[test]
    fn reports_every_unknown_field_and_wrong_type() {
        let (got, parsed) = all(&format!(
            "{HEAD}spec:\n  command: [a]\n  instnaces: 4\n  listen: {{port: 80}}\n  shutdown: {{signal: TERM, timout: 3s}}\n"
        ));
        assert_eq!(
            got,
            [
                "6:3: unknown field `instnaces`, did you mean `instances`?",
                "7:11: expected a list",
                "8:28: unknown field `timout`, did you mean `timeout`?",
            ]
        );
        assert!(parsed);
    }

    #[test]
    fn a_cut_required_field_does_not_hide_later_errors() {
        let (got, _) = all(
            "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  name: [web]\nspec:\n  command: {a: 1}\n  restart: {policy: sometimes}\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("4:9: "), "{got:?}");
        assert!(got[1].starts_with("6:12: "), "{got:?}");
        assert!(
            got[2].starts_with("7:21: unknown value `sometimes`"),
            "{got:?}"
        );
    }

    #[test]
    fn missing_fields_are_reported_once_and_parsing_goes_on() {
        let (got, parsed) = all(
            "apiVersion: clusterd/v1\nkind: App\nmetadata:\n  nme: web\nspec:\n  listen:\n    - mode: tcp\n      bogus: 1\n",
        );
        assert_eq!(
            got,
            [
                "4:3: unknown field `nme`, did you mean `name`?",
                "8:7: unknown field `bogus` (expected one of `name`, `port`, `address`, `mode`, `protocol`, `trustedProxies`, `affinity`, `tls`)",
                "7:7: missing field `port`",
                "6:3: missing field `command`",
            ]
        );
        assert!(parsed, "{got:?}");
    }

    #[test]
    fn sequence_items_are_cut_one_by_one() {
        let (got, _) = all(&format!(
            "{HEAD}spec:\n  command: x\n  listen:\n    - {{port: 1, mode: htp}}\n    - {{port: 2, mode: tpc}}\n"
        ));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("7:23: unknown value `htp`"), "{got:?}");
        assert!(got[1].starts_with("8:23: unknown value `tpc`"), "{got:?}");
    }
}
