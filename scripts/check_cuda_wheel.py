"""Checks a CUDA wheel built by ``make wheel-cuda``, on a machine without a GPU.

    python scripts/check_cuda_wheel.py dist-cuda/mlmf-*.whl

1. Size: the wheel must fit the 64 MiB that travels to the GPU machine.
2. The extension names no CUDA library as a dependency (``readelf -d``), records the
   libraries ``import mlmf`` loads (the marker ``_cuda_libs.py`` reads), and calls into
   each of them (``nm -D --undefined-only``).
3. Installed alone (``pip install --no-deps --target``), ``import mlmf``:
   - with no CUDA library on the machine, fails with an ``ImportError`` that names
     ``libcuda.so.1`` and the driver;
   - with stand-ins for every library (compiled here from the symbol list: every
     function returns 100, "no device", the CUDA code for it), imports, reports
     ``CUDA_COMPILED``, runs a CPU encoder, and answers ``device="cuda"`` with
     ``mlmf.DeviceError``, not a crash. The stand-ins sit where NVIDIA's wheels put the
     real ones (``nvidia/cu13/lib``) and the driver's where the loader looks
     (``LD_LIBRARY_PATH``), so this also checks how ``import mlmf`` finds them.

Exit status 0 when every check passes; each failure is printed.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 << 20

#: Functions that hand back a message rather than a status: the stand-ins give one.
_MESSAGE_OUT = {"cuGetErrorString", "cuGetErrorName"}
_MESSAGE_RET = {
    "cudaGetErrorString",
    "cudaGetErrorName",
    "nvrtcGetErrorString",
    "cublasGetStatusString",
    "cublasGetStatusName",
}

#: Which library defines a symbol, by prefix (longest first).
_OWNERS = (
    ("cublasLt", "libcublasLt"),
    ("cublas", "libcublas"),
    ("curand", "libcurand"),
    ("nvrtc", "libnvrtc"),
    ("cuda", "libcudart"),
    ("__cuda", "libcudart"),
    ("cu", "libcuda"),
)

_SMOKE = r"""
import sys
import numpy as np
import mlmf
site, model = sys.argv[1], sys.argv[2]
assert mlmf.__file__.startswith(site), mlmf.__file__
assert mlmf.CUDA_COMPILED, "not a CUDA build"
print("libraries:", ", ".join(mlmf.CUDA_LIBRARIES))
enc = mlmf.Encoder.from_pretrained(model)
print("cpu encoder:", np.asarray(enc.encode(["a cat", "a dog"]).pooled).shape)
try:
    mlmf.Encoder.from_pretrained(model, device="cuda")
except mlmf.DeviceError as e:
    print("cuda: DeviceError:", str(e)[:160])
else:
    raise SystemExit("device='cuda' with stand-in libraries did not raise DeviceError")
"""


def owner(symbol: str) -> str | None:
    for prefix, lib in _OWNERS:
        if symbol.startswith(prefix):
            return lib
    return None


def stand_in_source(symbols: list[str]) -> str:
    lines = ['static const char msg[] = "no CUDA device (stand-in library)";']
    for s in sorted(symbols):
        if s in _MESSAGE_OUT:
            lines.append(f"int {s}(int e, const char **p) {{ (void)e; *p = msg; return 0; }}")
        elif s in _MESSAGE_RET:
            lines.append(f"const char *{s}(int e) {{ (void)e; return msg; }}")
        else:
            lines.append(f"int {s}(void) {{ return 100; }}")
    return "\n".join(lines) + "\n"


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    args = ap.parse_args()
    failures: list[str] = []
    wheel = args.wheel
    size = wheel.stat().st_size
    print(f"{wheel.name}: {size / 2**20:.1f} MiB")
    if size > CARRY_LIMIT:
        failures.append(f"the wheel is {size / 2**20:.1f} MiB, over the 64 MiB carried")

    # The loader's functions, without importing mlmf (or running its preload) here.
    cuda_libs = types.ModuleType("_cuda_libs_check")
    marker = runpy.run_path(str(ROOT / "python/mlmf/_marker.py"))
    cuda_libs.__dict__["read_list"] = marker["read_list"]
    source = (ROOT / "python/mlmf/_cuda_libs.py").read_text()
    source = source.replace("\npreload()\n", "\n").replace(
        "from mlmf._marker import read_list\n", ""
    )
    exec(compile(source, str(ROOT / "python/mlmf/_cuda_libs.py"), "exec"), cuda_libs.__dict__)

    with tempfile.TemporaryDirectory(prefix="mlmf-cuda-wheel-") as tmp:
        tmp_path = Path(tmp)
        with zipfile.ZipFile(wheel) as z:
            ext = [n for n in z.namelist() if n.startswith("mlmf/_mlmf") and n.endswith(".so")]
            if not ext:
                print("no extension in the wheel")
                return 1
            z.extract(ext[0], tmp_path / "x")
        lib = tmp_path / "x" / ext[0]

        needed = [
            line.split("[", 1)[1].rstrip("]")
            for line in run(["readelf", "-d", str(lib)]).stdout.splitlines()
            if "(NEEDED)" in line
        ]
        print("needs:", ", ".join(needed))
        cuda_needed = [n for n in needed if cuda_libs.stem(n) in cuda_libs.PROVIDERS]
        if cuda_needed:
            failures.append(f"the extension names CUDA libraries as dependencies: {cuda_needed}")

        recorded = cuda_libs.recorded(str(lib))
        print("records:", ", ".join(recorded))
        if "libcuda.so.1" not in recorded:
            failures.append("the extension records no CUDA library list (not a CUDA build?)")

        undefined = [
            line.split()[-1].split("@")[0]
            for line in run(["nm", "-D", "--undefined-only", str(lib)]).stdout.splitlines()
        ]
        by_lib: dict[str, list[str]] = {}
        for s in undefined:
            o = owner(s)
            if o:
                by_lib.setdefault(o, []).append(s)
        print("calls into:", ", ".join(f"{k} ({len(v)})" for k, v in sorted(by_lib.items())))
        recorded_stems = {cuda_libs.stem(n) for n in recorded}
        unlisted = sorted(set(by_lib) - recorded_stems)
        if unlisted:
            failures.append(f"calls into libraries it does not record: {unlisted}")

        site = tmp_path / "site"
        pip = run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-index",
                "--target",
                str(site),
                str(wheel),
            ]
        )
        if pip.returncode:
            failures.append(f"pip install --target failed: {pip.stderr.strip()[-300:]}")
        else:
            env = dict(os.environ, PYTHONPATH=str(site), MLMF_SKIP_CPU_CHECK="0")
            env.pop("LD_LIBRARY_PATH", None)
            bare = run([sys.executable, "-c", "import mlmf"], env=env, cwd=tmp)
            last = (bare.stderr.strip().splitlines() or [""])[-1]
            print("import without CUDA:", last[:200])
            if bare.returncode == 0 or "libcuda.so.1" not in last or "driver" not in last:
                failures.append(
                    "import without CUDA did not raise the ImportError naming libcuda.so.1"
                )

            # Stand-ins: the driver on LD_LIBRARY_PATH, the rest where the wheels put them.
            driver_dir, wheel_dir = tmp_path / "driver", site / "nvidia/cu13/lib"
            driver_dir.mkdir()
            wheel_dir.mkdir(parents=True)
            cc = shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                failures.append("no C compiler for the stand-in libraries")
            for soname in recorded:
                if cc is None:
                    break
                src = tmp_path / f"{soname}.c"
                src.write_text(stand_in_source(by_lib.get(cuda_libs.stem(soname), [])))
                where = driver_dir if soname == "libcuda.so.1" else wheel_dir
                out = run(
                    [
                        cc,
                        "-shared",
                        "-fPIC",
                        "-o",
                        str(where / soname),
                        f"-Wl,-soname,{soname}",
                        str(src),
                    ]
                )
                if out.returncode:
                    failures.append(f"stand-in {soname}: {out.stderr.strip()[-300:]}")
            env["LD_LIBRARY_PATH"] = str(driver_dir)
            model = ROOT / "tests/fixtures/encoders/models/bert_tiny"
            smoke = run([sys.executable, "-c", _SMOKE, str(site), str(model)], env=env, cwd=tmp)
            print(smoke.stdout.strip())
            if smoke.returncode:
                failures.append(f"import with stand-ins failed: {smoke.stderr.strip()[-600:]}")

    for f in failures:
        print("FAILED:", f)
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
