"""ARM without a board: the Q8_0 inner loops of gemma_rs and llama.cpp, compiled for aarch64 and
scheduled by llvm-mca on Cortex-A55 and Cortex-A76, and a 2×A55 board's prefill and decode
predicted from them. A static model, not a measurement: no ARM timing exists here.

    python bench/arm_model.py [--ghz 1.8] [--bandwidth-gbs 6] [--llama-src DIR]

What it does:

1. gemma_rs: builds this crate for aarch64-unknown-linux-gnu with the cross toolchain of
   scripts/aarch64-env.sh (``cargo rustc --release --lib -- --emit asm``, LTO off so that each
   kernel keeps its symbol), then takes from each microkernel (``neon::dotprod_tile``,
   ``neon::i8mm_tile``, ``neon::neon_tile``) the loop with the most int8 multiply instructions:
   the K-block loop of its widest register tile (dotprod 8 rows × 4 tokens, i8mm 8 × 4, plain
   NEON 8 × 2; the 1-token tile of dotprod too, decode's).
2. llama.cpp: compiles ``ggml-cpu/arch/arm/repack.cpp`` (``ggml_gemm_q8_0_4x4_q8_0`` and
   ``ggml_gemv_q8_0_4x4_q8_0``, dotprod, its repacked Q8_0 prefill and decode;
   ``ggml_gemm_q8_0_4x8_q8_0``, i8mm) and ``quants.c`` (``ggml_vec_dot_q8_0_q8_0``, with
   dotprod and without) from the llama-cpp-python sdist with aarch64-linux-gnu-gcc -O3 -S and
   the -march of each path, and takes the same kind of loop.
3. Runs ``llvm-mca -mtriple=aarch64 -mcpu=CPU -iterations=200`` on each loop and reports cycles
   per iteration, int8 multiply-adds per iteration (counted from the instructions: ``sdot`` 16,
   ``smmla`` 32, ``smull``/``smlal`` and their ``2`` forms 8, ``mul``/``mla`` on .16b 16), their
   ratio, and the share of the core's peak — the rate llvm-mca gives for 8 independent
   ``sdot`` (``smmla`` for i8mm) instructions in a row on that core.
4. Predicts, for a board of 2 Cortex-A55 at --ghz: prefill tokens/s = 2 × clock × MACs/cycle of
   the best kernel the A55 has (dotprod) / multiply-adds per token (the layers' products of
   Gemma 3 270M, 100.3 M; attention, norms and activations left out: an upper bound), and
   decode tokens/s = bandwidth / bytes per token (285 MB of Q8_0 weights, the lm_head
   included), capped by the 1-token tile's compute rate.

LLVM 14's scheduling models: Cortex-A55 has its own; Cortex-A76 is scheduled with LLVM's
Cortex-A57 model (``-mcpu=cortex-a76`` selects it): a rough stand-in, said in the table. Neither
core has i8mm, so the i8mm loops are also scheduled for ``-mcpu=neoverse-n2`` when this LLVM
knows it, else left out of the table (they run under qemu in scripts/test-aarch64).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "aarch64-unknown-linux-gnu"

# int8 multiply-adds per instruction (vector forms only).
MACS = [
    (re.compile(r"^\s*sdot\s+v\d+\.4s"), 16),
    (re.compile(r"^\s*smmla\s"), 32),
    (re.compile(r"^\s*(smull2?|smlal2?)\s+v\d+\.8h"), 8),
    (re.compile(r"^\s*(mul|mla)\s+v\d+\.16b"), 16),
]


def macs_of(line: str) -> int:
    return next((m for pat, m in MACS if pat.search(line)), 0)


@dataclass
class Loop:
    kernel: str
    source: str
    body: list[str]

    @property
    def macs(self) -> int:
        return sum(macs_of(x) for x in self.body)


def functions(asm: str) -> dict[str, list[str]]:
    """Function symbol -> its lines, from a GNU-style assembly listing."""
    out: dict[str, list[str]] = {}
    name = None
    for line in asm.splitlines():
        m = re.match(r"^([A-Za-z_.$][\w.$]*):", line)
        if m and not m.group(1).startswith(".L"):
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


# A conditional or plain branch to a local label (GCC writes `bne`, LLVM `b.ne`).
COND = "eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le"
BRANCH = re.compile(
    rf"^\s*(b(?:\.?(?:{COND}))?|cbnz|cbz|tbnz|tbz)\s+(?:[^,]+,\s*)*(\.L\w+)\s*(?://.*)?$"
)


def loops(lines: list[str]) -> list[list[str]]:
    """Bodies of the backward-branch loops of a function: from a label to a branch back to it."""
    labels: dict[str, int] = {}
    found = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\.L\w+):", line)
        if m:
            labels[m.group(1)] = i
            continue
        m = BRANCH.match(line)
        if m and m.group(2) in labels and labels[m.group(2)] < i:
            found.append(lines[labels[m.group(2)] + 1 : i + 1])
    return found


def instructions(body: list[str]) -> list[str]:
    """The loop's instructions only (no labels, directives or comments)."""
    out = []
    for line in body:
        line = line.split("//")[0].rstrip()
        s = line.strip()
        if not s or s.endswith(":") or s.startswith("."):
            continue
        out.append("\t" + s)
    return out


def best_loop(funcs: dict[str, list[str]], symbol_part: str, kernel: str, source: str, pick=max):
    """The loop with the most (pick=max) or fewest nonzero (pick=min) multiply-adds among the
    functions whose symbol contains `symbol_part`."""
    cands = []
    for name, lines in funcs.items():
        if symbol_part in name:
            for body in loops(lines):
                ins = instructions(body)
                loop = Loop(kernel, source, ins)
                if loop.macs:
                    cands.append(loop)
    if not cands:
        raise SystemExit(f"no multiply loop found in a function matching {symbol_part!r}")
    return pick(cands, key=lambda lp: (lp.macs, -len(lp.body)))


def mca(body: list[str], cpu: str, attrs: str) -> float:
    """Cycles per iteration that llvm-mca gives `body` on `cpu`."""
    cmd = ["llvm-mca", "-mtriple=aarch64", f"-mcpu={cpu}", f"-mattr={attrs}", "-iterations=200"]
    r = subprocess.run(
        cmd, input="\n".join(body) + "\n", capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr else "llvm-mca failed")
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", r.stdout)[1])
    iters = int(re.search(r"Iterations:\s+(\d+)", r.stdout)[1])
    return cycles / iters


def peak(cpu: str, attrs: str, i8mm: bool) -> float:
    """MACs/cycle of 8 independent sdot (smmla) instructions on `cpu`, by llvm-mca."""
    if i8mm:
        body = [f"\tsmmla v{i}.4s, v{16 + i}.16b, v{24 + i}.16b" for i in range(8)]
        per = 32
    else:
        body = [f"\tsdot v{i}.4s, v{16 + i}.16b, v{24 + i}.16b" for i in range(8)]
        per = 16
    return 8 * per / mca(body, cpu, attrs)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def gemma_rs_asm(work: Path) -> str:
    """The crate's aarch64 assembly (release, LTO off)."""
    target_dir = work / "target"
    script = (
        f"source '{ROOT}/scripts/aarch64-env.sh' && aarch64_toolchain >/dev/null && "
        f"cross cargo rustc --quiet --release --lib --crate-type rlib --target {TARGET} "
        f"--target-dir '{target_dir}' -- --emit asm"
    )
    env = {**os.environ, "CARGO_PROFILE_RELEASE_LTO": "false"}
    run(["bash", "-c", script], cwd=ROOT, env=env)
    (asm,) = list((target_dir / TARGET / "release" / "deps").glob("gemma_rs-*.s"))
    return asm.read_text()


def llama_src(given: str | None) -> Path:
    """The ggml-cpu/arch/arm directory of the llama-cpp-python sdist (unpacked if needed)."""
    if given:
        return Path(given)
    cache = Path(os.environ.get("GEMMA_RS_CACHE", Path.home() / ".cache" / "gemma_rs"))
    found = sorted(cache.glob("llama-cpp*/**/ggml-cpu/arch/arm"))
    if found:
        return found[0]
    sdists = sorted(cache.glob("llama-cpp*/llama_cpp_python-*.tar.gz"))
    if not sdists:
        dest = cache / "llama-cpp-src"
        dest.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "llama-cpp-python==0.3.36", "-d", str(dest)])  # fmt: skip
        sdists = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    run(["tar", "xzf", str(sdists[0]), "-C", str(sdists[0].parent)])
    return sorted(cache.glob("llama-cpp*/**/ggml-cpu/arch/arm"))[0]


def llama_asm(arm: Path, work: Path, file: str, march: str) -> str:
    ggml = arm.parents[2]  # ggml/src
    out = work / f"{file}.{march.replace('+', '_')}.s"
    cc = "aarch64-linux-gnu-g++" if file.endswith(".cpp") else "aarch64-linux-gnu-gcc"
    std = ["-std=c++17"] if file.endswith(".cpp") else ["-std=c11"]
    run([cc, "-O3", f"-march={march}", *std, "-S", "-o", str(out),
         "-I", str(ggml.parent / "include"), "-I", str(ggml), "-I", str(ggml / "ggml-cpu"),
         "-DNDEBUG", "-D_GNU_SOURCE", str(arm / file)])  # fmt: skip
    return out.read_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ghz", type=float, default=1.8, help="the A55 board's clock (1.8 GHz)")
    ap.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=6.0,
        help="memory bandwidth a decode reaches (LPDDR4-3200 x32: 12.8 GB/s nominal; default 6)",
    )
    ap.add_argument("--llama-src", help="llama.cpp's ggml/src/ggml-cpu/arch/arm directory")
    a = ap.parse_args()
    for tool in ("llvm-mca", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing (apt-get install llvm g++-aarch64-linux-gnu)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("building gemma_rs for aarch64 (assembly) ...", file=sys.stderr)
        ours = functions(gemma_rs_asm(work))
        arm = llama_src(a.llama_src)
        dot = functions(llama_asm(arm, work, "repack.cpp", "armv8.2-a+dotprod"))
        mm = functions(llama_asm(arm, work, "repack.cpp", "armv8.6-a+dotprod+i8mm"))
        q_dot = functions(llama_asm(arm, work, "quants.c", "armv8.2-a+dotprod"))
        q_plain = functions(llama_asm(arm, work, "quants.c", "armv8-a"))

    def tile(loop: Loop, rows: int) -> Loop:
        """Names the loop by its register tile: rows × tokens (32 values per row and token)."""
        loop.kernel = f"{loop.kernel} {rows}×{loop.macs // (32 * rows)}"
        return loop

    rows = [
        # (loop, needs i8mm)
        (tile(best_loop(ours, "dotprod_tile", "dotprod", "gemma_rs"), 8), False),
        (tile(best_loop(ours, "dotprod_tile", "dotprod", "gemma_rs", pick=min), 8), False),
        (tile(best_loop(ours, "neon_tile", "plain NEON", "gemma_rs"), 8), False),
        (tile(best_loop(ours, "i8mm_tile", "i8mm", "gemma_rs"), 8), True),
        (tile(best_loop(dot, "ggml_gemm_q8_0_4x4_q8_0", "dotprod gemm", "llama.cpp"), 4), False),
        (tile(best_loop(dot, "ggml_gemv_q8_0_4x4_q8_0", "dotprod gemv", "llama.cpp"), 4), False),
        (tile(best_loop(mm, "ggml_gemm_q8_0_4x8_q8_0", "i8mm gemm", "llama.cpp"), 4), True),
        (best_loop(q_dot, "ggml_vec_dot_q8_0_q8_0", "dotprod vec_dot", "llama.cpp"), False),
        (best_loop(q_plain, "ggml_vec_dot_q8_0_q8_0", "plain NEON vec_dot", "llama.cpp"), False),
    ]
    cpus = [("cortex-a55", "+dotprod", "Cortex-A55"), ("cortex-a76", "+dotprod", "Cortex-A76*")]
    cpus_mm = [("neoverse-n2", "+dotprod,+i8mm", "Neoverse-N2")]
    try:
        peak("neoverse-n2", "+dotprod,+i8mm", True)
    except (RuntimeError, TypeError):
        cpus_mm = []

    print("command: python bench/arm_model.py " + " ".join(sys.argv[1:]))
    llvm = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    print(f"llvm-mca: {next(x.strip() for x in llvm.splitlines() if 'version' in x)}")
    print("\n| engine | kernel | core | MACs/iter | cycles/iter | MACs/cycle | % of core peak |")
    print("|---|---|---|---|---|---|---|")
    rate: dict[tuple[str, str, str], float] = {}
    for loop, needs_i8mm in rows:
        for cpu, attrs, label in cpus_mm if needs_i8mm else cpus:
            cyc = mca(loop.body, cpu, attrs)
            mpc = loop.macs / cyc
            pk = peak(cpu, attrs, needs_i8mm)
            rate[(loop.source, loop.kernel, cpu)] = mpc
            print(
                f"| {loop.source} | {loop.kernel} | {label} | {loop.macs} | {cyc:.1f} | "
                f"{mpc:.1f} | {100 * mpc / pk:.0f}% of {pk:.0f} |"
            )
    print(
        "\n* LLVM 14 has no Cortex-A76 model: -mcpu=cortex-a76 schedules with its Cortex-A57 "
        "model. Peak: 8 independent sdot (smmla) per the same model."
    )

    macs_token = 18 * (640 * (1024 + 2 * 256) + 1024 * 640 + 3 * 640 * 2048)
    bytes_token = 285_018_624
    cores, ghz, bw = 2, a.ghz, a.bandwidth_gbs
    print(
        f"\n2×Cortex-A55 at {ghz} GHz, {bw} GB/s reached by decode (assumptions); "
        f"{macs_token / 1e6:.1f} M multiply-adds and {bytes_token / 1e6:.0f} MB of weights per "
        "token:\n"
    )
    print(
        "| engine | prefill tok/s (compute bound, widest dotprod tile) | decode tok/s (min of "
        "bandwidth, compute of the 1-token tile) |"
    )
    print("|---|---|---|")
    bw_tps = bw * 1e9 / bytes_token
    for src, gemm, gemv in [
        ("gemma_rs", "dotprod 8×4", "dotprod 8×1"),
        ("llama.cpp", "dotprod gemm 4×4", "dotprod gemv 4×1"),
    ]:
        pre = cores * ghz * 1e9 * rate[(src, gemm, "cortex-a55")] / macs_token
        dec_compute = (
            cores * ghz * 1e9 * rate[(src, gemv, "cortex-a55")] / (macs_token + 640 * 262144)
        )
        print(f"| {src} | {pre:.0f} | {min(bw_tps, dec_compute):.1f} (compute {dec_compute:.1f}) |")
    print(
        "\nUpper bounds from the matrix products alone (attention, norms, activations, "
        "quantizing the activations and thread hand-offs left out); a model, not a measurement."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
