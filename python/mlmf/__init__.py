"""mlmf: multimodal inference with a Rust core.

Raw text, images, audio and video go in; model-ready arrays (and, with encoders,
embeddings) come out. See the README for a tour.
"""

from mlmf._mlmf import (
    CUDA_COMPILED,
    CacheError,
    ConfigError,
    DecodeError,
    DeviceError,
    DistributedError,
    InputError,
    InternalError,
    MissingModalityError,
    MlmfError,
    Modality,
    ModelLoadError,
    MultiModalConfig,
    TextProcessor,
    __version__,
)

__all__ = [
    "CUDA_COMPILED",
    "AudioProcessor",
    "CacheError",
    "ConfigError",
    "DecodeError",
    "DeviceError",
    "DistributedError",
    "ImageProcessor",
    "InputError",
    "InternalError",
    "MissingModalityError",
    "MlmfError",
    "Modality",
    "ModelLoadError",
    "MultiModalConfig",
    "TextProcessor",
    "VideoProcessor",
    "__version__",
    "decode_image",
    "extract_patches",
    "load_audio",
    "log_mel_spectrogram",
    "mel_filter_bank",
    "qwen2vl_patches",
    "resample_audio",
    "resize_image",
]
