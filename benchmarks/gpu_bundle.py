"""Offline bundle for the GPU smoke test: the wheels a CUDA host without Docker or network lacks.

    make gpu-bundle                                    # dist/gpu-bundle, for Python 3.12 (GPU_PYTHON=3.11 ...)
    python -m benchmarks.gpu_bundle --output DIR [--python 3.12] [--glibc 2.31] [--overwrite]
    bash benchmarks/gpu_smoke.sh --bundle DIR         # then, on the GPU host, from a copy of this repository

For air-gapped DGX nodes and GPU boxes without Docker: a host that already has Python 3.10-3.12 and a CUDA
build of PyTorch with the packages such images carry (``requirements/gpu-host.txt``: numpy, safetensors,
peft, accelerate, pandas, pyarrow, ...; other versions than the CPU set are fine). Run this where a package
index is reachable; it writes DIR with

- one wheel per line of ``requirements/gpu-bundle.txt`` for the chosen Python (manylinux x86-64 up to
  ``--glibc``): NeMo 2.1.0, megatron-core 0.10.0, NeMo-Run and what importing ``nemo.collections.llm``
  needs beyond that host set, TRL and datasets for the HF baseline, and the pins that must shadow the host's
  newer versions (transformers 4.47.1: NeMo 2.1 does not import beside 5.x; lightning 2.4.0: its
  exp_manager imports NeptuneLogger, gone from 2.6) — the file says which was measured how;
- the project's own wheel (``fundcomment_ft``);
- ``requirements.txt`` (every wheel's ``name==version``), ``host-requirements.txt`` (what the host is
  assumed to have) and ``bundle.json`` (Python, platforms, each file's size and sha256, the total).

Packages published as source only (wget, jieba, ...) are built here into pure-Python wheels. A source
distribution that compiles travels as it is and is built on the GPU host (``bundle.json`` ``built_on_host``
names it and its build needs): megatron-core 0.10.0 has wheels for CPython 3.10 and 3.11 only, so a 3.12
host builds it (a C++ compiler, setuptools and pybind11 there). ``gpu_smoke.sh --bundle DIR`` installs
everything with ``pip install --no-index --no-deps --no-build-isolation --target`` into a temporary prefix
put first on PYTHONPATH, so the host's own environment is never changed. Nothing is half-written: DIR
appears complete or not at all.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "requirements" / "gpu-bundle.txt"
HOST = ROOT / "requirements" / "gpu-host.txt"
MANIFEST = "bundle.json"
PROJECT_SOURCES = ("pyproject.toml", "README.md", "families", "recipes", "convert", "benchmarks", "review_app")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
_PURE = re.compile(r"-(py3|py2\.py3)-none-any\.whl$")


class BundleError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pin:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def read_pins(path: Path = PINS) -> list[Pin]:
    """The ``name==version`` lines of ``path`` (comments and blank lines skipped); anything else is an
    error naming the file and line."""
    pins, seen = [], {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if not m:
            raise BundleError(f"{path}:{n}: expected one exact pin 'name==version', got {line!r}")
        key = _key(m.group(1))
        if key in seen:
            raise BundleError(f"{path}:{n}: {m.group(1)} is pinned twice (line {seen[key]})")
        seen[key] = n
        pins.append(Pin(m.group(1), m.group(2)))
    if not pins:
        raise BundleError(f"{path}: no pins")
    return pins


def platforms(glibc: str) -> list[str]:
    """pip ``--platform`` tags for manylinux x86-64 wheels that run on glibc ``glibc`` or newer hosts."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise BundleError(f"--glibc {glibc}: expected 2.17 or newer")
    tags = [f"manylinux_2_{n}_x86_64" for n in range(minor, 16, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _pip(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)


def _new_files(d: Path, before: set[str]) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name not in before)


def fetch(pin: Pin, dest: Path, python: str, tags: list[str], from_source: bool = False) -> Path:
    """The file of ``pin`` for CPython ``python`` in ``dest``: the index's wheel when it has one (and not
    ``from_source``), else the source distribution, turned into a wheel here when that gives a pure-Python
    one; a source distribution that compiles is kept as it is and built on the GPU host (:func:`build_needs`).
    megatron-core 0.10.0, for one, has wheels for CPython 3.10 and 3.11 only."""
    before = {p.name for p in dest.iterdir()}
    r = None
    if not from_source:
        r = _pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation",
                  "cp", *[a for t in tags for a in ("--platform", t)], "-d", str(dest), str(pin)], dest)
        if r.returncode == 0:
            new = _new_files(dest, before)
            if len(new) == 1 and new[0].suffix == ".whl":
                return new[0]
            raise BundleError(f"{pin}: pip download left {[p.name for p in new]}, expected one wheel")
    with tempfile.TemporaryDirectory() as tmp:
        # the source's metadata is prepared here without isolation: its build needs (pybind11 for
        # megatron-core, whose setup.py runs `python3 -m pybind11`) come from this environment
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        d = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                            "--no-build-isolation", "-d", tmp, str(pin)], capture_output=True, text=True, env=env)
        sdists = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".zip"))]
        if d.returncode != 0 or len(sdists) != 1:
            why = f"no wheel for Python {python} on the index ({_last_line(r.stderr)}); " if r else ""
            raise BundleError(f"{pin}: {why}no source distribution either ({_last_line(d.stderr)})")
        b = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(Path(tmp) / "whl"), str(sdists[0])], capture_output=True, text=True, env=env)
        built = list((Path(tmp) / "whl").glob("*.whl")) if b.returncode == 0 else []
        if len(built) == 1 and _PURE.search(built[0].name):
            return Path(shutil.move(str(built[0]), dest / built[0].name))
        return Path(shutil.move(str(sdists[0]), dest / sdists[0].name))  # compiled: built on the GPU host


def build_needs(sdist: Path) -> list[str]:
    """``[build-system] requires`` of a source distribution (what the GPU host needs to build it with
    ``--no-build-isolation``; setuptools alone when it has no pyproject.toml)."""
    import tarfile
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip's own copy of the same parser
        from pip._vendor import tomli as tomllib
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml")),
                      None)
        if member is None:
            return ["setuptools"]
        data = tomllib.loads(tar.extractfile(member).read().decode("utf-8"))
    return list(data.get("build-system", {}).get("requires", ["setuptools"]))


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("WARNING")]
    return lines[-1].strip() if lines else "no output"


def project_wheel(dest: Path) -> Path:
    """This project's wheel, built from a copy of its sources (a stale ``build/`` cannot leak into it)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in PROJECT_SOURCES:
            p = ROOT / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(p, src / name)
        r = _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(Path(tmp) / "out"), str(src)], ROOT)
        built = list((Path(tmp) / "out").glob("*.whl")) if r.returncode == 0 else []
        if len(built) != 1:
            raise BundleError(f"building the project's wheel failed: {_last_line(r.stderr)}")
        return Path(shutil.move(str(built[0]), dest / built[0].name))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_pin(path: Path) -> str:
    name, version = path.name.split("-")[:2]
    return f"{name}=={version}"


def without_host_builds(bundle: str | Path, out: str | Path) -> list[str]:
    """Write to ``out`` the bundle's requirements.txt less the sources it builds on the host (``bundle.json``
    ``built_on_host``: gpu_smoke.sh's second try where that build failed); the names left out, sorted."""
    bundle = Path(bundle)
    names = {_key(b["file"].rsplit("-", 1)[0])
             for b in json.loads((bundle / MANIFEST).read_text(encoding="utf-8")).get("built_on_host", [])}
    lines = (bundle / "requirements.txt").read_text(encoding="utf-8").splitlines()
    Path(out).write_text("".join(f"{ln}\n" for ln in lines if _key(ln.split("==")[0]) not in names),
                         encoding="utf-8")
    return sorted(names)


def build(output: Path, python: str = "3.12", glibc: str = "2.31", overwrite: bool = False,
          pins_path: Path = PINS, progress: bool = True, from_source: frozenset[str] = frozenset()) -> dict:
    """Write the bundle into ``output`` (via a temporary sibling renamed at the end); its manifest."""
    if not re.fullmatch(r"3\.1[0-2]", python):
        raise BundleError(f"--python {python}: the bundle is for CPython 3.10, 3.11 or 3.12")
    output = Path(output).absolute()  # pip runs in the bundle dir: a relative -d would land inside it
    if output.exists() and not overwrite:
        raise BundleError(f"{output} exists (use --overwrite to replace it)")
    pins, tags = read_pins(pins_path), platforms(glibc)
    unknown = {_key(n) for n in from_source} - {_key(p.name) for p in pins}
    if unknown:
        raise BundleError(f"--from-source {', '.join(sorted(unknown))}: not in {pins_path}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(pins) + 1, unit="wheel", desc="gpu bundle", disable=not progress)
        files, lines, on_host = [], [], []
        for pin in pins:
            bar.set_postfix_str(pin.name)
            f = fetch(pin, tmp, python, tags, from_source=_key(pin.name) in {_key(n) for n in from_source})
            files.append(f)
            lines.append(str(pin))
            if f.suffix != ".whl":
                on_host.append({"file": f.name, "needs": build_needs(f)})
            bar.update()
        bar.set_postfix_str("fundcomment-ft")
        files.append(project_wheel(tmp))
        lines.append(_wheel_pin(files[-1]))
        bar.update()
        bar.close()
        (tmp / "requirements.txt").write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")
        shutil.copy2(HOST, tmp / "host-requirements.txt")
        manifest = {"python": python, "implementation": "cp", "glibc": glibc, "platforms": tags,
                    "built_on_host": on_host,
                    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "pins": str(pins_path.relative_to(ROOT)) if pins_path.is_relative_to(ROOT) else str(pins_path),
                    "packages": len(files), "total_bytes": sum(f.stat().st_size for f in files),
                    "files": [{"file": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files],
                    "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            shutil.rmtree(old)
        tmp.rename(output)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="dist/gpu-bundle", help="bundle directory to write (default: %(default)s)")
    ap.add_argument("--python", default="3.12", help="the GPU host's Python, 3.10-3.12 (default: %(default)s)")
    ap.add_argument("--glibc", default="2.31", help="oldest glibc the wheels must run on (default: %(default)s)")
    ap.add_argument("--from-source", action="append", default=[], metavar="NAME",
                    help="take NAME's source distribution even where a wheel exists (what a Python without "
                         "wheels gets: megatron-core on 3.12); repeatable")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        m = build(Path(args.output), args.python, args.glibc, args.overwrite, progress=not args.no_progress,
                  from_source=frozenset(args.from_source))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {m['packages']} packages for CPython {m['python']}, {m['total_bytes'] / 2**20:.1f} MiB "
          f"({m['seconds']:.0f} s). On the GPU host: bash benchmarks/gpu_smoke.sh --bundle {args.output}")
    for b in m["built_on_host"]:
        print(f"  {b['file']}: source only for this Python; gpu_smoke.sh builds it there (needs a C/C++ compiler "
              f"and {', '.join(b['needs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
