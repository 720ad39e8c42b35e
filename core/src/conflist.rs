//! Chaining podwire into the primary CNI configuration, as pure transforms.
//!
//! kubelet/libcni read `*.conf`, `*.conflist` and `*.json` in the config dir in lexical order
//! and use the first valid one; podwire does the same to find the primary, appends exactly one
//! `podwire-cni` entry to its `plugins`, and wraps a single-plugin `.conf` into a `.conflist`
//! of the same stem (which sorts in the same place), remembering that so uninstall can undo it.

use serde_json::{json, Map, Value};

pub const PLUGIN_TYPE: &str = "podwire-cni";
/// Key in podwire's entry recording the `.conf` file it was wrapped from.
pub const CONVERTED_FROM: &str = "podwireConvertedFrom";
/// Key in podwire's entry listing what wrapping a `.conf` had to add (its `cniVersion` or
/// `name`, when it had none), so that uninstall gives the file back without them.
pub const ADDED_KEYS: &str = "podwireAddedKeys";
/// Both markers: what podwire's entry records about a wrapped `.conf`.
const MARKERS: [&str; 2] = [CONVERTED_FROM, ADDED_KEYS];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `.conf` / `.json`: one plugin object.
    Single,
    /// `.conflist`: `{"plugins": [...]}`.
    List,
}

pub fn kind_of(file_name: &str) -> Option<Kind> {
    if file_name.starts_with('.') {
        return None;
    }
    if file_name.ends_with(".conflist") {
        Some(Kind::List)
    } else if file_name.ends_with(".conf") || file_name.ends_with(".json") {
        Some(Kind::Single)
    } else {
        None
    }
}

/// Parse a candidate file as libcni would; `Err` says why it is not a usable config.
pub fn parse(file_name: &str, bytes: &[u8]) -> Result<Value, String> {
    let kind = kind_of(file_name).ok_or("not a CNI config file name")?;
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    // libcni decodes both into Go strings: another JSON type (null aside, which Go reads as
    // absent) makes the file unusable, and a .conf wrapped with it would give a conflist
    // libcni refuses.
    for key in ["cniVersion", "name"] {
        if obj
            .get(key)
            .is_some_and(|v| !(v.is_string() || v.is_null()))
        {
            return Err(format!("\"{key}\" is not a string"));
        }
    }
    match kind {
        Kind::List => {
            let plugins = obj
                .get("plugins")
                .and_then(Value::as_array)
                .ok_or("no \"plugins\" list")?;
            if plugins.is_empty() {
                return Err("empty \"plugins\" list".into());
            }
            if plugins
                .iter()
                .any(|p| p.get("type").and_then(Value::as_str).is_none())
            {
                return Err("a plugin has no \"type\"".into());
            }
            if obj.get("name").and_then(Value::as_str).is_none() {
                return Err("no \"name\"".into());
            }
        }
        Kind::Single => {
            if obj.get("type").and_then(Value::as_str).is_none() {
                return Err("no \"type\"".into());
            }
        }
    }
    Ok(v)
}

/// The primary config: the lexically first usable file. `files` are (name, bytes) in any
/// order; returns the chosen index and the reasons others were skipped.
pub fn pick_primary(files: &[(String, Vec<u8>)]) -> (Option<usize>, Vec<String>) {
    let mut order: Vec<usize> = (0..files.len())
        .filter(|&i| kind_of(&files[i].0).is_some())
        .collect();
    order.sort_by(|&a, &b| files[a].0.cmp(&files[b].0));
    let mut skipped = Vec::new();
    for i in order {
        match parse(&files[i].0, &files[i].1) {
            Ok(_) => return (Some(i), skipped),
            Err(e) => skipped.push(format!("{}: {e}", files[i].0)),
        }
    }
    (None, skipped)
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn without_marker(p: &Value) -> Value {
    let mut p = p.clone();
    if let Some(o) = p.as_object_mut() {
        for m in MARKERS {
            o.remove(m);
        }
    }
    p
}

/// A config file's name without its extension (`10-net.conf` → `10-net`).
fn stem(file_name: &str) -> &str {
    file_name.rsplit_once('.').map_or(file_name, |(s, _)| s)
}

/// Is `config` already chained with exactly this entry, in last position?
pub fn is_chained(config: &Value, entry: &Value) -> bool {
    let Some(plugins) = config.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    plugins.iter().filter(|p| is_ours(p)).count() == 1
        && plugins
            .last()
            .is_some_and(|p| without_marker(p) == without_marker(entry))
}

/// The chained config and the file name it must be written under. A `.conflist` keeps its name;
/// a single-plugin file becomes `<stem>.conflist` keeping its `cniVersion` and `name`.
pub fn chain(file_name: &str, config: &Value, entry: &Value) -> Result<(String, Value), String> {
    let mut entry = without_marker(entry);
    let (name, mut list) = match kind_of(file_name) {
        Some(Kind::List) => (file_name.to_string(), config.clone()),
        Some(Kind::Single) => {
            let mut plugin = config.as_object().cloned().ok_or("not a JSON object")?;
            let mut added = Vec::new();
            let mut take = |key: &'static str, default: &str| {
                // null is absent to libcni's Go decoder, and a conflist needs a string.
                plugin
                    .remove(key)
                    .filter(|v| !v.is_null())
                    .unwrap_or_else(|| {
                        added.push(key);
                        json!(default)
                    })
            };
            let cni_version = take("cniVersion", "0.3.1");
            let net_name = take("name", "podwire");
            let stem = stem(file_name);
            if let Some(o) = entry.as_object_mut() {
                o.insert(CONVERTED_FROM.into(), json!(file_name));
                if !added.is_empty() {
                    o.insert(ADDED_KEYS.into(), json!(added));
                }
            }
            let mut list = Map::new();
            list.insert("cniVersion".into(), cni_version);
            list.insert("name".into(), net_name);
            list.insert("plugins".into(), json!([Value::Object(plugin)]));
            (format!("{stem}.conflist"), Value::Object(list))
        }
        None => return Err(format!("{file_name} is not a CNI config file name")),
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("no \"plugins\" list")?;
    // An entry written by an earlier install keeps its record of a wrapped .conf.
    if let (Some(old), Some(o)) = (plugins.iter().find(|p| is_ours(p)), entry.as_object_mut()) {
        for m in MARKERS {
            if let Some(v) = old.get(m) {
                o.insert(m.into(), v.clone());
            }
        }
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    Ok((name, list))
}

/// Undo [`chain`]: `None` when the config holds no podwire entry; otherwise the file name and
/// content to write (a wrapped `.conf` comes back as it was, in meaning).
pub fn unchain(file_name: &str, config: &Value) -> Option<(String, Value)> {
    let plugins = config.get("plugins")?.as_array()?;
    let ours = plugins.iter().find(|p| is_ours(p))?;
    let rest: Vec<Value> = plugins.iter().filter(|p| !is_ours(p)).cloned().collect();
    // The record names the .conf this very file was wrapped from (same stem): anything else
    // is not podwire's record, and is never used as a path to write.
    let from = ours
        .get(CONVERTED_FROM)
        .and_then(Value::as_str)
        .filter(|f| {
            kind_of(f) == Some(Kind::Single) && !f.contains('/') && stem(f) == stem(file_name)
        });
    if let (Some(from), [single]) = (from, rest.as_slice()) {
        let mut plugin = single.as_object().cloned().unwrap_or_default();
        let added = ours.get(ADDED_KEYS).and_then(Value::as_array);
        let mut conf = Map::new();
        for key in ["cniVersion", "name"] {
            if added.is_some_and(|a| a.iter().any(|k| k == key)) {
                continue;
            }
            if let Some(v) = config.get(key) {
                conf.insert(key.into(), v.clone());
            }
        }
        conf.append(&mut plugin);
        return Some((from.to_string(), Value::Object(conf)));
    }
    let mut out = config.clone();
    if let Some(p) = out.get_mut("plugins") {
        *p = Value::Array(rest);
    }
    Some((file_name.to_string(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        json!({"type": "podwire-cni", "agentSocket": "/run/a.sock"})
    }

    #[test]
    fn primary_is_the_first_valid_file_in_lexical_order() {
        let files = vec![
            (
                "20-b.conflist".to_string(),
                br#"{"name":"b","plugins":[{"type":"bridge"}]}"#.to_vec(),
            ),
            ("10-a.conflist".to_string(), b"{broken".to_vec()),
            ("05-readme.txt".to_string(), b"hi".to_vec()),
            (".10-z.conflist.podwire.tmp".to_string(), b"{}".to_vec()),
            (
                "15-c.conf".to_string(),
                br#"{"cniVersion":"0.3.1","name":"c","type":"flannel"}"#.to_vec(),
            ),
        ];
        let (i, skipped) = pick_primary(&files);
        assert_eq!(i.map(|i| files[i].0.as_str()), Some("15-c.conf"));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].starts_with("10-a.conflist"));
    }

    #[test]
    fn chain_twice_is_one_entry_and_unchain_restores() {
        let conf = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}, {"type": "portmap"}]});
        let (name, once) = chain("10-calico.conflist", &conf, &entry()).expect("chain");
        let (_, twice) = chain(&name, &once, &entry()).expect("chain again");
        assert_eq!(once, twice);
        assert!(is_chained(&twice, &entry()));
        assert_eq!(
            unchain(&name, &twice),
            Some(("10-calico.conflist".into(), conf.clone()))
        );
        assert_eq!(unchain("10-calico.conflist", &conf), None);
    }

    #[test]
    fn single_conf_is_wrapped_and_comes_back() {
        let conf = json!({"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel", "delegate": {"hairpinMode": true}});
        let (name, list) = chain("10-flannel.conf", &conf, &entry()).expect("chain");
        assert_eq!(name, "10-flannel.conflist");
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["plugins"][1][CONVERTED_FROM], "10-flannel.conf");
        assert!(is_chained(&list, &entry()));
        // A later install (new entry settings) keeps the record of the wrap.
        let (_, again) = chain(&name, &list, &json!({"type": "podwire-cni"})).expect("chain");
        assert_eq!(again["plugins"][1][CONVERTED_FROM], "10-flannel.conf");
        assert_eq!(
            unchain(&name, &again),
            Some(("10-flannel.conf".into(), conf))
        );
    }

    #[test]
    fn a_version_or_name_that_is_not_a_string_is_not_a_usable_config() {
        for bad in [
            json!({"type": "bridge", "name": true}),
            json!({"type": "bridge", "cniVersion": 1}),
        ] {
            let e = parse("10-br.conf", &serde_json::to_vec(&bad).expect("JSON"));
            assert!(e.is_err_and(|e| e.contains("is not a string")), "{bad}");
        }
        let list = json!({"name": "n", "cniVersion": 3, "plugins": [{"type": "bridge"}]});
        let e = parse("10-br.conflist", &serde_json::to_vec(&list).expect("JSON"));
        assert!(e.is_err_and(|e| e.contains("\"cniVersion\" is not a string")));
        // null reads as absent, as in Go; wrapping then supplies it.
        let conf = json!({"type": "bridge", "name": null});
        assert!(parse("10-br.conf", &serde_json::to_vec(&conf).expect("JSON")).is_ok());
        let (name, list) = chain("10-br.conf", &conf, &entry()).expect("chain");
        assert!(parse(&name, &serde_json::to_vec(&list).expect("JSON")).is_ok());
    }

    #[test]
    fn a_record_that_is_not_this_files_wrap_is_not_followed() {
        for from in [
            "../../etc/cron.d/x.conf",
            "other.conf",
            "10-net.conflist",
            "podwire-cni",
        ] {
            let list = json!({"name": "n", "cniVersion": "1.0.0", "plugins": [
                {"type": "bridge"}, {"type": PLUGIN_TYPE, CONVERTED_FROM: from}]});
            let (name, back) = unchain("10-net.conflist", &list).expect("ours");
            assert_eq!(name, "10-net.conflist", "{from}");
            assert_eq!(back["plugins"], json!([{"type": "bridge"}]), "{from}");
        }
    }

    #[test]
    fn a_conf_without_version_or_name_comes_back_without_them() {
        // The conflist needs both; the .conf did not have them (found by fuzzing).
        let conf = json!({"type": "bridge", "bridge": "cni0"});
        let (name, list) = chain("10-br.conf", &conf, &entry()).expect("chain");
        assert_eq!(
            (&list["cniVersion"], &list["name"]),
            (&json!("0.3.1"), &json!("podwire"))
        );
        assert!(parse(&name, &serde_json::to_vec(&list).expect("JSON")).is_ok());
        let newer = json!({"type": "podwire-cni"});
        let (_, again) = chain(&name, &list, &newer).expect("chain");
        assert!(is_chained(&again, &newer));
        assert_eq!(unchain(&name, &again), Some(("10-br.conf".into(), conf)));
        // Only what was missing is dropped.
        let named = json!({"type": "bridge", "name": "br"});
        let (name, list) = chain("10-br.conf", &named, &entry()).expect("chain");
        assert_eq!(unchain(&name, &list), Some(("10-br.conf".into(), named)));
    }
}
