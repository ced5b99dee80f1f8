#!/usr/bin/env bash
# Usage: scripts/candle-kernels-stub.sh DIR
# Writes a type-checking stand-in for candle-kernels into DIR: the registry crate's Rust
# sources unchanged, its build script replaced by one that writes empty PTX files and no
# static library. candle-kernels' real build script compiles every candle CUDA kernel with
# nvcc (over 15 minutes on 2 cores); `cargo check`/`clippy` of candle-core (cuda) only need
# its Rust items. CI patches it in for checking the `candle-cuda` feature:
#   cargo clippy --config "patch.crates-io.candle-kernels.path='DIR'" ...
# Never for builds that link or run: the PTX is empty.
set -euo pipefail
dest=${1:?usage: $0 DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
# The version Cargo.lock pins, its sources downloaded (a no-op when already there).
version=$(grep -A1 '^name = "candle-kernels"$' "$root/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p')
[ -n "$version" ] || { echo "candle-kernels not in $root/Cargo.lock" >&2; exit 1; }
cargo fetch --quiet --manifest-path "$root/Cargo.toml"
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"candle-kernels-$version" | head -1)
[ -d "$src/src" ] || { echo "candle-kernels $version not in the cargo registry (run cargo fetch)" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
cp -r "$src/src" "$dest/"
cat > "$dest/Cargo.toml" << EOF
[package]
name = "candle-kernels"
version = "$version"
edition = "2021"
build = "build.rs"

[lib]
path = "src/lib.rs"

[features]
cutile = []
EOF
cat > "$dest/build.rs" << 'EOF'
// Type-checking stand-in: empty PTX for every kernel module, no static library.
use std::{env, fs, path::PathBuf};
fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    fs::copy("src/ptx.rs", out.join("ptx.rs")).unwrap();
    for entry in fs::read_dir("src").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
            fs::write(out.join(stem + ".ptx"), "").unwrap();
        }
    }
}
EOF
echo "candle-kernels $version stand-in in $dest"
