//! The example configurations under config/ load and validate (the reference file is checked
//! by a unit test in src/config.rs).

use tsa::config::Config;

#[test]
fn every_example_configuration_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config =
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            if config.archive.backend == tsa::config::ArchiveBackend::Postgres {
                // The connection string parses (the log line names what it found).
                let location = tsa::archive::postgres::describe(&config.archive);
                assert!(
                    location.starts_with("host="),
                    "{}: {location}",
                    path.display()
                );
            }
            seen += 1;
        }
    }
    assert!(seen >= 3, "examples found: {seen}");
}
