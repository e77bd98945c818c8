//! YAML plumbing: splitting a file into documents, a position index, and the typed parse.
//!
//! serde gives us typed structs but no position for a value that parses fine and is only
//! wrong by our rules (a port of 70000, say). So each document is read twice: once by
//! serde-saphyr into [`AppManifest`] (which reports structural errors with positions), and
//! once through the parser's event stream (granit-parser, re-exported by serde-saphyr so
//! the two always agree on the grammar) into a [`PosIndex`] from YAML path
//! (`spec.listen[1].port`) to line and column. Validation then names a path and the index
//! turns it into `line:column`.
//!
//! # Guarantees
//! - No input makes this module panic or run long: the file size is capped, nesting depth
//!   is capped, and aliases are never expanded by the index (serde-saphyr's alias budget
//!   bounds the typed parse), so a "billion laughs" file is rejected, not expanded.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

use crate::model::AppManifest;

/// Largest manifest file accepted. A manifest is a few hundred bytes; anything near this
/// is a mistake (a log or a binary dropped in the apps dir), and refusing it early keeps
/// the daemon's memory and time bounded.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// Deepest nesting of mappings and sequences accepted. A manifest needs 5.
pub const MAX_DEPTH: usize = 32;

/// Most alias uses (`*name`) in one document.
const MAX_ALIASES: usize = 256;

/// Most events an alias may replay in one document (bounds alias expansion).
const MAX_REPLAYED_EVENTS: usize = 10_000;

/// A line and column, both 1-based, in the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

/// One YAML document of a file: its text and the file line it starts on.
///
/// Documents are cut at lines starting with `---` (a document marker may not appear
/// inside any scalar at column 0, so this is exact), and always at a line start, so
/// columns inside a document are the file's columns and only lines need an offset.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// The document's text, from the start of its first line.
    pub text: &'a str,
    /// Number of file lines before this document (add to a document-relative line).
    pub line_offset: usize,
}

/// Cuts `text` into documents, dropping those with no content (only comments, blank
/// lines or markers), as kubectl does.
#[must_use]
pub fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        if offset > 0 && is_document_start(line) {
            chunks.push(Chunk {
                text: &text[start..offset],
                line_offset: start_line,
            });
            start = offset;
            start_line = line_no;
        }
        offset += line.len();
    }
    chunks.push(Chunk {
        text: &text[start..],
        line_offset: start_line,
    });
    chunks.retain(|c| has_content(c.text));
    chunks
}

fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let t = line.trim_start_matches('\u{feff}').trim_end();
        let t = ["---", "..."]
            .iter()
            .find_map(|m| {
                t.strip_prefix(m)
                    .filter(|r| r.is_empty() || r.starts_with(char::is_whitespace))
            })
            .unwrap_or(t)
            .trim_start();
        !(t.is_empty() || t.starts_with('#'))
    })
}

/// Positions of every value and mapping key in one document, by YAML path.
///
/// Paths look like `spec.listen[1].port`; the root is the empty path.
#[derive(Debug, Default, Clone)]
pub struct PosIndex {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    /// Where each value ends (exclusive), for cutting a bad entry out when recovering.
    ends: HashMap<String, Pos>,
    /// `metadata.name` as written, if it is a scalar: names the app's errors even when
    /// the typed parse fails.
    name_hint: Option<String>,
}

impl PosIndex {
    /// Position of the value at `path`; if that value is absent (a defaulted field), the
    /// nearest present ancestor's, so an error always points somewhere useful.
    #[must_use]
    pub fn value(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            match parent(p) {
                Some(up) => p = up,
                None => {
                    return self
                        .values
                        .get("")
                        .copied()
                        .unwrap_or(Pos { line: 1, column: 1 })
                }
            }
        }
    }

    /// Position of the key of the mapping entry at `path` (falls back like [`Self::value`]).
    #[must_use]
    pub fn key(&self, path: &str) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value(path))
    }

    /// `metadata.name` as written, when it is a scalar.
    #[must_use]
    pub fn name_hint(&self) -> Option<&str> {
        self.name_hint.as_deref()
    }

    /// The innermost mapping entry (`key: value`, from the key) or sequence item that
    /// holds `pos`: the part of the document a structural error at `pos` is about.
    pub(crate) fn element_at(&self, pos: Pos) -> Option<&str> {
        self.ends
            .iter()
            .filter(|(path, end)| {
                let start = self
                    .keys
                    .get(path.as_str())
                    .or_else(|| self.values.get(path.as_str()));
                !path.is_empty() && start.is_some_and(|s| *s <= pos) && pos < **end
            })
            .max_by_key(|(path, _)| (depth(path), path.len()))
            .map(|(path, _)| path.as_str())
    }

    /// Where the value at `path` starts and ends, if present.
    pub(crate) fn span(&self, path: &str) -> Option<(Pos, Pos)> {
        Some((*self.values.get(path)?, *self.ends.get(path)?))
    }

    /// Where the entry or item at `path` starts (its key, or its value for an item).
    pub(crate) fn start(&self, path: &str) -> Option<Pos> {
        self.keys
            .get(path)
            .or_else(|| self.values.get(path))
            .copied()
    }

    /// The first entry (by position) of the mapping at `owner`.
    pub(crate) fn first_key(&self, owner: &str) -> Option<&str> {
        self.keys
            .iter()
            .filter(|(path, _)| parent(path) == Some(owner))
            .min_by_key(|(_, pos)| **pos)
            .map(|(path, _)| path.as_str())
    }

    /// The value that starts exactly at `pos` (the outermost, if several do).
    pub(crate) fn value_at(&self, pos: Pos) -> Option<&str> {
        self.values
            .iter()
            .filter(|(_, p)| **p == pos)
            .min_by_key(|(path, _)| depth(path))
            .map(|(path, _)| path.as_str())
    }

    /// The mapping entry whose key sits exactly at `pos`.
    pub(crate) fn key_at(&self, pos: Pos) -> Option<&str> {
        self.keys
            .iter()
            .find(|(_, p)| **p == pos)
            .map(|(path, _)| path.as_str())
    }
}

/// Number of components of a path (`spec.listen[0].port` has 4).
fn depth(path: &str) -> usize {
    if path.is_empty() {
        0
    } else {
        1 + path.matches(['.', '[']).count()
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> `` -> None.
pub(crate) fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// A problem found while reading a document, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    /// Where, in the whole file.
    pub pos: Pos,
    /// What is wrong, and what was expected.
    pub message: String,
    /// A problem with one value (wrong type, unknown or missing field), after which the
    /// rest of the document can still be read; not a syntax error or exceeded budget.
    pub recoverable: bool,
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: its events are skipped.
    Skip {
        depth: usize,
    },
}

/// Builds the position index of one document from the parser's event stream.
///
/// # Errors
/// A syntax error, or nesting deeper than [`MAX_DEPTH`], with its position.
pub fn index(chunk: Chunk<'_>) -> Result<PosIndex, ParseProblem> {
    let mut parser = Parser::new_from_str(chunk.text);
    let mut idx = PosIndex::default();
    let mut stack: Vec<Frame> = Vec::new();
    let at = |line: usize, col: usize| Pos {
        line: line + chunk.line_offset,
        column: col + 1,
    };
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| ParseProblem {
            pos: at(e.marker().line(), e.marker().col()),
            recoverable: false,
            message: if e.info().contains("recursion limit") {
                // The scanner's own flow-nesting cap can fire before our depth check.
                format!("nesting is deeper than {MAX_DEPTH} levels (expected a manifest)")
            } else {
                format!("invalid YAML: {}", e.info())
            },
        })?;
        let pos = at(span.start.line(), span.start.col());
        let (opens, is_node) = match &event {
            Event::MappingStart(..) | Event::SequenceStart(..) => (true, true),
            Event::Scalar(..) | Event::Alias(..) => (false, true),
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some(path) = close(&mut stack) {
                    idx.ends.insert(path, at(span.end.line(), span.end.col()));
                }
                continue;
            }
            _ => continue,
        };
        if stack.len() >= MAX_DEPTH {
            return Err(ParseProblem {
                pos,
                recoverable: false,
                message: format!("nesting is deeper than {MAX_DEPTH} levels (expected a manifest)"),
            });
        }
        if let Some(Frame::Skip { depth }) = stack.last_mut() {
            if opens {
                *depth += 1;
            }
            continue;
        }
        // Which path does this node sit at? `None`: it is a mapping key.
        let path = match stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    if let Event::Scalar(text, ..) = &event {
                        let k = text.to_string();
                        idx.keys.insert(join(path, &k), pos);
                        *key = Some(k);
                    } else {
                        // A key that is a mapping or sequence: never valid here; serde
                        // reports it. Its value gets a throwaway path.
                        *key = Some("?".to_string());
                        if opens {
                            stack.push(Frame::Skip { depth: 1 });
                        }
                    }
                    None
                }
            },
            Some(Frame::Skip { .. }) => None,
        };
        let Some(path) = path else { continue };
        if is_node {
            if path == "metadata.name" {
                if let Event::Scalar(text, ..) = &event {
                    idx.name_hint = Some(text.to_string());
                }
            }
            idx.values.entry(path.clone()).or_insert(pos);
            if !opens {
                idx.ends
                    .entry(path.clone())
                    .or_insert_with(|| at(span.end.line(), span.end.col()));
            }
        }
        match event {
            Event::MappingStart(..) => stack.push(Frame::Map { path, key: None }),
            Event::SequenceStart(..) => stack.push(Frame::Seq { path, next: 0 }),
            _ => {}
        }
    }
    Ok(idx)
}

/// Leaves the innermost collection; returns its path unless it was a skipped key.
fn close(stack: &mut Vec<Frame>) -> Option<String> {
    if let Some(Frame::Skip { depth }) = stack.last_mut() {
        *depth -= 1;
        if *depth == 0 {
            stack.pop();
        }
        return None;
    }
    match stack.pop()? {
        Frame::Map { path, .. } | Frame::Seq { path, .. } => Some(path),
        Frame::Skip { .. } => None,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Reads one document into the typed model.
///
/// # Errors
/// The first structural problem (syntax, wrong type, unknown or missing field, exceeded
/// budget), with its position in the whole file.
pub fn parse_typed(chunk: Chunk<'_>) -> Result<AppManifest, ParseProblem> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            max_aliases: MAX_ALIASES,
            max_documents: 1,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_REPLAYED_EVENTS,
        },
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<AppManifest>(chunk.text, options).map_err(|e| {
        let (line, column) = e.location().map_or((1, 1), |l| {
            (
                usize::try_from(l.line()).unwrap_or(1),
                usize::try_from(l.column()).unwrap_or(1),
            )
        });
        ParseProblem {
            pos: Pos {
                line: line + chunk.line_offset,
                column,
            },
            message: crate::diagnostic::describe(&e),
            recoverable: crate::diagnostic::is_about_one_value(&e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_at_line_starts() {
        let text = "# c\n---\na: 1\n---\n# only a comment\n---\nb: 2\n";
        let chunks = split_documents(text);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].line_offset, 1);
        assert_eq!(chunks[1].line_offset, 5);
        assert!(chunks[1].text.starts_with("---\nb: 2"));
    }

    #[test]
    fn indexes_paths_with_file_positions() {
        let text = "a: 1\n---\nspec:\n  listen:\n    - port: 1\n    - {port: 2, name: x}\n";
        let chunks = split_documents(text);
        let idx = index(chunks[1]).unwrap();
        assert_eq!(
            idx.value("spec.listen[0].port"),
            Pos {
                line: 5,
                column: 13
            }
        );
        assert_eq!(
            idx.key("spec.listen[1].name"),
            Pos {
                line: 6,
                column: 17
            }
        );
        assert_eq!(idx.value("spec.listen[1].mode"), Pos { line: 6, column: 7 });
        assert_eq!(idx.value("spec.nothing.here"), Pos { line: 4, column: 3 });
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let err = index(Chunk {
            text: &deep,
            line_offset: 0,
        })
        .unwrap_err();
        assert!(err.message.contains("deeper"), "{}", err.message);
    }
}
