//! A document's shape: every mapping key and list item with where it is written, read
//! once next to the typed resource, so that a finding can point at the field it is about
//! and so that fields the real schema does not have are caught.
//!
//! serde reads only the fields portcullis models and would skip the rest silently; the
//! shape is what `schema.rs` checks against every field the Istio and Kubernetes schemas
//! define, so that a field portcullis merely does not use (`spec.containers[].image`) is
//! accepted and a misspelt one (`adresses`) is an error.

use serde_saphyr::granit_parser::{Event, Parser, ScanError, Span, StructureStyle};

/// A position in a document: 1-based line and column, the line relative to the text read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    fn of(span: &Span) -> Pos {
        Pos {
            line: span.start.line() as u64,
            column: span.start.col() as u64 + 1,
        }
    }
}

/// One node of a document.
#[derive(Debug)]
pub(crate) struct Node {
    /// Where the node starts.
    pub at: Pos,
    /// Byte range of the node's text, from its first to the end of its last token.
    pub bytes: (usize, usize),
    /// What it holds.
    pub value: Value,
}

/// What a node holds. Scalars' texts are not kept: serde reads the values.
#[derive(Debug)]
pub(crate) enum Value {
    /// A scalar.
    Scalar,
    /// Keys in order, each with its position and value.
    Map(Vec<(String, Pos, Node)>),
    /// Items in order.
    Seq(Vec<Node>),
    /// An alias.
    Other,
}

impl Node {
    /// The value under `key` when this is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|e| &e.2),
            _ => None,
        }
    }

    /// The position of `key` itself when this is a mapping.
    pub fn key_at(&self, key: &str) -> Option<Pos> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|e| e.1),
            _ => None,
        }
    }

    /// Where the field at `path` is written: its key, or for a list item the item.
    pub fn field_at(&self, path: &str) -> Option<Pos> {
        match path.rsplit_once('.') {
            Some((parent, key)) if !key.ends_with(']') => self.find(parent)?.key_at(key),
            None if !path.ends_with(']') && !path.is_empty() => self.key_at(path),
            _ => self.find(path).map(|node| node.at),
        }
    }

    /// The node at a path of keys (`spec.ports`) and indexes (`[0]`), as validation names
    /// fields.
    pub fn find(&self, path: &str) -> Option<&Node> {
        let mut node = self;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
            if !key.is_empty() {
                node = node.get(key)?;
            }
            for index in indexes.split('[') {
                let Some(index) = index.strip_suffix(']') else {
                    continue;
                };
                let Value::Seq(items) = &node.value else {
                    return None;
                };
                node = items.get(index.parse::<usize>().ok()?)?;
            }
        }
        Some(node)
    }
}

/// Reads the shape of the single document in `text`; `None` for an empty document.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, ScanError> {
    let mut events = Parser::new_from_str(text);
    while let Some(next) = events.next() {
        let (event, span) = next?;
        if event.is_node() {
            return node(&mut events, event, span).map(Some);
        }
        if matches!(event, Event::DocumentEnd | Event::StreamEnd) {
            break;
        }
    }
    Ok(None)
}

type Events<'a> = Parser<'a, serde_saphyr::granit_parser::StrInput<'a>>;

/// What comes next inside a collection.
enum Next<'a> {
    Node(Event<'a>, Span),
    /// The collection (or the input) ends here.
    End(Span),
}

fn next<'a>(events: &mut Events<'a>) -> Result<Next<'a>, ScanError> {
    for next in events.by_ref() {
        let (event, span) = next?;
        if event.is_node() {
            return Ok(Next::Node(event, span));
        }
        if matches!(
            event,
            Event::MappingEnd | Event::SequenceEnd | Event::DocumentEnd | Event::StreamEnd
        ) {
            return Ok(Next::End(span));
        }
    }
    Ok(Next::End(Span::default()))
}

/// Reads the node `event` starts. The parser's own nesting limit bounds the recursion.
fn node<'a>(events: &mut Events<'a>, event: Event<'a>, span: Span) -> Result<Node, ScanError> {
    let at = Pos::of(&span);
    let start = span.start.byte_offset().unwrap_or(0);
    let mut end = span.end.byte_offset().unwrap_or(start);
    let value = match event {
        Event::MappingStart(style, ..) => {
            let mut entries = Vec::new();
            let close = loop {
                let (key, key_span) = match next(events)? {
                    Next::Node(key, key_span) => (key, key_span),
                    Next::End(close) => break close,
                };
                let name = key.scalar().map(|(s, _)| s.to_string()).unwrap_or_default();
                let key = node(events, key, key_span)?;
                let (value, value_span) = match next(events)? {
                    Next::Node(value, value_span) => (value, value_span),
                    Next::End(close) => break close,
                };
                let value = node(events, value, value_span)?;
                end = end.max(key.bytes.1).max(value.bytes.1);
                entries.push((name, key.at, value));
            };
            end = closing(end, style, &close);
            Value::Map(entries)
        }
        Event::SequenceStart(style, ..) => {
            let mut items = Vec::new();
            let close = loop {
                match next(events)? {
                    Next::Node(item, item_span) => {
                        let item = node(events, item, item_span)?;
                        end = end.max(item.bytes.1);
                        items.push(item);
                    }
                    Next::End(close) => break close,
                }
            };
            end = closing(end, style, &close);
            Value::Seq(items)
        }
        Event::Scalar(..) => Value::Scalar,
        _ => Value::Other,
    };
    Ok(Node {
        at,
        bytes: (start, end),
        value,
    })
}

/// Extends `end` over a flow collection's closing bracket; a block collection's end event
/// is empty and sits wherever the next token does.
fn closing(end: usize, style: StructureStyle, close: &Span) -> usize {
    match (style, close.end.byte_offset()) {
        (StructureStyle::Flow, Some(close)) => end.max(close),
        _ => end,
    }
}
