//! Replays, on stable Rust and without libFuzzer, every input the fuzz targets keep:
//! each target's seeds (`fuzz/seeds/<target>/`) and every input that once made it fail
//! (`fuzz/regressions/<target>/`), through the same target bodies the fuzzer runs
//! (`fuzz/src/lib.rs`). A fixed finding stays fixed: `cargo test --test fuzz_regressions`.

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/lib.rs"]
mod targets;

/// The files of `dir`, sorted (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut replayed = 0;
    for (name, body) in targets::TARGETS {
        for file in inputs(&root.join(name)) {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            eprintln!("{name}: {}", file.display());
            body(&data);
            replayed += 1;
        }
    }
    // A directory named for no target is a target renamed without its inputs.
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = dir.file_name();
        assert!(
            targets::TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/{kind}/{} names no target",
            name.to_string_lossy()
        );
    }
    replayed
}

#[test]
fn every_seed_passes_its_target() {
    assert!(replay("seeds") > 0, "the seeds are in the repository");
}

#[test]
fn every_kept_finding_stays_fixed() {
    replay("regressions");
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for (name, _) in targets::TARGETS {
        assert!(
            dir.join(format!("{name}.rs")).is_file(),
            "fuzz/fuzz_targets/{name}.rs"
        );
    }
}
