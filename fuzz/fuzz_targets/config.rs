//! The config file and `SLUICE_*` variables. The input is the file's text, then (after a NUL
//! byte) one `NAME=value` variable per line, `SLUICE_` added to each name. What must hold:
//! loading never panics; a config that loads and passes `sanitize` loads again, identically,
//! from its own TOML (what `sluice config` prints is what a broker would run with).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::Config;

fuzz_target!(|data: &[u8]| {
    let (file, vars) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let dir = sluice_fuzz::scratch();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, file).unwrap();
    let env: Vec<(String, String)> = String::from_utf8_lossy(vars)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("SLUICE_{k}"), v.to_string()))
        .collect();
    let Ok(config) = Config::load(Some(&path), env) else {
        return;
    };
    if config.sanitize().is_err() {
        return;
    }
    let Ok(text) = toml::to_string(&config) else {
        return;
    };
    std::fs::write(&path, &text).unwrap();
    let again = Config::load(Some(&path), std::iter::empty())
        .unwrap_or_else(|e| panic!("a sane config does not load from its own TOML: {e}\n{text}"));
    assert_eq!(
        toml::to_string(&again).ok().as_deref(),
        Some(text.as_str()),
        "a config changes when loaded from its own TOML"
    );
});
