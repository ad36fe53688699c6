"""Compile every Triton kernel for a CUDA architecture, ahead of time, without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, what the tests use on CPU) runs the kernels' Python but
never lowers them, so it cannot tell whether they build for a real GPU. This module drives Triton's
own compiler (Triton IR → PTX → ``ptxas`` → cubin) for a target such as ``sm_90`` (H100/H200) with the
argument types and block sizes the launchers use, and reports each binary's registers, spills and
shared memory (through ``cuobjdump`` where Triton ships it). No driver or device is touched.

    TRITON_INTERPRET=0 python -m unioncam.kernels.compile_check --arch 90
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ._triton import HAS_TRITON, INTERPRETED, triton


@dataclass
class Built:
    """One kernel specialisation compiled for ``sm_<arch>``."""

    kernel: str
    config: str
    arch: int
    seconds: float
    ptx_bytes: int
    cubin_bytes: int
    shared_bytes: int
    registers: int | None = None
    stack_bytes: int | None = None  # per-thread stack: register spills land here
    local_bytes: int | None = None


def _signature(fn: object, consts: dict[str, object], **types: str) -> dict[str, str]:
    """Signature of ``fn``: ``types`` for named arguments, ``constexpr`` for ``consts``, else ``i32``."""
    names = fn.arg_names  # type: ignore[attr-defined]
    return {a: "constexpr" if a in consts else types.get(a, "i32") for a in names}


#: VGG16's feature maps at 224² input, one layer per distinct shape ``(K, h)``: every layer an
#: explanation may target (``features.29`` by default) has one of these shapes.
VGG16_224_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("features.2", 64, 224),
    ("features.4", 64, 112),
    ("features.7", 128, 112),
    ("features.9", 128, 56),
    ("features.14", 256, 56),
    ("features.16", 256, 28),
    ("features.21", 512, 28),
    ("features.23", 512, 14),
    ("features.29", 512, 14),
    ("features.30", 512, 7),
)


def _cases() -> list[tuple[str, object, dict[str, str], dict[str, object], int, str]]:
    """``(name, jit function, signature, constexprs, num_warps, config)``: a VGG16 explanation's launches.

    Block sizes and warps come from the launchers' own rules (``*_blocks``), so what is checked is
    what runs. Integers the launchers pass are ``i32``; pointers and floats are named. Triton turns an
    integer argument equal to 1 into a constant, so the unit stride of each layout is one here too:
    activations channels-last (``s_ak``, how the model gives them) or contiguous (``s_aw``), images
    contiguous (``s_xw``), masked inputs channels-last (``s_oc``, what ``masked_inputs`` builds).
    ``WIDE`` (int64 offsets within a map) is what the launchers pick for such shapes (False), plus one
    case each with it set, the variant that huge images get.
    """
    from .denoise import _denoise_kernel, denoise_blocks
    from .masks import _masked_kernel, _range_kernel, masked_blocks, range_blocks

    f32 = "*fp32"
    out = []
    # AMD on every layer shape of VGG16 at 224², float32; and the default layer with bfloat16 inputs.
    layers = [(shape, "fp32") for shape in VGG16_224_LAYERS] + [(VGG16_224_LAYERS[-2], "bf16")]
    for (layer, K, h), ty in layers:
        bk, bn, nw = denoise_blocks(K, h * h)
        consts = {"BLOCK_K": bk, "BLOCK_N": bn}
        sig = _signature(_denoise_kernel, consts, g_ptr=f"*{ty}", a_ptr=f"*{ty}", cam_ptr=f32,
                         count_ptr="*i64", weight="fp32")
        config = f"{layer} {K}x{h}x{h} in={ty} BLOCK_K={bk} BLOCK_N={bn}"
        out.append(("denoise", _denoise_kernel, sig, consts, nw, config))
    # The up-sampling kernels do not specialise on the layer's shape, only on the 224² output.
    br, bp, nw = range_blocks(224, 224)
    for acts, unit, wide in (("channels-last", "s_ak", False), ("contiguous", "s_aw", False),
                             ("channels-last", "s_ak", True)):
        consts = {unit: 1, "WIDE": wide, "BLOCK_R": br, "BLOCK_P": bp}
        sig = _signature(_range_kernel, consts, a_ptr=f32, lo_ptr=f32, hi_ptr=f32, scale_h="fp32",
                         scale_w="fp32")
        config = f"any layer->224x224 acts={acts} WIDE={wide} BLOCK_R={br} BLOCK_P={bp}"
        out.append(("upsampled_range", _range_kernel, sig, consts, nw, config))
    br, bp, nw = masked_blocks(224, 224)
    variants = [("channels-last", "s_ak", ty, normalize, False) for ty in ("fp32", "bf16", "fp16")
                for normalize in (True, False)]
    variants += [("contiguous", "s_aw", "fp32", True, False), ("channels-last", "s_ak", "bf16", True, True)]
    for acts, unit, out_ty, normalize, wide in variants:
        consts = {unit: 1, "s_xw": 1, "s_oc": 1, "NORMALIZE": normalize, "WIDE": wide, "BLOCK_R": br,
                  "BLOCK_P": bp}
        sig = _signature(
            _masked_kernel, consts, x_ptr=f32, a_ptr=f32, bi_ptr="*i64", ki_ptr="*i64", lo_ptr=f32,
            hi_ptr=f32, mean_ptr=f32, std_ptr=f32, out_ptr=f"*{out_ty}", scale_h="fp32", scale_w="fp32",
        )
        config = f"224x224 acts={acts} out={out_ty} norm={normalize} WIDE={wide} BLOCK_R={br} BLOCK_P={bp}"
        out.append(("masked_inputs", _masked_kernel, sig, consts, nw, config))
    return out


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local memory of a cubin, read by ``cuobjdump`` (Triton's own, else on PATH)."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(bundled) if bundled.is_file() else shutil.which("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {}
    for key, pattern in (
        ("registers", r"REG:(\d+)"),
        ("stack_bytes", r"STACK:(\d+)"),
        ("local_bytes", r"LOCAL:(\d+)"),
    ):
        m = re.search(pattern, text)
        if m:
            found[key] = int(m.group(1))
    return found


def compile_all(arch: int = 90) -> list[Built]:
    """Compile every case for ``sm_<arch>``; raises Triton's own error if one does not build."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 makes kernels interpreter functions: run with TRITON_INTERPRET=0"
        )
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    built = []
    for name, fn, sig, consts, num_warps, config in _cases():
        t0 = time.perf_counter()
        k = triton.compile(
            ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
        )
        cubin = k.asm["cubin"]
        built.append(
            Built(
                name,
                f"{config} warps={num_warps}",
                arch,
                time.perf_counter() - t0,
                len(k.asm["ptx"]),
                len(cubin),
                int(k.metadata.shared),
                **_resource_usage(cubin),
            )
        )
    return built


def main(argv: list[str] | None = None) -> list[Built]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability × 10 (H100/H200: 90, A100: 80)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    built = compile_all(args.arch)
    if args.json:
        print(json.dumps([asdict(b) for b in built], indent=1))
    else:
        print(f"triton {triton.__version__}, sm_{args.arch}; spills: per-thread stack bytes (0: none)")
        width = max(len(b.config) for b in built)
        print(
            f"{'kernel':16} {'config':{width}} {'regs':>5} {'spills B':>8} {'local B':>7} {'smem B':>7} "
            f"{'cubin B':>8} {'s':>5}"
        )
        for b in built:
            regs = "?" if b.registers is None else b.registers
            stack = "?" if b.stack_bytes is None else b.stack_bytes
            local = "?" if b.local_bytes is None else b.local_bytes
            print(
                f"{b.kernel:16} {b.config:{width}} {regs:>5} {stack:>8} {local:>7} {b.shared_bytes:>7} "
                f"{b.cubin_bytes:>8} {b.seconds:5.1f}"
            )
    return built


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set, so 3.9 does not warn
    main()
