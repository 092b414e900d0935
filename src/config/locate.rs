//! Maps a field path (`origins.staging.url`, `routes[2].group`) to its line and column in
//! the YAML source, so that every config error can name file, line and field.
//!
//! serde_yaml reports positions for syntax errors only; errors found after parsing (a
//! dangling group name, a missing environment variable) need this side table. It is built
//! from the YAML event stream, which carries a marker for every key and value.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line().max(1),
            col: m.col() + 1,
        }
    }
}

/// Positions of every node, keyed by its dotted path (`""` is the document root).
#[derive(Debug, Default)]
pub struct Locator {
    nodes: HashMap<String, Pos>,
}

/// A YAML syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

impl Locator {
    pub fn build(src: &str) -> Result<Locator, SyntaxError> {
        let mut b = Builder::default();
        let mut parser = Parser::new_from_str(src);
        parser.load(&mut b, false).map_err(|e| SyntaxError {
            pos: Pos {
                line: e.marker().line().max(1),
                col: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        Ok(Locator { nodes: b.nodes })
    }

    /// The position of `path`, or of its nearest ancestor that exists (a missing field is
    /// reported at the mapping that lacks it).
    pub fn find(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.nodes.get(p) {
                return *pos;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return self.nodes.get("").copied().unwrap_or_default(),
            }
        }
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Joins a child segment onto a path: keys with `.`, sequence indices as `[i]`.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

enum Frame {
    /// In a mapping: the path of the mapping, and the key awaiting its value.
    Map { path: String, key: Option<String> },
    /// In a sequence: its path and the next index.
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    nodes: HashMap<String, Pos>,
}

impl Builder {
    /// The path of the node that starts now, advancing the parent's state. `None` means the
    /// node is a mapping key (not a value).
    fn next_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = index(path, *next);
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => match self.next_path() {
                Some(p) => {
                    // A value: keep the key's position if the key was seen (errors read
                    // best at `key: value`), else the value's.
                    self.nodes.entry(p).or_insert_with(|| mark.into());
                }
                None => {
                    if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                        self.nodes.insert(join(path, &value), mark.into());
                        *key = Some(value);
                    }
                }
            },
            Event::Alias(_) => {
                self.next_path();
            }
            Event::MappingStart(..) => {
                let p = self.next_path().unwrap_or_default();
                self.nodes.entry(p.clone()).or_insert_with(|| mark.into());
                self.stack.push(Frame::Map { path: p, key: None });
            }
            Event::SequenceStart(..) => {
                let p = self.next_path().unwrap_or_default();
                self.nodes.entry(p.clone()).or_insert_with(|| mark.into());
                self.stack.push(Frame::Seq { path: p, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "\
listen:
  - addr: 127.0.0.1:8080
origins:
  staging:
    url: http://x
    s3: {region: eu, access_key_env: A}
routes:
  - path: /
    group: media
  - {path: /b, group: other}
";

    #[test]
    fn finds_keys_values_and_ancestors() {
        let l = Locator::build(SRC).unwrap();
        assert_eq!(l.find("listen").line, 1);
        assert_eq!(l.find("listen[0].addr").line, 2);
        assert_eq!(l.find("origins.staging.url"), Pos { line: 5, col: 5 });
        assert_eq!(l.find("origins.staging.s3.access_key_env").line, 6);
        assert_eq!(l.find("routes[0].group").line, 9);
        assert_eq!(l.find("routes[1].group").line, 10);
        // missing field: reported at its mapping
        assert_eq!(l.find("origins.staging.dir").line, 4);
        assert_eq!(l.find("routes[1].nope.deeper").line, 10);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = Locator::build("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(e.pos.line >= 2, "{e:?}");
    }
}
