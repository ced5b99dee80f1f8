#!/usr/bin/env bash
# Installs the longattn C library into PREFIX: lib/liblongattn.{so,a}, include/longattn.h,
# lib/pkgconfig/longattn.pc and lib/cmake/longattn/ (find_package(longattn) gives the
# targets longattn::longattn (shared) and longattn::static).
#
#   scripts/install-c-lib.sh PREFIX [--debug]
#
# The library carries the CUDA kernels when the crate was built with nvcc (see README), and
# the CPU entry points always. --debug installs the dev-profile build (faster to build; CI).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:?usage: scripts/install-c-lib.sh PREFIX [--debug]}
profile=release
[ "${2:-}" = "--debug" ] && profile=debug
if [ "$profile" = release ]; then cargo build --release --lib; else cargo build --lib; fi
target=${CARGO_TARGET_DIR:-target}/$profile
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
major=${version%%.*}
minor=${version#*.}; minor=${minor%%.*}
# The static library's system dependencies, as rustc reports them for this target.
native="-ldl -lm -lrt -lpthread -lutil -lgcc_s -lstdc++"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/lib/cmake/longattn" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
install -m 644 include/longattn.h "$prefix/include/"
install -m 755 "$target/liblongattn.so" "$prefix/lib/"
install -m 644 "$target/liblongattn.a" "$prefix/lib/"
cat > "$prefix/lib/pkgconfig/longattn.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: longattn
Description: Attention kernels for long-context and local attention (C API)
Version: $version
Libs: -L\${libdir} -llongattn
Libs.private: $native
Cflags: -I\${includedir}
PC
cat > "$prefix/lib/cmake/longattn/longattnConfig.cmake" <<CM
# longattn $version: imported targets longattn::longattn (shared) and longattn::static.
get_filename_component(_longattn_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET longattn::longattn)
  add_library(longattn::longattn SHARED IMPORTED)
  set_target_properties(longattn::longattn PROPERTIES
    IMPORTED_LOCATION "\${_longattn_prefix}/lib/liblongattn.so"
    INTERFACE_INCLUDE_DIRECTORIES "\${_longattn_prefix}/include")
  add_library(longattn::static STATIC IMPORTED)
  set_target_properties(longattn::static PROPERTIES
    IMPORTED_LOCATION "\${_longattn_prefix}/lib/liblongattn.a"
    INTERFACE_INCLUDE_DIRECTORIES "\${_longattn_prefix}/include"
    INTERFACE_LINK_LIBRARIES "$(echo $native | sed 's/-l//g')")
endif()
unset(_longattn_prefix)
CM
cat > "$prefix/lib/cmake/longattn/longattnConfigVersion.cmake" <<CM
# 0.x releases are compatible within a minor version, later ones within a major version.
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif(NOT PACKAGE_FIND_VERSION_MAJOR EQUAL $major)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif($major EQUAL 0 AND NOT PACKAGE_FIND_VERSION_MINOR EQUAL $minor)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION VERSION_EQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
CM
echo "installed longattn $version ($profile) into $prefix"
