//! Build facts the library reports about itself:
//!
//! - `MLMF_TARGET_FEATURES`: the CPU features the code is compiled to assume (from
//!   `-C target-cpu` / `-C target-feature`), so that `import mlmf` can refuse a CPU
//!   without them before any of that code runs (python/mlmf/_cpu.py);
//! - `cfg(mlmf_jpeg_simd)`: the vendored libjpeg-turbo was built with its SIMD code
//!   (which needs NASM at build time; without it the library is plain C, slower but
//!   with the same pixels);
//! - a build warning when JPEG decoding falls back to the pure-Rust decoder or to
//!   libjpeg-turbo without SIMD.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(mlmf_jpeg_simd)");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    println!("cargo:rustc-env=MLMF_TARGET_FEATURES={features}");

    if std::env::var_os("CARGO_FEATURE_JPEG_TURBO").is_none() {
        println!(
            "cargo:warning=mlmf: built without the `jpeg-turbo` feature: JPEG goes through \
             zune-jpeg (pure Rust), within a few levels of Pillow's pixels instead of \
             identical to them"
        );
        return;
    }
    // turbojpeg-sys (`links = "turbojpeg"`) reports its install's include directory;
    // the static library sits beside it. The SIMD code defines `jsimd_*` symbols.
    let simd = std::env::var("DEP_TURBOJPEG_INCLUDE")
        .ok()
        .and_then(|inc| {
            let lib = Path::new(inc.split(',').next()?).parent()?.join("lib");
            ["libturbojpeg.a", "turbojpeg-static.lib", "turbojpeg.lib"]
                .iter()
                .find_map(|name| std::fs::read(lib.join(name)).ok())
        })
        .map(|bytes| contains(&bytes, b"jsimd_can_idct_islow"));
    match simd {
        Some(true) => println!("cargo:rustc-cfg=mlmf_jpeg_simd"),
        Some(false) => println!(
            "cargo:warning=mlmf: libjpeg-turbo was built without its SIMD code (NASM was not \
             found): JPEG decoding is slower, the pixels are the same"
        ),
        None => {}
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
