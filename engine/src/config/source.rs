//! Reads pipeline TOML into a JSON value (what the schema and the typed configs check) while
//! remembering where every key stands in the file, so that each problem can name its line.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use toml::de::{DeTable, DeValue};

/// A location in the source text, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The TOML document as JSON, with the position of every key and array element, indexed by its
/// JSON pointer (`/stages/1/conversation/limit`).
#[derive(Debug, Clone)]
pub struct SourceDoc {
    pub value: Value,
    positions: HashMap<String, Position>,
}

/// A syntax error, with where it is.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub message: String,
    pub position: Option<Position>,
}

impl SourceDoc {
    pub fn parse(text: &str) -> Result<Self, SyntaxError> {
        let table = DeTable::parse(text).map_err(|e| SyntaxError {
            message: e.message().trim().to_owned(),
            position: e.span().map(|span| position_of(text, span.start)),
        })?;
        let mut positions = HashMap::new();
        let value = table_to_json(table.get_ref(), "", text, &mut positions)
            .map_err(|(pointer, message)| SyntaxError { position: positions.get(&pointer).copied(), message })?;
        Ok(Self { value, positions })
    }

    /// The position of the deepest key on `pointer`'s path that the file spells out.
    pub fn position(&self, pointer: &str) -> Option<Position> {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }
}

fn position_of(text: &str, offset: usize) -> Position {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Position { line, column }
}

type Walk = Result<Value, (String, String)>;

fn table_to_json(table: &DeTable<'_>, pointer: &str, text: &str, pos: &mut HashMap<String, Position>) -> Walk {
    let mut map = Map::new();
    for (key, value) in table {
        let child = format!("{pointer}/{}", escape_pointer(key.get_ref()));
        pos.insert(child.clone(), position_of(text, key.span().start));
        map.insert(key.get_ref().to_string(), value_to_json(value.get_ref(), &child, text, pos)?);
    }
    Ok(Value::Object(map))
}

fn value_to_json(value: &DeValue<'_>, pointer: &str, text: &str, pos: &mut HashMap<String, Position>) -> Walk {
    Ok(match value {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            let n = i64::from_str_radix(&digits, i.radix())
                .map_err(|_| (pointer.to_owned(), format!("integer `{}` does not fit in 64 bits", i.as_str())))?;
            Value::Number(n.into())
        }
        DeValue::Float(f) => {
            let x: f64 = f.as_str().replace('_', "").parse().unwrap_or(f64::NAN);
            Number::from_f64(x)
                .map(Value::Number)
                .ok_or_else(|| (pointer.to_owned(), format!("`{}` is not a finite number", f.as_str())))?
        }
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let child = format!("{pointer}/{i}");
                pos.insert(child.clone(), position_of(text, item.span().start));
                out.push(value_to_json(item.get_ref(), &child, text, pos)?);
            }
            Value::Array(out)
        }
        DeValue::Table(t) => table_to_json(t, pointer, text, pos)?,
    })
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_locates_keys() {
        let text = "[[stages]]\nkind = \"dedupe\"\n\n[[stages]]\nkind = \"ratelimit\"\nconversation = { limit = 5, window = \"30s\" }\n";
        let doc = SourceDoc::parse(text).unwrap();
        assert_eq!(doc.value["stages"][1]["conversation"]["limit"], 5);
        assert_eq!(doc.position("/stages/1/conversation/limit").unwrap().line, 6);
        assert_eq!(doc.position("/stages/0/kind").unwrap().line, 2);
        // A key that is not in the file resolves to its nearest spelled-out parent.
        assert_eq!(doc.position("/stages/1/conversation/nope").unwrap().line, 6);
    }

    #[test]
    fn syntax_errors_carry_their_line() {
        let err = SourceDoc::parse("[[stages]]\nkind = \"dedupe\"\nttl = \n").unwrap_err();
        assert_eq!(err.position.unwrap().line, 3);
    }
}
