"""The fused kernel builds with each C compiler and target, and gives the torch path's bits.

Builds run in subprocesses, each with its own CC and an empty cache folder
(XDG_CACHE_HOME), since a process loads the library once. The aarch64 build is
cross-compiled with tests/harness/chain.c and run under qemu-aarch64.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mergekit_independent
from reference import same_bits
from test_kernel import SPECIAL_BITS

from nearswap_mergekit.method import _fused
from nearswap_mergekit import nearswap_chain

pytestmark = mergekit_independent

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "nearswap_mergekit" / "method" / "_fused.c"
HARNESS = Path(__file__).resolve().parent / "harness" / "chain.c"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Three stages each; t is rounded to float32 as the kernel does.
THRESHOLDS = [(1e-4, 1e-3, 1e-2), (0.0, 1e-45, 3.4e38), (1.0, 0.0, 2e-3)]
INTS = {4: (np.int32, np.uint32), 2: (np.int16, np.uint16)}
#: The NaN an invalid operation (inf - inf, 0 * inf) creates, stored in each
#: dtype: x86, Arm. bfloat16's never shows: the kernel stores NaNs as 0xFFFF.
DEFAULT_NAN = {torch.float32: (0xFFC00000, 0x7FC00000), torch.float16: (0xFE00, 0x7E00),
               torch.bfloat16: (0xFFC0, 0x7FC0)}


def found(*names):
    return all(shutil.which(name) for name in names)


def bits(x: torch.Tensor) -> np.ndarray:
    signed, unsigned = INTS[x.element_size()]
    ints = torch.from_numpy(np.zeros(0, signed)).dtype
    return x.contiguous().view(ints).numpy().view(unsigned)


def from_bits(values, dtype) -> torch.Tensor:
    signed, unsigned = INTS[torch.finfo(dtype).bits // 8]
    return torch.from_numpy(np.array(values, dtype=unsigned).view(signed)).view(dtype)


def inputs(dtype):
    """Base and three secondaries: every special pair, and nearby random values.

    float32 covers SPECIAL_BITS pairwise; the 16-bit dtypes cover all 65536 bit
    patterns (signalling NaNs, payloads, subnormals included) against shuffled
    ones. Lengths are multiples of 64: torch widens float16 NaNs in a vector
    loop's scalar tail differently (0x7FFFFFFF), which the torch path would show.
    """
    gen = np.random.default_rng(7)
    if dtype == torch.float32:
        specials = np.array(SPECIAL_BITS, dtype=np.uint32)
        grid = [np.repeat(specials, len(specials)), np.tile(specials, len(specials))]
        grid += [grid[1][::-1], np.roll(grid[1], 7)]
        special = [from_bits(g, dtype) for g in grid]
    else:
        every = np.arange(1 << 16, dtype=np.uint16)
        special = [from_bits(every, dtype)] + [from_bits(gen.permutation(every), dtype) for _ in range(3)]
    count = -(-len(special[0]) // 4096) * 4096 * 2 - len(special[0])
    base = torch.from_numpy(gen.normal(0, 0.02, count).astype(np.float32))
    near = [base + torch.from_numpy(gen.normal(0, 1e-3, count).astype(np.float32)) for _ in range(3)]
    return [torch.cat([s, r.to(dtype)]) for s, r in zip(special, [base, *near])]


def cases():
    for dtype in DTYPES:
        for round_stages in (True, False):
            for ts in THRESHOLDS:
                yield dtype, round_stages, ts


def case_id(case):
    dtype, round_stages, ts = case
    return f"{str(dtype)[6:]}-{'round' if round_stages else 'carry'}-{'/'.join(map(str, ts))}"


@pytest.fixture(scope="module")
def expected():
    """The torch path's output for each case, with its inputs."""
    data = {dtype: inputs(dtype) for dtype in DTYPES}
    return {
        case: (data[case[0]], nearswap_chain(data[case[0]][0], data[case[0]][1:], list(case[2]),
                                             round_stages=case[1], backend="torch"))
        for case in cases()
    }


# Builds the kernel in a fresh process and runs every case on the fused path:
# whole, and in pieces of 997 elements so that the vector loops' scalar tails
# see every kind of value too.
FUSED_RUN = """
import sys, torch
from nearswap_mergekit.method import _fused
from nearswap_mergekit import nearswap_chain
def fused(c, start, stop):
    x = [t[start:stop] for t in c["tensors"]]
    return nearswap_chain(x[0], x[1:], c["ts"], round_stages=c["round"], backend="fused")
cases = torch.load(sys.argv[1])
n = lambda c: len(c["tensors"][0])
whole = [fused(c, 0, n(c)) for c in cases]
pieces = [torch.cat([fused(c, i, i + 997) for i in range(0, n(c), 997)]) for c in cases]
info = _fused.build_info()
torch.save({"outputs": whole, "pieces": pieces, "flags": info["flags"], "macros": info["macros"],
            "compiler": info["compiler"], "path": info["path"]}, sys.argv[2])
"""


def run_isolated(code, tmp_path, env, *args):
    full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    full_env.pop(_fused.BACKEND_VARIABLE, None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=full_env,
                          capture_output=True, text=True, cwd=REPO)


def fused_outputs(tmp_path, expected, env):
    """The fused outputs of every case, built in a subprocess under `env`."""
    ordered = list(cases())
    torch.save([{"tensors": expected[c][0], "ts": list(c[2]), "round": c[1]} for c in ordered],
               tmp_path / "cases.pt")
    result = run_isolated(FUSED_RUN, tmp_path, env, tmp_path / "cases.pt", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "out.pt")
    return dict(zip(ordered, zip(saved["outputs"], saved["pieces"]))), saved


def assert_same_as_torch(outputs, expected):
    wrong = [f"{case_id(c)} ({how})" for c, runs in outputs.items()
             for how, out in zip(("whole", "in pieces"), runs) if not same_bits(out, expected[c][1])]
    assert not wrong, f"fused differs from the torch path in {wrong}"


COMPILERS = ["gcc", "clang", "gcc-11"]


@pytest.mark.parametrize("compiler", COMPILERS)
def test_each_compiler_gives_the_torch_paths_bits(compiler, tmp_path, expected):
    if not found(compiler):
        pytest.skip(f"{compiler} is not installed")
    outputs, saved = fused_outputs(tmp_path, expected, {"CC": compiler})
    assert Path(saved["compiler"][0]).samefile(shutil.which(compiler))
    assert Path(saved["path"]).parent == tmp_path / "cache" / "nearswap_mergekit"
    assert_same_as_torch(outputs, expected)


@pytest.mark.skipif(not found("gcc"), reason="gcc is not installed")
def test_cached_build_is_reused(tmp_path):
    folder = tmp_path / "cache" / "nearswap_mergekit"

    def build():
        result = run_isolated("from nearswap_mergekit.method import _fused; print(_fused.build_info()['path'])",
                              tmp_path, {"CC": "gcc"})
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.split()[-1], {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    first = build()
    assert len(first[1]) == 1 and build() == first


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 build")
@pytest.mark.parametrize("compiler", COMPILERS)
def test_x86_without_f16c_uses_the_software_conversion(compiler, tmp_path, expected):
    if not found(compiler):
        pytest.skip(f"{compiler} is not installed")
    outputs, saved = fused_outputs(
        tmp_path, expected, {"CC": compiler, _fused.CFLAGS_VARIABLE: "-march=x86-64"}
    )
    assert "-march=x86-64" in saved["flags"] and "-march=native" not in saved["flags"]
    assert "__F16C__" not in saved["macros"] and "__x86_64__" in saved["macros"]
    assert_same_as_torch(outputs, expected)


# Builds with whatever compiler CC names; reports the flags and whether the bits
# match the torch path's.
PROBED_RUN = """
import json, torch
from nearswap_mergekit.method import _fused
from nearswap_mergekit import nearswap_chain
x = [torch.randn(300, 70).to(torch.float16) for _ in range(3)]
fused = nearswap_chain(x[0], x[1:], 1e-2, backend="fused").view(torch.int16)
same = torch.equal(fused, nearswap_chain(x[0], x[1:], 1e-2, backend="torch").view(torch.int16))
print(json.dumps({"flags": _fused.build_info()["flags"], "same": same}))
"""


@pytest.mark.skipif(not found("gcc"), reason="gcc is not installed")
@pytest.mark.parametrize(
    "refused, flags",
    [
        (["-march=native"], ["-mcpu=native", *_fused.FLAGS, "-fopenmp-simd", "-fPIC"]),
        (["-march=native", "-mcpu=native", "-fopenmp-simd"], [*_fused.FLAGS, "-fPIC"]),
    ],
    ids=["no-march-native", "no-arch-no-openmp"],
)
def test_probe_falls_back_to_flags_the_compiler_accepts(tmp_path, refused, flags):
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in ' + "|".join(refused)
        + ') echo "unsupported option $a" >&2; exit 1;; esac; done\n'
        f'exec {shutil.which("gcc")} "$@"\n'
    )
    wrapper.chmod(0o755)
    result = run_isolated(PROBED_RUN, tmp_path, {"CC": str(wrapper)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"flags": flags, "same": True}


def test_cache_key_follows_the_target():
    source, compiler, version = b"int x;", ["/usr/bin/cc"], "cc 12"
    flags = ["-O3", "-march=native"]
    avx2 = "#define __x86_64__ 1\n#define __AVX2__ 1\n#define __F16C__ 1\n"
    plain = "#define __x86_64__ 1\n"
    key = _fused.cache_key(source, compiler, version, flags, avx2)
    assert key == _fused.cache_key(source, compiler, version, list(flags), str(avx2))
    assert key != _fused.cache_key(source, compiler, version, flags, plain)
    assert key != _fused.cache_key(source, compiler, "cc 11", flags, avx2)
    assert key != _fused.cache_key(source, ["/usr/bin/clang"], version, flags, avx2)
    assert key != _fused.cache_key(source, compiler, version, ["-O3"], avx2)
    assert key != _fused.cache_key(b"int y;", compiler, version, flags, avx2)
    # Parts are delimited: moving a character from one part to the next changes the key.
    assert key != _fused.cache_key(source, compiler, version, ["-O3", "-march=nativ"], "e" + avx2)


# Runs the chain twice on each path and reports the package's log records.
LOGGED_RUN = """
import json, logging, torch
from nearswap_mergekit.method import _fused
from nearswap_mergekit import nearswap_chain
from nearswap_mergekit.method.kernel import chain_with_row_stats
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])
logger = logging.getLogger("nearswap_mergekit")
logger.addHandler(Keep())
logger.setLevel(logging.DEBUG)
x = [torch.randn(300, 70).to(torch.bfloat16) for _ in range(3)]
same = []
for _ in range(2):
    auto = nearswap_chain(x[0], x[1:], 1e-2).view(torch.int16)
    same.append(torch.equal(auto, nearswap_chain(x[0], x[1:], 1e-2, backend="torch").view(torch.int16)))
    chain_with_row_stats(x[0], x[1:], [1e-2, 1e-2])
print(json.dumps({"records": records, "same": same, "fused": _fused.library() is not None}))
"""


def logged_run(tmp_path, env):
    result = run_isolated(LOGGED_RUN, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(report["same"])
    return report


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"CC": "/nonexistent/cc"}, "CC='/nonexistent/cc' is not a command"),
        ({_fused.CFLAGS_VARIABLE: "-march=no-such-cpu"}, "-march=no-such-cpu"),
        ({"XDG_CACHE_HOME": "{tmp}/a-file"}, "cannot write the build cache"),
    ],
    ids=["missing-compiler", "compiler-refuses-flags", "unwritable-cache"],
)
def test_unavailable_kernel_warns_once_with_reason_and_fix(tmp_path, env, reason):
    if "CC" not in env and not _fused.fused_available():
        pytest.skip("needs a working C compiler")
    (tmp_path / "a-file").write_text("not a folder")
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    report = logged_run(tmp_path, env)
    assert not report["fused"]
    [(level, message)] = report["records"]
    assert level == "WARNING"
    assert reason in message
    assert "torch path" in message and "4x slower" in message
    assert "gcc >= 9" in message and "clang >= 14" in message and "CC" in message
    assert "NEARSWAP_MERGEKIT_KERNEL=torch" in message


@pytest.mark.parametrize("env", [{}, {"NEARSWAP_MERGEKIT_KERNEL": "torch", "CC": "/nonexistent/cc"}],
                         ids=["working-compiler", "torch-chosen"])
def test_no_warning_when_built_or_torch_chosen(tmp_path, env):
    if not env and not _fused.fused_available():
        pytest.skip("needs a working C compiler")
    report = logged_run(tmp_path, env)
    assert report["records"] == []
    assert report["fused"] == (not env)


# aarch64: cross-compiled with the harness, static, run under qemu.


def fresh_nans(tensors, ts, round_stages):
    """Where the chain's first NaN comes from an invalid operation (inf - inf,
    0 * inf), not from an input NaN: there x86 and Arm create different NaNs.

    Once the running value is NaN every later stage keeps it, so the first NaN
    decides; it is fresh unless v1 is NaN and v0 finite (the result is v1's NaN)."""
    dtype = tensors[0].dtype
    a = tensors[0].float()
    fresh = torch.zeros(a.shape, dtype=torch.bool)
    for b, t in zip(tensors[1:], ts):
        b = b.float()
        r = nearswap_chain(a, [b], t, backend="torch")
        if round_stages:
            r = r.to(dtype).float()
        fresh |= ~a.isnan() & r.isnan() & ~(b.isnan() & a.isfinite())
        a = r
    return fresh.numpy()


AARCH64_BUILDS = {
    "gcc-armv8-a": ("aarch64-linux-gnu-gcc", "-mcpu=generic"),
    "gcc-armv8.2-a+fp16": ("aarch64-linux-gnu-gcc", "-march=armv8.2-a+fp16"),
    "clang-armv8.2-a+fp16": ("clang", "--target=aarch64-linux-gnu", "-march=armv8.2-a+fp16"),
}


@pytest.fixture(scope="module")
def aarch64_program(tmp_path_factory):
    """name -> the harness built statically for aarch64 (built once per module)."""
    if not found("aarch64-linux-gnu-gcc", "qemu-aarch64"):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64")
    folder = tmp_path_factory.mktemp("aarch64")
    programs = {}

    def program(name):
        if name not in programs:
            compiler, *arch = AARCH64_BUILDS[name]
            if not found(compiler):
                pytest.skip(f"{compiler} is not installed")
            flags = [compiler, *arch, *_fused.FLAGS, "-fopenmp-simd", "-Wall", "-Werror"]
            objects = []
            for source in (SOURCE, HARNESS):
                objects.append(folder / f"{name}-{source.stem}.o")
                subprocess.run([*flags, "-c", "-o", str(objects[-1]), str(source)],
                               check=True, capture_output=True, text=True)
            linked = subprocess.run([*flags, "-static", "-o", str(folder / name), *map(str, objects)],
                                    capture_output=True, text=True)
            if linked.returncode != 0:  # clang finds no aarch64 C library or linker
                pytest.skip(f"{compiler} cannot link for aarch64: {linked.stderr[-300:]}")
            programs[name] = folder / name
        return programs[name]

    return program


#: Positions per case whose first NaN is fresh: inf - inf, 0 * inf, inf * 0 among
#: the special values (fresh_nans). On x86 and Arm they hold different NaNs in
#: float32 and float16; bfloat16 stores every NaN as 0xFFFF, so there they agree.
FRESH_NANS = {torch.float32: 74, torch.float16: 6, torch.bfloat16: 6}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="allows x86's default NaN in the torch path's output")
@pytest.mark.parametrize("build", list(AARCH64_BUILDS))
@pytest.mark.parametrize("case", list(cases()), ids=case_id)
def test_aarch64_build_gives_the_torch_paths_bits(case, build, aarch64_program, expected, tmp_path):
    dtype, round_stages, ts = case
    tensors, want = expected[case]
    (tmp_path / "in").write_bytes(b"".join(bits(x).tobytes() for x in tensors))
    t32 = [float(np.float32(t)).hex() for t in ts]
    subprocess.run(
        ["qemu-aarch64", str(aarch64_program(build)), str(_fused.DTYPE_CODES[dtype]),
         str(int(round_stages)), str(len(want)), "997", str(tmp_path / "in"), str(tmp_path / "out"), *t32],
        check=True, capture_output=True, text=True,
    )
    got = np.frombuffer((tmp_path / "out").read_bytes(), dtype=bits(want).dtype)
    want = bits(want)
    x86_nan, arm_nan = DEFAULT_NAN[dtype]
    differ = got != want
    substituted = differ & (want == x86_nan) & (got == arm_nan)
    assert not (differ & ~substituted).any(), f"{(differ & ~substituted).sum()} positions differ"
    fresh = fresh_nans(tensors, ts, round_stages)
    assert fresh.sum() == FRESH_NANS[dtype]
    if dtype == torch.bfloat16:
        assert (want[fresh] == 0xFFFF).all() and not substituted.any()
    else:
        assert (want[fresh] == x86_nan).all() and np.array_equal(substituted, fresh)


@pytest.mark.skipif(not found("clang"), reason="clang is not installed")
@pytest.mark.parametrize("cpu", [[], ["-mcpu=apple-m1"]], ids=["generic", "apple-m1"])
def test_macos_arm64_compiles(cpu, tmp_path):
    command = ["clang", "--target=arm64-apple-macos", *cpu, *_fused.FLAGS,
               "-fopenmp-simd", "-fPIC", "-Werror=implicit-function-declaration",
               "-S", "-o", str(tmp_path / "fused.s"), str(SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and "file not found" in result.stderr:
        # No macOS SDK here: clang's own freestanding <stdint.h> suffices.
        result = subprocess.run([*command, "-ffreestanding"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "_nearswap_chain_range" in (tmp_path / "fused.s").read_text()
