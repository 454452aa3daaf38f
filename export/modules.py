"""Exportable views of a DecodeStep (fh_compile.decode): its state becomes explicit inputs.

A DecodeStep keeps its state (fast forward: `kv{i}_k`, `kv{i}_v` [B, H_kv, L, Dh], `fill` [1]
int64, `starts` [B] int64, `counters` [n] int32 (the kernels' scratch, always zero between
calls); transformers' forward: the StaticCache tensors `kv{i}_k`, `kv{i}_v`,
`kv{i}_len` [] int64, `attn_mask` [B, L] int64, `positions` [B] int64) in buffers mutated in
place.  Exported as is, each program would own a private copy of that state, so a prefill program
could never hand its cache to a decode program.  The modules here take the state as a dict input
instead (the same tensors, mutated in place by the torch.export and AOTInductor programs), so
one state dict serves every artifact:

    state = new_state(step)                       # zeros: an empty cache
    ids, logits = prefill(prompt, mask, state)    # [B, T] -> [B, k] (resets the state first)
    ids, logits = decode(ids[:, :1], state)       # [B, 1] -> [B, k], one slot appended

`DecodeFunctional` returns the updated state as outputs instead (ONNX has no mutable inputs).
The step itself is held outside the module tree, so its own buffers are never traced or saved.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from fh_compile.decode import DecodeStep, head_topk


def state_names(step: DecodeStep) -> list[str]:
    """Names of the step's state tensors, in a fixed order (its own buffers)."""
    return [name for name, _ in step.named_buffers(recurse=False)]


def new_state(step: DecodeStep, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """An empty state (all zeros, like a fresh DecodeStep), shaped like the step's buffers."""
    return {name: torch.zeros_like(buf, device=device)
            for name, buf in step.named_buffers(recurse=False)}


class _StateAsInputs(nn.Module):
    """Runs a DecodeStep with its buffers (and the StaticCache's references to them) rebound to
    the tensors of a state dict for the duration of one call."""

    def __init__(self, step: DecodeStep) -> None:
        super().__init__()
        if step.sliding:
            raise ValueError("transformers' forward counts a sliding-window layer's fill in a "
                             "Python int, which an exported program would freeze at its export "
                             "value; export the fast forward (forward='auto' or 'fast')")
        self.model = step.model          # parameters and FlashHead buffers live here
        self._step = [step]              # a list: keeps the step's own buffers out of the tree
        self.names = state_names(step)
        buffers = dict(step.named_buffers(recurse=False))
        # The StaticCache layers hold the same tensors by reference; find them by identity, so
        # this works whatever attribute names the transformers version uses.
        self._aliases: dict[str, list[tuple[object, str]]] = {n: [] for n in self.names}
        for layer in (step.cache.layers if step.fast is None else []):
            for attr, value in vars(layer).items():
                for name, buf in buffers.items():
                    if value is buf:
                        self._aliases[name].append((layer, attr))

    @property
    def step(self) -> DecodeStep:
        return self._step[0]

    @contextmanager
    def bound(self, state: dict[str, torch.Tensor]) -> Iterator[DecodeStep]:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}; build it with export.modules.new_state")
        step, saved = self.step, []
        for name in self.names:
            saved.append((step._buffers, name, step._buffers[name]))
            step._buffers[name] = state[name]
            for obj, attr in self._aliases[name]:
                saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, state[name])
        try:
            with step.attention_context():
                yield step
        finally:
            for obj, key, value in reversed(saved):
                if isinstance(obj, dict):
                    obj[key] = value
                else:
                    setattr(obj, key, value)


class Prefill(_StateAsInputs):
    """forward(input_ids [B, T] int64, attention_mask [B, T] int64 (0 = left padding), state)
    -> (ids [B, k] int64, logits [B, k] fp32) of the last position.  Resets `state` first."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.bound(state) as step:
            out = head_topk(step.head, step.prefill_hidden(input_ids, attention_mask), step.k,
                            softcap=step.softcap)
        return out.ids, out.logits


class Decode(_StateAsInputs):
    """forward(input_ids [B, 1] int64, state) -> (ids [B, k] int64, logits [B, k] fp32).
    Appends one slot to the cache in `state` (in place)."""

    def forward(self, input_ids: torch.Tensor,
                state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.bound(state) as step:
            out = step(input_ids)
        return out.ids, out.logits


class DecodeFunctional(_StateAsInputs):
    """Decode without mutable inputs (for ONNX): forward(input_ids [B, 1], state) ->
    (ids [B, k], logits [B, k], new_state); feed new_state to the next call."""

    def forward(self, input_ids: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        state = {name: t.clone() for name, t in state.items()}
        with self.bound(state) as step:
            out = step(input_ids)
        return out.ids, out.logits, state


class HeadTopK(nn.Module):
    """The LM head alone: forward(h [N, D]) -> (ids [N, k] int64, logits [N, k] fp32), the
    logits soft-capped when the model caps its final logits (Gemma 2)."""

    def __init__(self, head: nn.Module, k: int, softcap: float | None = None) -> None:
        super().__init__()
        self.head, self.k, self.softcap = head, k, softcap

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = head_topk(self.head, h, self.k, softcap=self.softcap)
        return out.ids, out.logits
