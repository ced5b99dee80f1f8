//! Compiles `kernels/*.cu` into a static library with nvcc and generates the Rust FFI from the
//! C headers in `kernels/include/longattn/`. Without nvcc the crate builds CPU-only (one
//! cargo warning says how to get a toolkit); `LONGATTN_REQUIRE_CUDA=1` makes that an error and
//! `LONGATTN_NO_CUDA=1` skips the search (CPU-only build even where nvcc exists).
//! nvcc runs at most `NUM_JOBS` (cargo's `-j`) processes at a time, each with `--threads=1`
//! unless spare jobs remain for its gencodes, largest file first, a worker taking the next file
//! as soon as it is free. An object is kept while its source, the headers, the flags and the
//! nvcc version are unchanged, so editing one kernel file recompiles that file only.

use std::env;
use std::path::{Path, PathBuf};

const DEFAULT_ARCHS: &str = "80,90a";
/// Where `scripts/install-cuda-toolkit.sh` puts the pinned PyPI toolkit:
/// `.cuda-venv/lib/python3.*/site-packages/nvidia/cu13` (any Python minor version).
const LOCAL_TOOLKIT: &str = ".cuda-venv/lib/python3.*/site-packages/nvidia/cu13";

/// The PyPI toolkit's root under the local venv, whatever the venv's Python version.
fn local_toolkit(manifest_dir: &Path) -> Option<PathBuf> {
    let lib = manifest_dir.join(".cuda-venv/lib");
    let mut roots: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .map(|p| p.join("site-packages/nvidia/cu13"))
        .filter(|p| p.join("bin/nvcc").is_file())
        .collect();
    roots.sort();
    roots.pop()
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(longattn_cuda)");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "LONGATTN_CUDA_ARCHS",
        "LONGATTN_REQUIRE_CUDA",
        "LONGATTN_NO_CUDA",
        "LONGATTN_PTXAS_VERBOSE",
        "LONGATTN_LINEINFO",
        "NUM_JOBS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-changed=build.rs");

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let require = env::var("LONGATTN_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let disabled = env::var("LONGATTN_NO_CUDA").is_ok_and(|v| v == "1");
    let nvcc = if disabled {
        None
    } else {
        find_nvcc(&manifest_dir)
    };
    let Some(nvcc) = nvcc else {
        if require {
            panic!(
                "LONGATTN_REQUIRE_CUDA=1 but nvcc was not found (looked at NVCC, CUDA_HOME, \
                 CUDA_PATH, PATH, {LOCAL_TOOLKIT}, /usr/local/cuda). Run \
                 scripts/install-cuda-toolkit.sh or set NVCC."
            );
        }
        println!(
            "cargo::warning=longattn: nvcc not found, building the CPU-only crate (GPU calls \
             return Error::CudaNotCompiled). To build the CUDA kernels run \
             scripts/install-cuda-toolkit.sh (pinned CUDA 13.0 from PyPI, no root) or set NVCC."
        );
        return;
    };

    let kernels = manifest_dir.join("kernels");
    let include = kernels.join("include");
    let toolkit_root = nvcc.parent().and_then(Path::parent).unwrap().to_path_buf();
    compile_kernels(&nvcc, &kernels, &include, &toolkit_root);
    generate_bindings(&include);
    println!("cargo::rustc-cfg=longattn_cuda");
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(nvcc) = env::var_os("NVCC") {
        candidates.push(nvcc.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            candidates.push(Path::new(&root).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    if let Some(root) = local_toolkit(manifest_dir) {
        candidates.push(root.join("bin/nvcc"));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    candidates.into_iter().find(|p| p.is_file())
}

fn compile_kernels(nvcc: &Path, kernels: &Path, include: &Path, toolkit_root: &Path) {
    let archs = env::var("LONGATTN_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    // nvcc is run directly, one process per file in parallel, with whole-program device
    // compilation: cc's CUDA mode adds --device-c, under which warp shuffles become calls and
    // the largest kernels spill. cc only archives the objects.
    let mut flags: Vec<String> = [
        "-c",
        "-std=c++17",
        "-O3",
        "-Xcompiler=-fPIC",
        "--expt-relaxed-constexpr",
        // A spill or local-memory use fails the build; LONGATTN_PTXAS_VERBOSE=1 prints the
        // full register/shared-memory report.
        "-Xptxas=-warn-spills,-warn-lmem-usage,-Werror",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.push(format!("-I{}", include.display()));
    if env::var("LONGATTN_PTXAS_VERBOSE").is_ok_and(|v| v == "1") {
        flags.push("-Xptxas=-v".into());
    }
    // Source-line tables for profilers (about 2.5x larger device code); LONGATTN_LINEINFO=0
    // drops them where binary size matters (the GPU-machine bundle).
    if !env::var("LONGATTN_LINEINFO").is_ok_and(|v| v == "0") {
        flags.push("-lineinfo".into());
    }
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let digits = arch.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            panic!("LONGATTN_CUDA_ARCHS entry {arch:?} is not of the form 80 or 90a");
        }
        flags.push(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    // Bounded parallelism: at most `jobs` nvcc processes at once (cargo's NUM_JOBS, else the
    // available parallelism), and nvcc's own gencode threads share what is left.
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let processes = jobs.min(sources.len()).max(1);
    flags.push(format!("--threads={}", (jobs / processes).max(1)));
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());

    // An object is reused while its key holds: the source, every header under kernels/include,
    // the flags and the nvcc version (touching one kernel file recompiles that file only).
    // Objects live in one directory per target dir, named by file and key, so that every
    // feature set and profile (each its own OUT_DIR) shares them: `--features nccl` after a
    // default build compiles no kernel again.
    let cache = kernel_cache_dir(&out_dir);
    std::fs::create_dir_all(&cache).expect("create the kernel object cache");
    let version = std::process::Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let mut shared = Vec::new();
    hash_tree(include, &mut shared);
    shared.extend_from_slice(&version);
    shared.extend(flags.iter().flat_map(|f| f.bytes().chain([0])));
    let units: Vec<(PathBuf, PathBuf, String)> = sources
        .iter()
        .map(|source| {
            let text = std::fs::read(source).expect("read a kernel source");
            let key = content_key(&[&shared, &text]);
            let stem = source.file_stem().unwrap().to_string_lossy();
            let object = cache.join(format!("{stem}-{key}.o"));
            (source.clone(), object, key)
        })
        .collect();
    // Largest sources first (a proxy for their compile time), each worker taking the next
    // file as soon as its last one is done, so no core waits for a slow neighbour.
    let mut order: Vec<usize> = (0..units.len()).collect();
    order
        .sort_by_key(|&i| std::cmp::Reverse(std::fs::metadata(&units[i].0).map_or(0, |m| m.len())));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, bool, String)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..processes)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = order.get(n) else { break };
                        let (source, object, key) = &units[i];
                        if object.is_file() {
                            done.push((i, true, String::new()));
                            continue;
                        }
                        // Written aside, then renamed: a build running beside this one never
                        // sees half an object under the key's name.
                        let partial = out_dir.join(format!("{key}.o.partial"));
                        let output = std::process::Command::new(nvcc)
                            .args(&flags)
                            .arg(source)
                            .arg("-o")
                            .arg(&partial)
                            .output()
                            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
                        let ok = output.status.success();
                        if ok {
                            std::fs::rename(&partial, object).expect("store a kernel object");
                        }
                        let log = String::from_utf8_lossy(&output.stderr).into_owned()
                            + &String::from_utf8_lossy(&output.stdout);
                        done.push((i, ok, log));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("an nvcc worker panicked"))
            .collect()
    });
    let mut archive = cc::Build::new();
    let mut failed = Vec::new();
    let mut results = results;
    results.sort_by_key(|r| r.0);
    for (i, ok, log) in results {
        for line in log.lines() {
            println!("cargo::warning={line}");
        }
        if !ok {
            failed.push(units[i].0.display().to_string());
        }
        archive.object(&units[i].1);
    }
    if !failed.is_empty() {
        panic!("nvcc failed on {}", failed.join(", "));
    }
    archive.compile("longattn_kernels");

    // x86_64 and aarch64 (GH200: targets/sbsa-linux) layouts of a system toolkit and the wheel.
    for lib_dir in [
        "lib",
        "lib64",
        "targets/x86_64-linux/lib",
        "targets/sbsa-linux/lib",
        "targets/aarch64-linux/lib",
    ] {
        let dir = toolkit_root.join(lib_dir);
        if dir.is_dir() {
            println!("cargo::rustc-link-search=native={}", dir.display());
        }
    }
    println!("cargo::rustc-link-lib=static=cudart_static");
    for lib in ["dl", "rt", "pthread", "stdc++"] {
        println!("cargo::rustc-link-lib={lib}");
    }
}

/// `<target dir>/longattn-kernels` for an OUT_DIR of cargo's layout
/// (`<target dir>/<profile>/build/<package>-<hash>/out`), else OUT_DIR itself.
fn kernel_cache_dir(out_dir: &Path) -> PathBuf {
    let build = out_dir.ancestors().nth(2);
    match (build, out_dir.ancestors().nth(4)) {
        (Some(b), Some(target)) if b.file_name().is_some_and(|n| n == "build") => {
            target.join("longattn-kernels")
        }
        _ => out_dir.to_path_buf(),
    }
}

/// Appends the path and content of every file under `dir`, in name order.
fn hash_tree(dir: &Path, into: &mut Vec<u8>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("kernels/include is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            hash_tree(&path, into);
        } else {
            into.extend(path.to_string_lossy().bytes().chain([0]));
            into.extend(std::fs::read(&path).expect("read a kernel header"));
        }
    }
}

/// A 128-bit FNV-1a digest of `parts`, in hex: stable across toolchains, unlike `Hasher`.
fn content_key(parts: &[&[u8]]) -> String {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= b as u128;
            h = h.wrapping_mul(0x0000000001000000000000000000013b);
        }
    }
    format!("{h:032x}")
}

fn generate_bindings(include: &Path) {
    let mut headers: Vec<PathBuf> = std::fs::read_dir(include.join("longattn"))
        .expect("kernels/include/longattn exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    headers.sort();
    let wrapper: String = headers
        .iter()
        .map(|h| format!("#include \"{}\"\n", h.display()))
        .collect();
    let bindings = bindgen::Builder::default()
        .header_contents("longattn_all.h", &wrapper)
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("la_.*")
        .allowlist_type("La.*")
        .allowlist_var("LA_.*")
        .rustified_enum("La.*")
        .derive_default(true)
        .derive_debug(true)
        .generate_comments(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen failed on kernels/include/longattn/*.h (is libclang installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("ffi.rs");
    bindings.write_to_file(out).expect("write ffi.rs");
}
