//! Replays every committed seed and regression input through its harness, so that a plain
//! `cargo test` (no libFuzzer, no nightly flags) proves they all pass.

use std::path::{Path, PathBuf};

fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("a readable directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let mut count = 0;
    for dir in [format!("corpus/{target}"), format!("regressions/{target}")] {
        for path in inputs(&dir) {
            let data = std::fs::read(&path).expect("a readable input");
            eprintln!("replaying {}", path.display());
            run(&data);
            count += 1;
        }
    }
    assert!(count > 0, "no committed input for {target}");
}

/// Every hostile_server seed and regression passes its invariants.
#[test]
fn hostile_server_inputs() {
    replay("hostile_server", crate::hostile_server::run);
}

/// Every resolver_answers seed and regression passes its invariants.
#[test]
fn resolver_answers_inputs() {
    replay("resolver_answers", crate::resolver_answers::run);
}

/// `Pool::close` returns only once every connection is closed: the pool holds no byte stream
/// when it returns. Minimized from the first `resolver_answers` finding (59 addresses, two
/// connections each, about half of them Ready).
#[test]
fn close_returns_before_drivers_end() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions/resolver_answers/close_returns_before_drivers_end");
    let data = std::fs::read(path).expect("the committed regression");
    crate::resolver_answers::run_with(&data, crate::pipe::Release::AtCloseReturn);
}
