//! Puts LibTorch's library folder in the rpath of this package's binaries and tests, so
//! they run without `LD_LIBRARY_PATH` (torch-sys exports the folder as `DEP_TCH_LIBTORCH_LIB`).

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    // Binaries meant for a GPU must keep libtorch_cuda.so, which `--as-needed` drops.
    println!("cargo:rerun-if-env-changed=TCH_LINK_CUDA");
    if std::env::var("TCH_LINK_CUDA").as_deref() == Ok("1") {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
}
