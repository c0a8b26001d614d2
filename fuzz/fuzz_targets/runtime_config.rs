//! `configuration.toml`: parsing and validation (`Config::from_toml_str`: TOML syntax, unknown
//! keys, types, ranges). A file that is accepted must validate again and survive a round trip
//! through serialisation unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pangolin_runtime_config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_toml_str(text) {
        Ok(config) => {
            assert!(config.validate().is_ok());
            let again = toml::to_string(&config).expect("an accepted config serialises");
            let back = Config::from_toml_str(&again).expect("its serialisation is accepted");
            assert_eq!(back, config, "round trip");
        }
        Err(e) => {
            let msg = e.to_string();
            // DESIGN.md: every error's Display is one line.
            assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        }
    }
});
