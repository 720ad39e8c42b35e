//! `podwire-agent install / uninstall / install --watch` on temp dirs, with the real binary.

use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_podwire-agent");

fn fixtures(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/install")
        .join(case)
}

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/install")
        .join(case)
}

struct Dirs {
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    plugin: PathBuf,
}

fn dirs(case: Option<&str>) -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (bin, conf) = (tmp.path().join("bin"), tmp.path().join("net.d"));
    fs::create_dir_all(&conf).expect("mkdir");
    if let Some(case) = case {
        for e in fs::read_dir(fixtures(case)).expect("fixtures").flatten() {
            fs::copy(e.path(), conf.join(e.file_name())).expect("copy fixture");
        }
    }
    let plugin = tmp.path().join("podwire-cni");
    fs::write(&plugin, b"#!/bin/sh\necho podwire-cni stand-in\n").expect("plugin");
    Dirs {
        _tmp: tmp,
        bin,
        conf,
        plugin,
    }
}

fn args(d: &Dirs) -> Vec<&std::ffi::OsStr> {
    vec![
        "--cni-bin-dir".as_ref(),
        d.bin.as_os_str(),
        "--cni-conf-dir".as_ref(),
        d.conf.as_os_str(),
        "--plugin-binary".as_ref(),
        d.plugin.as_os_str(),
    ]
}

fn agent(cmd: &str, d: &Dirs, extra: &[&str]) -> Output {
    Command::new(AGENT)
        .arg(cmd)
        .args(args(d))
        .args(extra)
        .output()
        .expect("run podwire-agent")
}

/// The conf dir as (name, parsed JSON or raw text), sorted.
fn snapshot(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read_to_string(e.path()).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::String(text.to_string()))
}

fn podwire_entries(text: &str) -> usize {
    parsed(text)["plugins"].as_array().map_or(0, |p| {
        p.iter().filter(|x| x["type"] == "podwire-cni").count()
    })
}

#[test]
fn golden_results_for_calico_flannel_and_cilium() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for case in ["calico", "flannel", "cilium"] {
        let d = dirs(Some(case));
        let before = snapshot(&d.conf);
        let out = agent("install", &d, &[]);
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = snapshot(&d.conf);
        let gdir = golden(case);
        if update {
            let _ = fs::remove_dir_all(&gdir);
            fs::create_dir_all(&gdir).expect("mkdir golden");
            for (n, t) in &after {
                fs::write(gdir.join(n), t).expect("write golden");
            }
        }
        assert_eq!(after, snapshot(&gdir), "{case}: conf dir differs from tests/golden/install/{case} (UPDATE_GOLDEN=1 to rewrite)");
        assert_eq!(
            fs::read(d.bin.join("podwire-cni")).expect("binary"),
            fs::read(&d.plugin).expect("src")
        );

        // Installing again changes nothing.
        let out = agent("install", &d, &[]);
        assert!(out.status.success());
        assert_eq!(
            snapshot(&d.conf),
            after,
            "{case}: second install changed the dir"
        );

        // Uninstall gives back the original meaning, file names included, and removes the binary.
        let out = agent("uninstall", &d, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restored = snapshot(&d.conf);
        let names = |s: &[(String, String)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&restored), names(&before), "{case}");
        for ((n, a), (_, b)) in restored.iter().zip(&before) {
            assert_eq!(parsed(a), parsed(b), "{case}: {n} not restored");
        }
        assert!(!d.bin.join("podwire-cni").exists());
    }
}

#[test]
fn chained_file_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let d = dirs(Some("calico"));
    let f = d.conf.join("10-calico.conflist");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(agent("install", &d, &[]).status.success());
    assert_eq!(
        fs::metadata(&f).expect("stat").permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn an_unsupported_primary_version_is_refused_and_left_alone() {
    let d = dirs(None);
    let f = d.conf.join("10-old.conflist");
    fs::write(
        &f,
        r#"{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("write");
    let out = agent("install", &d, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10-old.conflist") && err.contains("0.2.0"),
        "{err}"
    );
    assert_eq!(podwire_entries(&fs::read_to_string(&f).expect("read")), 0);
}

#[test]
fn install_waits_for_a_primary_config() {
    let d = dirs(None);
    let mut child = Command::new(AGENT)
        .arg("install")
        .args(args(&d))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // It says it waits (the event), and is then still running.
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let said = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("no primary CNI config"));
    assert!(said.is_some(), "install did not say it waits");
    std::thread::spawn(move || lines.for_each(drop));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "install must wait while there is no primary config"
    );
    fs::write(
        d.conf.join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "install did not notice the new config within 3s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert_eq!(
        podwire_entries(&fs::read_to_string(d.conf.join("10-bridge.conflist")).expect("read")),
        1
    );
}

/// Runs `podwire-agent CMD` to completion, failing (not hanging) past `limit`.
fn agent_within(cmd: &str, d: &Dirs, limit: Duration) -> std::process::ExitStatus {
    let mut child = Command::new(AGENT)
        .arg(cmd)
        .args(args(d))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("podwire-agent {cmd} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 9, item 3: `10-bridge.conflist -> ../real/bridge.conflist`, as config managers do.
#[test]
fn a_symlinked_primary_is_chained_through_the_link_and_restored() {
    use std::os::unix::fs::PermissionsExt;
    let d = dirs(None);
    let real = d.conf.parent().expect("tmp").join("real");
    fs::create_dir_all(&real).expect("mkdir");
    let original = r#"{"cniVersion":"1.0.0","name":"lab","plugins":[{"type":"bridge"}]}"#;
    fs::write(real.join("bridge.conflist"), original).expect("target");
    fs::set_permissions(
        real.join("bridge.conflist"),
        fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    let link = d.conf.join("10-bridge.conflist");
    std::os::unix::fs::symlink("../real/bridge.conflist", &link).expect("symlink");
    let is_our_link = || {
        fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink())
            && fs::read_link(&link).is_ok_and(|t| t == Path::new("../real/bridge.conflist"))
    };

    assert!(agent_within("install", &d, Duration::from_secs(10)).success());
    assert!(
        is_our_link(),
        "the link must stay a link to the same target"
    );
    let text = fs::read_to_string(real.join("bridge.conflist")).expect("target");
    assert_eq!(podwire_entries(&text), 1, "{text}");
    assert_eq!(parsed(&text)["plugins"][0]["type"], "bridge");
    assert_eq!(
        fs::metadata(real.join("bridge.conflist"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o640,
        "the target keeps its mode"
    );
    let names = |dir: &Path| {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&real), ["bridge.conflist"], "no temp file left");
    assert_eq!(names(&d.conf), ["10-bridge.conflist"]);

    // --watch: the config manager rewrites the target (temp + rename where it lives).
    let mut w = Command::new(AGENT)
        .arg("install")
        .args(args(&d))
        .arg("--watch")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn install --watch");
    let stderr = w.stderr.take().expect("stderr");
    let w = Watch(w);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("watching")),
        "install --watch did not start watching"
    );
    std::thread::spawn(move || lines.for_each(drop));
    let tmp = real.join(".bridge.new");
    fs::write(&tmp, original).expect("write");
    fs::rename(&tmp, real.join("bridge.conflist")).expect("rename");
    wait_until(Duration::from_secs(1), || {
        fs::read_to_string(real.join("bridge.conflist")).is_ok_and(|t| podwire_entries(&t) == 1)
    })
    .expect("re-inserted behind the link within 1s");
    drop(w);

    assert!(agent_within("uninstall", &d, Duration::from_secs(10)).success());
    assert!(is_our_link(), "uninstall keeps the link too");
    assert_eq!(
        parsed(&fs::read_to_string(real.join("bridge.conflist")).expect("target")),
        parsed(original)
    );
}

struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn watch(d: &Dirs) -> Watch {
    let child = Command::new(AGENT)
        .arg("install")
        .args(args(d))
        .arg("--watch")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn install --watch");
    let w = Watch(child);
    wait_until(Duration::from_secs(3), || chained(d)).expect("initial install");
    w
}

fn chained(d: &Dirs) -> bool {
    fs::read_to_string(d.conf.join("10-calico.conflist")).is_ok_and(|t| podwire_entries(&t) == 1)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Result<Duration, Duration> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            return Err(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(start.elapsed())
}

/// What the primary CNI does: write its own file (temp + rename), without podwire's entry.
fn primary_rewrites(d: &Dirs, i: usize) {
    let text = fs::read_to_string(fixtures("calico").join("10-calico.conflist"))
        .expect("fixture")
        .replace("\"mtu\": 1440", &format!("\"mtu\": {}", 1400 + i % 40));
    let tmp = d.conf.join(".calico-tmp");
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, d.conf.join("10-calico.conflist")).expect("rename");
}

#[test]
fn watch_reinserts_within_a_second_and_sigterm_undoes_it() {
    let d = dirs(Some("calico"));
    let w = watch(&d);
    primary_rewrites(&d, 7);
    let took = wait_until(Duration::from_secs(1), || chained(&d)).expect("re-inserted within 1s");
    eprintln!("re-inserted after {took:?}");
    let text = fs::read_to_string(d.conf.join("10-calico.conflist")).expect("read");
    assert_eq!(
        parsed(&text)["plugins"][0]["mtu"],
        1407,
        "the primary's own change must be kept"
    );

    // The binary disappearing is repaired too.
    fs::remove_file(d.bin.join("podwire-cni")).expect("rm");
    wait_until(Duration::from_secs(7), || {
        d.bin.join("podwire-cni").is_file()
    })
    .expect("binary restored");

    let pid = w.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let mut w = w;
    let status = w.0.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let text = fs::read_to_string(d.conf.join("10-calico.conflist")).expect("read");
    assert_eq!(
        podwire_entries(&text),
        0,
        "SIGTERM must remove podwire's entry"
    );
    assert_eq!(parsed(&text)["plugins"][0]["mtu"], 1407);
    assert!(!d.bin.join("podwire-cni").exists());
}

#[test]
fn a_rewrite_storm_always_leaves_valid_json_and_converges() {
    let d = dirs(Some("calico"));
    let mut w = watch(&d);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (bad, reads) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut bad, mut reads) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Both writers rename over the file, so it always exists and is always whole.
                let t = fs::read_to_string(d.conf.join("10-calico.conflist"))
                    .expect("the config must always exist");
                reads += 1;
                match serde_json::from_str::<Value>(&t) {
                    Ok(v) if podwire_entries(&t) <= 1 => drop(v),
                    _ => bad.push(t),
                }
            }
            (bad, reads)
        });
        for i in 0..200 {
            primary_rewrites(&d, i);
            std::thread::sleep(Duration::from_millis(2));
        }
        wait_until(Duration::from_secs(1), || chained(&d))
            .expect("converges within 1s of the storm");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().expect("reader")
    });
    assert!(
        bad.is_empty(),
        "{} of {reads} reads saw an invalid or doubly-chained file: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(reads > 50, "the reader must have looked ({reads} reads)");
    // The fight is reported.
    let _ = w.0.kill();
    let out = w.0.stderr.take().map(|mut e| {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
        s
    });
    assert!(
        out.unwrap_or_default().contains("keeps rewriting"),
        "the agent must say something keeps reverting it"
    );
}

#[test]
fn kill_9_mid_storm_never_leaves_a_torn_file() {
    let d = dirs(Some("calico"));
    for round in 0..3 {
        let w = watch(&d);
        for i in 0..40 {
            primary_rewrites(&d, i);
            if i == 20 + round * 5 {
                let _ = Command::new("kill")
                    .args(["-9", &w.0.id().to_string()])
                    .status();
            }
        }
        drop(w);
        for (n, t) in snapshot(&d.conf) {
            if n.ends_with(".conflist") && !n.starts_with('.') {
                assert!(
                    serde_json::from_str::<Value>(&t).is_ok(),
                    "round {round}: torn {n}: {t}"
                );
            }
        }
    }
    // A fresh install clears whatever temp files a killed one left.
    assert!(agent("install", &d, &[]).status.success());
    let leftovers: Vec<String> = snapshot(&d.conf)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.contains(".podwire-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
