//! The agent's chaining of podwire-cni into the primary CNI config, on configs libcni would
//! accept: chaining gives a config libcni still accepts, with exactly one podwire-cni entry,
//! last; chaining again changes nothing; unchaining gives back the original (its own
//! podwire-cni entries aside), under its own file name, a wrapped `.conf` included.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use podwire_core::conflist::{chain, is_chained, parse, unchain, CONVERTED_FROM, PLUGIN_TYPE};
use serde_json::{json, Map, Value};

const NAMES: &[&str] = &["10-net.conflist", "10-net.conf", "10-net.json", "net"];
const TYPES: &[&str] = &["bridge", "portmap", "tuning", "podwire-cni", "calico", ""];
const KEYS: &[&str] = &[
    "name",
    "cniVersion",
    "type",
    "plugins",
    "ipam",
    "podwireConvertedFrom",
    "agentSocket",
    "capabilities",
];

#[derive(Arbitrary, Debug)]
enum Leaf {
    Str(String),
    Type(u8),
    Num(i64),
    Bool(bool),
    Null,
}

#[derive(Arbitrary, Debug)]
struct Object {
    fields: Vec<(u8, Leaf)>,
    plugins: Option<Vec<Vec<(u8, Leaf)>>>,
}

fn leaf(l: &Leaf) -> Value {
    match l {
        Leaf::Str(s) => json!(s),
        Leaf::Type(i) => json!(TYPES[*i as usize % TYPES.len()]),
        Leaf::Num(n) => json!(n),
        Leaf::Bool(b) => json!(b),
        Leaf::Null => Value::Null,
    }
}

fn object(fields: &[(u8, Leaf)]) -> Map<String, Value> {
    fields
        .iter()
        .map(|(k, v)| (KEYS[*k as usize % KEYS.len()].to_string(), leaf(v)))
        .collect()
}

#[derive(Arbitrary, Debug)]
struct Input {
    name: u8,
    config: Object,
    raw: Option<Vec<u8>>,
}

fn ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let file = NAMES[input.name as usize % NAMES.len()];
    let bytes = match &input.raw {
        Some(raw) => raw.clone(),
        None => {
            let mut o = object(&input.config.fields);
            if let Some(plugins) = &input.config.plugins {
                let list: Vec<Value> = plugins.iter().map(|p| Value::Object(object(p))).collect();
                o.insert("plugins".into(), Value::Array(list));
            }
            serde_json::to_vec(&Value::Object(o)).expect("JSON")
        }
    };
    let Ok(config) = parse(file, &bytes) else {
        return;
    };
    // A .conf that is podwire-cni itself is not a primary network to chain into.
    if !file.ends_with(".conflist") && ours(&config) {
        return;
    }
    let entry = json!({"type": PLUGIN_TYPE, "agentSocket": "/run/podwire/agent.sock"});
    let (name, chained) = chain(file, &config, &entry)
        .unwrap_or_else(|e| panic!("a config libcni accepts cannot be chained: {e}\n{config}"));
    let written = serde_json::to_vec(&chained).expect("JSON");
    parse(&name, &written)
        .unwrap_or_else(|e| panic!("the chained config is not one libcni accepts: {e}\n{chained}"));
    assert!(is_chained(&chained, &entry), "not chained: {chained}");
    let plugins = chained["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.iter().filter(|p| ours(p)).count(), 1, "{chained}");
    assert!(ours(plugins.last().expect("a plugin")), "{chained}");
    // Again: nothing changes.
    let (name2, again) = chain(&name, &chained, &entry).expect("chain again");
    assert_eq!(
        (&name2, &again),
        (&name, &chained),
        "chaining twice changed it"
    );
    // A conflist podwire wrapped from a .conf before comes back as that .conf: checked by
    // the unit tests, not here.
    if config["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| ours(p) && p.get(CONVERTED_FROM).is_some()))
    {
        return;
    }
    // Undone: the original, podwire-cni entries aside.
    let (back_name, back) = unchain(&name, &chained).expect("an entry to remove");
    let mut want = config.clone();
    if file.ends_with(".conflist") {
        if let Some(Value::Array(p)) = want.get_mut("plugins") {
            p.retain(|p| !ours(p));
        }
    } else if let Some(o) = want.as_object_mut() {
        // null is absent to libcni.
        o.retain(|k, v| !(v.is_null() && (k == "cniVersion" || k == "name")));
    }
    assert_eq!(
        back_name, file,
        "unchained under another name: {config} -> {chained}"
    );
    assert_eq!(back, want, "unchaining does not give the original back");
});
