//! Where tensors live: `"cpu"`, `"cuda"` or `"cuda:N"`, resolved to a candle device.
//!
//! A build without the `cuda` feature refuses CUDA with a message that says how to get
//! a CUDA build, instead of failing later inside candle.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{MlmfError, Result};

/// A device request as users write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this build can run on CUDA at all.
    pub const fn cuda_compiled() -> bool {
        cfg!(feature = "cuda")
    }

    /// Opens the candle device.
    pub fn open(&self) -> Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(ordinal) => {
                if !Self::cuda_compiled() {
                    return Err(MlmfError::Device {
                        device: self.to_string(),
                        message: "this build of mlmf has no CUDA support; rebuild with the \
                                  `cuda` feature (`maturin develop --release --features \
                                  python,cuda`, or `cargo build --features cuda`) on a \
                                  machine with the CUDA toolkit"
                            .into(),
                    });
                }
                // cudarc loads the driver and runtime libraries when the first device
                // opens, and panics when one is missing: that becomes a typed error.
                let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(*ordinal));
                match opened {
                    Ok(device) => device.map_err(|e| MlmfError::Device {
                        device: self.to_string(),
                        message: without_backtrace(e.to_string()),
                    }),
                    Err(panic) => Err(MlmfError::Device {
                        device: self.to_string(),
                        message: format!(
                            "the CUDA driver or libraries could not be loaded ({}): this \
                             needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime, \
                             cuBLAS and cuRAND libraries on the library path, e.g. the \
                             `lib` folders of the nvidia-cuda-runtime, nvidia-cublas and \
                             nvidia-curand wheels in LD_LIBRARY_PATH (docs/encoders.md, \
                             \"GPU\")",
                            panic_message(&panic)
                        ),
                    }),
                }
            }
        }
    }
}

/// candle's message without the backtrace it appends when `RUST_BACKTRACE` is set.
fn without_backtrace(mut message: String) -> String {
    if let Some(at) = message.find("\n   0: ") {
        message.truncate(at);
    }
    message
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "no message".into())
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => return Ok(Self::Cpu),
            "cuda" | "gpu" => return Ok(Self::Cuda(0)),
            _ => {}
        }
        if let Some(n) = lower.strip_prefix("cuda:") {
            if let Ok(n) = n.parse() {
                return Ok(Self::Cuda(n));
            }
        }
        Err(MlmfError::config(
            "device",
            format!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
        ))
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_opens() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn candle_backtraces_are_left_out_of_messages() {
        let with = "DriverError(CUDA_ERROR_NO_DEVICE, \"no device\")\n   0: <unknown>\n   1: x";
        assert_eq!(
            without_backtrace(with.into()),
            "DriverError(CUDA_ERROR_NO_DEVICE, \"no device\")"
        );
        assert_eq!(without_backtrace("two\nlines".into()), "two\nlines");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_says_how_to_build() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("`cuda` feature"), "{err}");
    }
}
