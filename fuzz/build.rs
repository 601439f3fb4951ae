//! Puts LibTorch's library folder in the fuzz targets' rpath (the tensor codec target links
//! aspire-worker, hence LibTorch), so they run without `LD_LIBRARY_PATH`.

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
