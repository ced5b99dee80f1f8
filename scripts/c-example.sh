#!/usr/bin/env bash
# Installs the C library into a temporary prefix, builds examples/c with CMake against it
# (find_package) and with pkg-config, and runs the check against the Rust f64 reference.
#   scripts/c-example.sh [--debug]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
scripts/install-c-lib.sh "$work/prefix" "${1:-}" > /dev/null
cargo run -q --example c_fixture -- "$work/fixture.bin"
cmake -S examples/c -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" > /dev/null
cmake --build "$work/build" > /dev/null
"$work/build/longattn_check" "$work/fixture.bin"
# The same program through pkg-config, linked statically.
PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" sh -c \
  'c++ -std=c++17 examples/c/check.cpp -o "$0/longattn_check_static" $(pkg-config --cflags longattn) \
     "$(pkg-config --variable=libdir longattn)/liblongattn.a" $(pkg-config --libs-only-l --static longattn | sed "s/-llongattn//")' "$work"
"$work/longattn_check_static" "$work/fixture.bin"
