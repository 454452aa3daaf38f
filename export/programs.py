"""torch.export programs of a DecodeStep: prefill (dynamic length) and decode, checked, saved and
verified against the eager model.

Both programs take the step's state as a dict input and mutate it in place (export.modules), so
`prefill` fills a cache that `decode` then extends.  Loading needs `import custom_ops` first, so
that `torch.ops.flashhead.topk` is registered before the graph is deserialized.  Export is
non-strict (explicitly; older torch defaulted to strict): the state rebinding of export.modules is
plain Python attribute assignment, which non-strict tracing simply runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.export import Dim, ExportedProgram

from export.manifest import Artifact, TensorInfo, Verification
from export.modules import Decode, Prefill, new_state
from fh_compile.decode import DecodeStep

# (input_ids, attention_mask, state) -> (ids, logits) and (input_ids, state) -> (ids, logits)
PrefillFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
DecodeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class ExportCheckError(RuntimeError):
    """An exported graph that breaks a promise of this package (e.g. FlashHead not one node)."""


def custom_op_counts(program: ExportedProgram | torch.fx.GraphModule) -> dict[str, int]:
    """{op name: nodes} for the torch.ops.flashhead.* ops in the graph and all its subgraphs."""
    gm = program.graph_module if isinstance(program, ExportedProgram) else program
    counts: dict[str, int] = {}
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            for node in mod.graph.nodes:
                op = getattr(node.target, "_schema", None)
                if node.op == "call_function" and op is not None and op.name.startswith("flashhead::"):
                    counts[op.name] = counts.get(op.name, 0) + 1
    return counts


def flashhead_node_count(program: ExportedProgram | torch.fx.GraphModule) -> int:
    """Nodes calling torch.ops.flashhead.topk, in the graph and all its subgraphs."""
    return custom_op_counts(program).get("flashhead::topk", 0)


def check_fast_step_nodes(program: ExportedProgram, step: DecodeStep, name: str) -> None:
    """A decode program of the fast forward holds ONE node per custom op call: per layer one
    rope_decode_attention (kernels="ops"; "ops-unfused": one rope_kv_write and one
    decode_attention), two rms_norm_linear and two act_linear (the `_ws` ops: they take the
    step's counters state)."""
    n = step.num_layers
    attention = ({"flashhead::rope_decode_attention": n} if step.fast.kernels == "ops" else
                 {"flashhead::decode_attention_ws": n, "flashhead::rope_kv_write": n})
    want = {**attention, "flashhead::rms_norm_linear_ws": 2 * n, "flashhead::act_linear_ws": 2 * n}
    got = custom_op_counts(program)
    wrong = {op: got.get(op, 0) for op, k in want.items() if got.get(op, 0) != k}
    if wrong:
        raise ExportCheckError(f"the {name} program of the fast forward ({n} layers) holds "
                               f"{wrong} nodes, expected {want}: an op was decomposed or "
                               f"traced into")


def check_one_flashhead_node(program: ExportedProgram, name: str) -> int:
    count = flashhead_node_count(program)
    if count != 1:
        why = ("the head took its dense path (rows per call above dense_above_rows: lower "
               "--probes or --batch) or the op was decomposed" if count == 0 else
               "the head ran more than once per step")
        raise ExportCheckError(f"the {name} program holds {count} torch.ops.flashhead.topk nodes, "
                               f"expected exactly 1: {why}")
    return count


@dataclass(frozen=True)
class Prompt:
    """A deterministic verification prompt: input_ids [B, T] int64, attention_mask [B, T] int64
    (row i is left padded by min(i, T - 1) tokens, so padding is exercised when B > 1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def make(cls, batch: int, length: int, vocab: int, device: torch.device | str,
             seed: int = 0) -> "Prompt":
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.int64)
        for i in range(batch):
            mask[i, :min(i, length - 1)] = 0
        return cls(ids.to(device), mask.to(device))


def export_prefill(step: DecodeStep, prompt: Prompt) -> ExportedProgram:
    """Prefill with a dynamic length T in [1, max_cache_len - 1]."""
    T = Dim("T", min=1, max=step.max_cache_len - 1)
    state = new_state(step)
    with torch.no_grad():
        return torch.export.export(Prefill(step), (prompt.input_ids, prompt.attention_mask, state),
                                   dynamic_shapes=({1: T}, {1: T}, {n: None for n in state}),
                                   strict=False)


def export_decode(step: DecodeStep) -> ExportedProgram:
    ids = torch.zeros(step.max_batch_size, 1, dtype=torch.int64, device=step.device)
    with torch.no_grad():
        return torch.export.export(Decode(step), (ids, new_state(step)), strict=False)


def describe(step: DecodeStep, which: str) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of the prefill or decode program, for the manifest."""
    B, k = step.max_batch_size, step.k
    ids = torch.zeros(B, 1, dtype=torch.int64)
    inputs = [TensorInfo.of("input_ids", ids, {1: "T"} if which == "prefill" else None)]
    if which == "prefill":
        inputs.append(TensorInfo.of("attention_mask", ids, {1: "T"}))
    inputs += [TensorInfo.of(f"state[{n!r}]", t) for n, t in new_state(step, "meta").items()]
    outputs = [TensorInfo("ids", [B, k], "int64"), TensorInfo("logits", [B, k], "float32")]
    return inputs, outputs


@torch.no_grad()
def greedy_tokens(prefill: PrefillFn, decode: DecodeFn, state: dict[str, torch.Tensor],
                  prompt: Prompt, steps: int) -> torch.Tensor:
    """Prefill, then `steps` greedy decode steps -> tokens [B, steps + 1] int64."""
    ids, _ = prefill(prompt.input_ids, prompt.attention_mask, state)
    tokens = [ids[:, 0]]
    for _ in range(steps):
        # contiguous: an AOTInductor package reads inputs with the strides it was compiled for
        # (it checks them only under AOTI_RUNTIME_CHECK_INPUTS=1); ids[:, :1] is strided.
        ids, _ = decode(tokens[-1][:, None].contiguous(), state)
        tokens.append(ids[:, 0])
    return torch.stack(tokens, 1)


def eager_tokens(step: DecodeStep, prompt: Prompt, steps: int) -> torch.Tensor:
    """The same greedy run on the eager DecodeStep (its own buffers)."""
    return greedy_tokens(lambda i, m, _: step.prefill(i, m), lambda i, _: step(i), {}, prompt,
                         steps)


def compare_tokens(expected: torch.Tensor, got: torch.Tensor, what: str) -> Verification:
    expected, got = expected.cpu(), got.cpu()
    metrics = {"expected": expected.tolist(), "got": got.tolist()}
    if torch.equal(expected, got):
        return Verification("passed", f"{what}: {got.shape[1]} greedy tokens x {got.shape[0]} "
                                      f"rows identical to the eager model", metrics)
    first = int((expected != got).any(0).nonzero()[0])
    return Verification("failed", f"{what}: tokens differ from the eager model from step {first} "
                                  f"on", metrics)


def save_and_verify(step: DecodeStep, out: Path, prompt: Prompt, steps: int, verify: bool
                    ) -> tuple[dict[str, ExportedProgram], list[Artifact]]:
    """Export prefill and decode, check the FlashHead node, save to out/{prefill,decode}.pt2,
    and (verify) reload both and compare greedy tokens with the eager step."""
    programs, artifacts, paths = {}, [], {}
    device = str(step.device)
    for name, make in (("prefill", lambda: export_prefill(step, prompt)),
                       ("decode", lambda: export_decode(step))):
        t0 = time.perf_counter()
        ep = make()
        nodes = check_one_flashhead_node(ep, name)
        if name == "decode" and step.fast is not None and step.fast.kernels != "torch":
            check_fast_step_nodes(ep, step, name)
        paths[name] = out / f"{name}.pt2"
        torch.export.save(ep, paths[name])
        programs[name] = ep
        inputs, outputs = describe(step, name)
        artifacts.append(Artifact(name, "torch.export", paths[name].name, inputs, outputs,
                                  Verification("skipped", "--no-verify"),
                                  round(time.perf_counter() - t0, 2), nodes, device))
    if verify:
        expected = eager_tokens(step, prompt, steps)
        loaded = {n: torch.export.load(p).module() for n, p in paths.items()}
        got = greedy_tokens(loaded["prefill"], loaded["decode"], new_state(step), prompt, steps)
        result = compare_tokens(expected, got, "torch.export.load(prefill.pt2, decode.pt2)")
        for a in artifacts:
            a.verification = result
    return programs, artifacts

