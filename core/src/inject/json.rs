//! A JSON value whose settings-only parts are already serialized. The sidecar is mostly the
//! same bytes for every pod under one config: those parts are serialized once (with
//! [`super::patch::RenderInputs`]) and shared by reference, and only what a pod changes is
//! built per pod. Written with serde_json it gives the same bytes as the equivalent `Value`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A `Value` serialized once, kept with the value it was written from (so that reading it
/// back is exact, floats and deep nesting included): cloning is two reference counts.
#[derive(Debug, Clone)]
pub struct Raw {
    text: Arc<RawValue>,
    value: Arc<Value>,
}

impl Raw {
    /// `v` serialized once.
    pub fn new(v: &Value) -> Raw {
        // A Value always serializes; the fallback (null) is unreachable.
        let text = serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned());
        Raw {
            text: text.into(),
            value: Arc::new(v.clone()),
        }
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.text.get()
    }

    /// The value it was written from.
    pub fn value(&self) -> &Value {
        &self.value
    }
}

/// Equal as text: both were written by serde_json from a `Value`.
impl PartialEq for Raw {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for Raw {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.text.serialize(s)
    }
}

/// A JSON value built from `Value`s and already-serialized parts.
///
/// Serialize it with serde_json (to bytes, or `to_value`): its raw parts are serde_json's
/// `RawValue`, which other serializers do not know; [`Json::to_value`] is the portable form.
#[derive(Debug, Clone)]
pub enum Json {
    Value(Value),
    Raw(Raw),
    /// Members in key order, as `serde_json::Map` keeps them.
    Object(BTreeMap<String, Json>),
    Array(Vec<Json>),
}

impl Json {
    /// The same value as a `Value`.
    pub fn to_value(&self) -> Value {
        match self {
            Json::Value(v) => v.clone(),
            Json::Raw(r) => r.value().clone(),
            Json::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
            Json::Array(a) => Value::Array(a.iter().map(Json::to_value).collect()),
        }
    }

    /// Whether this equals `v`.
    pub fn eq_value(&self, v: &Value) -> bool {
        match (self, v) {
            (Json::Value(a), b) => a == b,
            (Json::Raw(r), b) => r.value() == b,
            (Json::Object(a), Value::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, x)| b.get(k).is_some_and(|y| x.eq_value(y)))
            }
            (Json::Array(a), Value::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_value(y))
            }
            _ => false,
        }
    }

    /// The string member `key` of an object (a container's or an env entry's name).
    pub fn str_member(&self, key: &str) -> Option<&str> {
        match self {
            Json::Value(v) => v.get(key).and_then(Value::as_str),
            Json::Raw(r) => r.value().get(key).and_then(Value::as_str),
            Json::Object(m) => match m.get(key)? {
                Json::Value(v) => v.as_str(),
                Json::Raw(r) => r.value().as_str(),
                _ => None,
            },
            Json::Array(_) => None,
        }
    }

    /// Member `key` of an object, read as a `T`.
    pub fn read_member<T: DeserializeOwned>(&self, key: &str) -> Option<serde_json::Result<T>> {
        match self {
            Json::Value(v) => v.get(key).map(T::deserialize),
            Json::Object(m) => m.get(key).map(Json::read),
            Json::Raw(r) => r.value().get(key).map(T::deserialize),
            Json::Array(_) => None,
        }
    }

    /// This value read as a `T`.
    pub fn read<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        match self {
            Json::Value(v) => T::deserialize(v),
            Json::Raw(r) => T::deserialize(r.value()),
            other => T::deserialize(other.to_value()),
        }
    }
}

impl From<Value> for Json {
    fn from(v: Value) -> Self {
        Json::Value(v)
    }
}

/// A node of a [`Json`] tree, borrowed however it is held: reading a few members this way
/// costs nothing, where [`Json::read`] builds the whole value first.
#[derive(Debug, Clone, Copy)]
pub enum Node<'a> {
    Json(&'a Json),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    /// `j` as a node.
    pub fn of(j: &'a Json) -> Node<'a> {
        match j {
            Json::Value(v) => Node::Value(v),
            Json::Raw(r) => Node::Value(r.value()),
            other => Node::Json(other),
        }
    }

    /// Member `key` of an object.
    pub fn get(self, key: &str) -> Option<Node<'a>> {
        match self {
            Node::Value(v) => v.get(key).map(Node::Value),
            Node::Json(Json::Object(m)) => m.get(key).map(Node::of),
            Node::Json(j @ (Json::Value(_) | Json::Raw(_))) => Node::of(j).get(key),
            Node::Json(Json::Array(_)) => None,
        }
    }

    /// The string, when this is one.
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            Node::Value(v) => v.as_str(),
            Node::Json(j @ (Json::Value(_) | Json::Raw(_))) => Node::of(j).as_str(),
            Node::Json(_) => None,
        }
    }

    /// The integer, when this is one.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Node::Value(v) => v.as_i64(),
            Node::Json(j @ (Json::Value(_) | Json::Raw(_))) => Node::of(j).as_i64(),
            Node::Json(_) => None,
        }
    }

    /// The items of an array (none for anything else).
    pub fn items(self) -> Vec<Node<'a>> {
        match self {
            Node::Value(Value::Array(a)) => a.iter().map(Node::Value).collect(),
            Node::Json(Json::Array(a)) => a.iter().map(Node::of).collect(),
            Node::Json(j @ (Json::Value(_) | Json::Raw(_))) => Node::of(j).items(),
            _ => Vec::new(),
        }
    }
}

/// Equal as JSON values (how they are held does not matter).
impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Json::Value(a), b) | (b, Json::Value(a)) => b.eq_value(a),
            (a, b) => a.to_value() == b.to_value(),
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Value(v) => v.serialize(s),
            Json::Raw(r) => r.serialize(s),
            Json::Object(m) => s.collect_map(m),
            Json::Array(a) => s.collect_seq(a),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Json::Value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> (Json, Value) {
        let probe =
            json!({"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 1});
        let env = json!({"name": "CA_ADDR", "value": "istiod.istio-system.svc:15012"});
        let mut m = BTreeMap::new();
        m.insert("name".to_string(), Json::Value(json!("istio-proxy")));
        m.insert("startupProbe".to_string(), Json::Raw(Raw::new(&probe)));
        m.insert(
            "env".to_string(),
            Json::Array(vec![
                Json::Raw(Raw::new(&env)),
                Json::Value(json!({"name": "X", "value": "a\"b"})),
            ]),
        );
        let want = json!({
            "name": "istio-proxy",
            "startupProbe": probe,
            "env": [env, {"name": "X", "value": "a\"b"}],
        });
        (Json::Object(m), want)
    }

    #[test]
    fn writes_the_bytes_of_the_equivalent_value() {
        let (j, v) = sample();
        assert_eq!(
            serde_json::to_string(&j).expect("json"),
            serde_json::to_string(&v).expect("json")
        );
        assert_eq!(serde_json::to_value(&j).expect("json"), v);
        assert_eq!(j.to_value(), v);
    }

    #[test]
    fn compares_as_json_values() {
        let (j, v) = sample();
        assert!(j.eq_value(&v));
        assert_eq!(j, Json::Value(v.clone()));
        let mut other = v.clone();
        other["startupProbe"]["periodSeconds"] = json!(2);
        assert!(!j.eq_value(&other));
        other = v.clone();
        other["env"].as_array_mut().expect("env").pop();
        assert!(!j.eq_value(&other));
        assert!(!j.eq_value(&json!([])));
    }

    #[test]
    fn members_read() {
        let (j, v) = sample();
        assert_eq!(j.str_member("name"), Some("istio-proxy"));
        assert!(j.read_member::<Value>("nope").is_none());
        let probe: std::collections::BTreeMap<String, Value> = j
            .read_member("startupProbe")
            .expect("member")
            .expect("a mapping");
        assert_eq!(
            Value::Object(probe.into_iter().collect()),
            v["startupProbe"]
        );
        assert!(j
            .read_member::<u32>("startupProbe")
            .expect("member")
            .is_err());
        let Json::Object(m) = &j else {
            panic!("object")
        };
        let Some(Json::Array(env)) = m.get("env") else {
            panic!("env")
        };
        assert_eq!(env[0].str_member("name"), Some("CA_ADDR"));
        assert_eq!(env[0].str_member("nope"), None);
        assert_eq!(env[1].str_member("name"), Some("X"));
        // A nested object's member is not the object's.
        let nested = Json::Raw(Raw::new(&json!({"name": "A", "nested": {"name": "B"}})));
        assert_eq!(nested.str_member("name"), Some("A"));
        assert_eq!(
            nested.read_member::<String>("name").map(Result::ok),
            Some(Some("A".to_string()))
        );
    }

    #[test]
    fn raw_reads_back_exactly_what_it_was_written_from() {
        // Floats that do not survive a text round trip without float_roundtrip, and nesting
        // deeper than serde_json's parser allows.
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        for v in [json!(971.9863718547629), json!([0.1, 1e300, -2.5e-8]), deep] {
            let r = Raw::new(&v);
            assert_eq!(r.value(), &v);
            assert!(Json::Raw(r.clone()).eq_value(&v));
            assert_eq!(Json::Raw(r), Json::Value(v));
        }
    }
}
