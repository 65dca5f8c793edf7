//! Python bindings (`mlmf._mlmf`), compiled with the `python` feature.
//!
//! One file per core area, each thin: inputs are converted to owned Rust values first,
//! then the work runs with the GIL released through [`detached`], which also turns a
//! Rust panic into `mlmf.InternalError` instead of an abort.

mod aligned;
mod arrays;
mod attention;
mod config;
mod encoders;
mod errors;
mod fusion;
mod model;
mod patches;
mod preprocess;
mod quant;
mod serve;
mod train;

use pyo3::prelude::*;

use crate::error::{catch_panic, Result};

/// The extension allocates and frees multi-megabyte buffers on every call (decoded
/// frames, batch outputs). glibc serves those from fresh mmaps and returns them at
/// once, so each call page-faults its memory in again; measured on CLIP batches this
/// made a call up to 3x slower depending on allocation history. mimalloc keeps such
/// memory for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its position in `mi_option_e`, the same in the
/// v2 and v3 headers libmimalloc-sys builds (it does not export the constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long freed memory stays committed for reuse, in ms (mimalloc's default: 10).
const PURGE_DELAY_MS: std::os::raw::c_long = 10_000;

/// Keeps freed memory for ten seconds instead of mimalloc's 10 ms, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. A call that frees its buffers and is followed
/// by other work (the next request, another model, or later steps of the same call)
/// would otherwise page-fault all of that memory in again. Measured on a `middle`
/// fusion call (~50 MB of buffers, ~170 ms): alternated with other work, its median
/// rose by about 10% at 10 ms; after 1.1 s of other work, its first call spent 200 ms
/// of system time faulting pages back in at a 1 s delay, and none at 10 s. An idle
/// process still returns the memory ten seconds later.
fn set_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an allocator option (an atomic store inside mimalloc).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// The CPU features this build's code assumes, as build.rs found them, behind a marker
/// that `python/mlmf/_cpu.py` finds in the library file before loading it.
static TARGET_FEATURES_MARK: &str =
    concat!("mlmf-target-features:", env!("MLMF_TARGET_FEATURES"), ";");

/// The shared libraries the CUDA build calls into, behind a marker that
/// `python/mlmf/_cuda_libs.py` finds in the library file and loads before the
/// extension: the build links against empty stand-ins (`make wheel-cuda`), so the
/// extension names none of them as a dependency (`scripts/check_cuda_wheel.py` checks
/// that it calls into no other: cuBLAS needs cuBLASLt, loaded first). Empty on other
/// builds.
#[cfg(feature = "cuda")]
static CUDA_LIBRARIES_MARK: &str = "mlmf-cuda-libraries:libcuda.so.1,libcudart.so.13,\
libcublasLt.so.13,libcublas.so.13,libcurand.so.10;";
#[cfg(not(feature = "cuda"))]
static CUDA_LIBRARIES_MARK: &str = "mlmf-cuda-libraries:;";

fn cuda_libraries() -> Vec<&'static str> {
    let (_, list) = CUDA_LIBRARIES_MARK.split_once(':').unwrap_or_default();
    list.trim_end_matches(';')
        .split(',')
        .filter(|f| !f.is_empty())
        .collect()
}

fn target_features() -> Vec<&'static str> {
    let (_, list) = TARGET_FEATURES_MARK.split_once(':').unwrap_or_default();
    list.trim_end_matches(';')
        .split(',')
        .filter(|f| !f.is_empty())
        .collect()
}

/// Runs `f` without the GIL; a panic inside becomes [`MlmfError::Internal`].
pub(crate) fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    py.detach(|| guarded(f)).map_err(PyErr::from)
}

/// Runs `f`, turning a panic into [`MlmfError::Internal`] (for work that needs the GIL).
pub(crate) fn guarded<T, F: FnOnce() -> Result<T>>(f: F) -> Result<T> {
    catch_panic("Rust code panicked (please report this)", f)
}

/// Deliberately panics inside Rust, to test that panics surface as exceptions.
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<()> {
    detached(py, || -> Result<()> { panic!("test panic") })
}

#[pymodule]
fn _mlmf(m: &Bound<'_, PyModule>) -> PyResult<()> {
    set_purge_delay();
    m.add("__version__", crate::VERSION)?;
    m.add("CUDA_COMPILED", crate::device::DeviceSpec::cuda_compiled())?;
    m.add("CUDA_LIBRARIES", cuda_libraries())?;
    m.add("JPEG_DECODER", crate::preprocess::image::JPEG_DECODER)?;
    m.add("JPEG_SIMD", crate::preprocess::image::JPEG_SIMD)?;
    m.add("TARGET_FEATURES", target_features())?;
    errors::register(m)?;
    config::register(m)?;
    preprocess::register(m)?;
    patches::register(m)?;
    encoders::register(m)?;
    attention::register(m)?;
    fusion::register(m)?;
    model::register(m)?;
    aligned::register(m)?;
    train::register(m)?;
    serve::register(m)?;
    quant::register(m)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    Ok(())
}
