//! Link hotpipe against the libtorch that torch-sys found (the venv's PyTorch).
//!
//! Two things torch-sys does not do for downstream binaries:
//! - an rpath to libtorch's directory, so `hotpipe` runs without `LD_LIBRARY_PATH`;
//! - `--no-as-needed -ltorch`: `libtorch.so` pulls in `libtorch_cuda.so`, but nothing in
//!   our objects references it directly, so the default `--as-needed` drops it and CUDA is
//!   then never available (verified on an H200, see shared/gpu/README.md).
//!
//! And one thing for the Python backend: the interpreter of the venv that libtorch came
//! from (`<venv>/lib/pythonX.Y/site-packages/torch/lib` -> `<venv>/bin/python`, the one
//! scripts/setup.sh made, with numpy), as `HOTPIPE_BUILD_PYTHON`: the default
//! `[model] python` when nothing else names one.

fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not export DEP_TCH_LIBTORCH_LIB; build through scripts/ (LIBTORCH_USE_PYTORCH=1 in the venv)",
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch,--as-needed");
    println!("cargo:rerun-if-changed=build.rs");
    let venv_python = std::path::Path::new(&lib)
        .ancestors()
        .nth(5)
        .map(|venv| venv.join("bin/python"))
        .filter(|p| p.is_file());
    println!(
        "cargo:rustc-env=HOTPIPE_BUILD_PYTHON={}",
        venv_python.map_or_else(String::new, |p| p.display().to_string())
    );

    // The CUDA stream/event shim (src/runtime/cuda/shim.cpp). It includes only libtorch's
    // device-generic c10 headers, which the PyPI wheel ships next to its lib directory, so
    // no CUDA toolkit is needed to build it; on a machine without a GPU it is linked but
    // never called. PyTorch >= 2.7 wheels use the C++11 ABI.
    let root = std::path::Path::new(&lib).join("..");
    cc::Build::new()
        .cpp(true)
        .file("src/runtime/cuda/shim.cpp")
        // The TorchScript schema reader (src/runtime/schema/): only torch/script.h.
        .file("src/runtime/schema/schema.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("hotpipe_cuda_shim");
    println!("cargo:rerun-if-changed=src/runtime/cuda/shim.cpp");
    println!("cargo:rerun-if-changed=src/runtime/schema/schema.cpp");
}
