"""AOTInductor packages of the exported prefill/decode programs, loaded back and verified.

How the FlashHead op gets into the package: `flashhead::topk` is a `torch.library.triton_op`.
torch.export keeps it as one opaque node (custom_triton_ops_decomposition_disabled), but when
AOTInductor lowers the program, AOTAutograd's functionalization decomposes a triton_op into its
body (torch/_library/triton.py, `functional_decomp`).  So nothing of the op is left to run in
Python, and no proxy executor or C++ custom-op registration is needed at load time:
  * CUDA: the body's `wrap_triton` kernels are compiled to cubins inside the package;
  * CPU: the body is the PyTorch reference (custom_ops/reference.py), lowered to C++ (aten shim
    calls for mm/topk/sort plus generated loops).
A package therefore loads with `torch._inductor.aoti_load_package` alone (no `import custom_ops`).
Packages are compiled for the device (and, on CUDA, the GPU architecture) they were exported on.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.export import ExportedProgram

from export.manifest import Artifact, Verification
from export.modules import new_state
from export.programs import Prompt, compare_tokens, describe, eager_tokens, greedy_tokens
from fh_compile.decode import DecodeStep

AOTI_PROGRAMS = ("prefill", "decode")


def inductor_configs(eager_numerics: bool) -> dict[str, object]:
    """Inductor settings of a package.  eager_numerics: round every bf16/fp16 intermediate as
    eager PyTorch does (emulate_precision_casts), so the package reproduces the eager model's
    tokens; without it Inductor keeps fused intermediates in fp32, which (seen on a random tiny
    bf16 Qwen2, CPU and H100) flips near-tied greedy tokens within a few steps.  No effect on
    fp32 programs."""
    return {"emulate_precision_casts": eager_numerics}


def package(program: ExportedProgram, path: Path, eager_numerics: bool = True) -> Path:
    """Compile one program with AOTInductor into a .pt2 package at `path`."""
    with _fresh_int_arrays():
        return Path(torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs=inductor_configs(eager_numerics)))


@contextlib.contextmanager
def _fresh_int_arrays() -> Iterator[None]:
    """Workaround for an AOTInductor codegen bug (torch 2.11 to 2.13 at least; pytorch PR
    #193621): the C++ wrapper caches the `int_array_N` name of each size/stride list keyed by
    id() of the buffer it was declared into; once that buffer is freed a new one can get the
    same id, the cache hits, and the generated wrapper uses a name it never declared (seen on
    an H200, torch 2.11: the 28-layer R1-1.5B decode step failed to compile with "'int_array_90'
    was not declared in this scope").  For the duration of our own compile, every list gets a
    fresh, declared name (a few more lines of C++, the same code otherwise).  Only this
    process's compile is affected; the method is restored on exit."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    except ImportError:
        yield
        return
    cached = CppWrapperCpu.__dict__.get("codegen_int_array_var")
    if cached is None or not hasattr(CppWrapperCpu, "_codegen_int_array_var_impl"):
        yield                                      # another layout: nothing to work around
        return

    def uncached(self, int_array, writeline, known_statically=False, graph=None):
        return self._codegen_int_array_var_impl(int_array, writeline, known_statically)

    CppWrapperCpu.codegen_int_array_var = uncached
    try:
        yield
    finally:
        CppWrapperCpu.codegen_int_array_var = cached


def import_onnxruntime_first() -> bool:
    """Workaround for a crash seen on the GPU machine (H200, torch 2.11.0+cu130, Ubuntu 24.04,
    2026-11-26): in a process that has not imported onnxruntime, `aoti_load_package` of any
    package, even a CUDA package of a lone nn.Linear, segfaults inside the package's own C++ (native
    backtrace: std::regex construction in torch::aot_inductor::parse_device_str, called by the
    model container's constructor); the same package loads and runs once onnxruntime is imported
    (importing transformers instead does not help).  The cause was not found.  Returns whether
    onnxruntime could be imported (it is an optional extra)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load(path: str | Path, **kwargs):
    """The package's callable: same arguments and outputs as the exported program.  kwargs go
    to torch._inductor.aoti_load_package (e.g. run_single_threaded=True for CUDA graphs)."""
    import_onnxruntime_first()
    return torch._inductor.aoti_load_package(str(path), **kwargs)


def package_and_verify(step: DecodeStep, programs: dict[str, ExportedProgram], out: Path,
                       prompt: Prompt, steps: int, verify: bool,
                       which: tuple[str, ...] = AOTI_PROGRAMS,
                       eager_numerics: bool = True) -> list[Artifact]:
    """Package `which` of the programs as out/<name>.aoti.pt2; (verify) load them and compare
    greedy tokens with the eager step.  A program not packaged runs as its torch.export program
    in the check (so a decode-only package is still verified end to end)."""
    unknown = set(which) - set(AOTI_PROGRAMS)
    if unknown or not which:
        raise ValueError(f"AOTI programs must be a non-empty subset of {AOTI_PROGRAMS}, got {which}")
    device = str(step.device)
    artifacts, paths = [], {}
    for name in which:
        t0 = time.perf_counter()
        paths[name] = package(programs[name], out / f"{name}.aoti.pt2", eager_numerics)
        inputs, outputs = describe(step, name)
        artifacts.append(Artifact(
            f"{name}.aoti", "aoti", paths[name].name, inputs, outputs,
            Verification("skipped", "--no-verify"), round(time.perf_counter() - t0, 2),
            device=device, notes=[f"compiled for {device}; load with "
                                  f"torch._inductor.aoti_load_package (no custom_ops import)",
                                  f"inductor_configs {inductor_configs(eager_numerics)}"]))
    if verify:
        run = {n: load(paths[n]) if n in paths else programs[n].module() for n in AOTI_PROGRAMS}
        got = greedy_tokens(run["prefill"], run["decode"], new_state(step), prompt, steps)
        result = compare_tokens(eager_tokens(step, prompt, steps), got,
                                f"aoti_load_package({', '.join(p.name for p in paths.values())})")
        for a in artifacts:
            a.verification = result
    return artifacts
