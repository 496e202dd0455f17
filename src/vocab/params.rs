//! Per-item parameters: the values one photo carries to the model (a prompt, a seed, a
//! step count), already checked against the config's `[params]` schema
//! (`config::params`, which makes them). They live in the vocabulary because the item
//! carries them through every stage, to the model and into the output's sidecar.

use std::fmt;
use std::sync::Arc;

/// One parameter's value, of one of the four types a schema declares.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl ParamValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ParamValue::Str(s) => serde_json::Value::from(s.as_str()),
            ParamValue::Int(i) => serde_json::Value::from(*i),
            ParamValue::Float(f) => serde_json::Value::from(*f),
            ParamValue::Bool(b) => serde_json::Value::from(*b),
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Str(s) => write!(f, "{s:?}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// One item's parameters: a value for every parameter the schema declares, in the
/// schema's order, defaults filled in. The names are shared with the schema (one
/// allocation for every item).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    names: Arc<[String]>,
    values: Vec<ParamValue>,
}

impl Params {
    /// `values[i]` is the value of `names[i]`; the two have the same length.
    pub fn new(names: Arc<[String]>, values: Vec<ParamValue>) -> Params {
        assert_eq!(names.len(), values.len(), "a value for every name");
        Params { names, values }
    }

    /// The value of the schema's `i`-th parameter.
    pub fn value(&self, i: usize) -> Option<&ParamValue> {
        self.values.get(i)
    }

    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.values[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamValue)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.values.iter())
    }

    /// `{"name": value, ...}`, for sidecars.
    pub fn to_json(&self) -> serde_json::Value {
        let map = self
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_json()))
            .collect();
        serde_json::Value::Object(map)
    }
}
