//! Link hotpipe against the libtorch that torch-sys found (the venv's PyTorch).
//!
//! Two things torch-sys does not do for downstream binaries:
//! - an rpath to libtorch's directory, so `hotpipe` runs without `LD_LIBRARY_PATH`;
//! - `--no-as-needed -ltorch`: `libtorch.so` pulls in `libtorch_cuda.so`, but nothing in
//!   our objects references it directly, so the default `--as-needed` drops it and CUDA is
//!   then never available (verified on an H200, see shared/gpu/README.md).

fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not export DEP_TCH_LIBTORCH_LIB; build through scripts/ (LIBTORCH_USE_PYTORCH=1 in the venv)",
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch,--as-needed");
    println!("cargo:rerun-if-changed=build.rs");
}
