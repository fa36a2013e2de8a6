//! Regenerates `tests/support/proto/echo.rs` from `tests/support/proto/echo.proto`.
//!
//! Uses the pure-Rust `protox` compiler, so no `protoc` is needed:
//!
//! ```text
//! cargo run --manifest-path tests/proto-gen/Cargo.toml
//! ```
//!
//! (Set `CARGO_TARGET_DIR=/tmp/proto-gen-target` to keep its build out of the tree.)

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

const HEADER: &str = "\
// @generated from tests/support/proto/echo.proto by tests/proto-gen. Do not edit.
//
// Regenerate (no protoc needed) from the crate root with:
//   cargo run --manifest-path tests/proto-gen/Cargo.toml

";

fn main() -> Result<(), Box<dyn Error>> {
    let proto_dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../support/proto");
    let proto_dir = proto_dir.canonicalize()?;
    let fds = protox::compile([proto_dir.join("echo.proto")], [&proto_dir])?;

    let tmp = std::env::temp_dir().join(format!("tonic-pool-proto-gen-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(&tmp)
        .compile_fds(fds)?;

    let generated = fs::read_to_string(tmp.join("echo.rs"))?;
    fs::remove_dir_all(&tmp)?;

    let out = proto_dir.join("echo.rs");
    fs::write(&out, format!("{HEADER}{generated}"))?;
    println!("wrote {}", out.display());
    Ok(())
}
