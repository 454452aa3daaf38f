"""generate: left-padded batches, eos, streamers, seeded sampling; HF model.generate still works."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from fh_compile import build_assets, generate, swap_head
from tests.fh_compile.lm_fixtures import (PAD, PROMPT_LEN, compiled_qwen, hf_greedy_per_row,
                                          prompts, tiny_lm)


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.ended = True


def _first(row: torch.Tensor, token: int) -> int:
    return int((row == token).nonzero()[0, 0])


def test_left_padded_batch_equals_rows_alone() -> None:
    model, _ = compiled_qwen()
    ids, mask = prompts()
    both = generate(model, ids, mask, max_new_tokens=10)
    alone = generate(model, ids[1:, PAD:], max_new_tokens=10)         # B=1 in a B=2 cache
    assert torch.equal(both.new_tokens[1], alone.new_tokens[0])
    assert torch.equal(both.sequences[:, :PROMPT_LEN], ids)
    assert both.num_generated.tolist() == [10, 10]


def test_eos_stops_rows_and_pads() -> None:
    model, _ = compiled_qwen()
    ids, mask = prompts()
    free = generate(model, ids, mask, max_new_tokens=12).new_tokens
    eos = [int(free[0, 2]), int(free[1, 4])]
    stop = [min(_first(free[r], e) for e in eos if (free[r] == e).any()) + 1 for r in range(2)]
    out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert out.num_generated.tolist() == stop
    assert out.new_tokens.shape[1] == max(stop)                       # stopped early, trimmed
    for r in range(2):
        assert torch.equal(out.new_tokens[r, :stop[r]], free[r, :stop[r]])
        assert (out.new_tokens[r, stop[r]:] == 0).all()


def test_streamer_gets_prompt_then_each_token() -> None:
    model, _ = compiled_qwen()
    ids, _ = prompts()
    streamer = Collect()
    out = generate(model, ids[:1], max_new_tokens=5, streamer=streamer)
    assert streamer.ended and len(streamer.chunks) == 6
    assert torch.equal(streamer.chunks[0], ids[:1])
    assert torch.equal(torch.cat(streamer.chunks[1:]), out.new_tokens[0])


def test_seeded_sampling_is_reproducible() -> None:
    model, _ = compiled_qwen()
    ids, mask = prompts()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=6, top_p=0.95)
    a = generate(model, ids, mask, seed=7, **kw).sequences
    b = generate(model, ids, mask, seed=7, **kw).sequences
    assert torch.equal(a, b)
    others = [generate(model, ids, mask, seed=s, **kw).sequences for s in (8, 9)]
    assert any(not torch.equal(a, o) for o in others)


def test_stochastic_probing_eager_is_reproducible() -> None:
    model = tiny_lm("llama", tied=True, seed=4)
    swap_head(model, build_assets(model.lm_head.weight, cluster_size=16), probes=3, k=8)
    ids, mask = prompts()
    kw = dict(max_new_tokens=6, do_sample=True, stochastic_probing=True, seed=1)
    a, b = generate(model, ids, mask, **kw), generate(model, ids, mask, **kw)
    assert a.path == "flashhead" and a.mode is None
    assert torch.equal(a.sequences, b.sequences)


def test_hf_generate_works_on_compiled_model() -> None:
    model, dense = compiled_qwen()
    ids, mask = prompts()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, dense.generate(ids, attention_mask=mask, max_new_tokens=8,
                                              do_sample=False))
    refs = hf_greedy_per_row(dense, ids, mask, 8)
    eos = int(refs[0][3])
    stopped = model.generate(ids[:1], max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] == PROMPT_LEN + _first(refs[0], eos) + 1
    streamer = Collect()
    model.generate(ids[:1], max_new_tokens=4, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks[1:]), refs[0][:4])
    torch.manual_seed(3)
    s1 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0)
    torch.manual_seed(3)
    s2 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0)
    assert torch.equal(s1, s2)
    # FlashHead's logits are -inf outside its k = 8 candidates: samples come from them.
    head = model.get_output_embeddings()
    assert head.config.k == 8 and s1.shape == (2, PROMPT_LEN + 6)


def test_bad_generate_arguments_raise() -> None:
    model, _ = compiled_qwen()
    ids, mask = prompts()
    with pytest.raises(ValueError, match="left"):
        generate(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="max_batch_size"):
        generate(model, torch.cat([ids, ids]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_cache_len"):
        generate(model, ids, mask, max_new_tokens=100)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, mask, do_sample=True, temperature=0.0)
