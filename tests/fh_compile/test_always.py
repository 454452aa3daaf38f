"""Always-scored ids in fh_compile: collected from a model and tokenizer, recorded in the assets'
metadata (round trip; old assets without the field), held by the head and scored at every step
whatever the probes (greedy, sampling, forward, the reference kernel), checked by the builder."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models
from fh_compile import (AssetError, FlashHeadAssets, always_scored_ids, build_assets,
                        compile_model, swap_head)
from fh_compile.always import always_ids_for_model_files, always_report
from fh_compile.assets import HEADER_FILE
from fh_compile.head import FlashHeadConfig, FlashHeadLMHead
from fh_compile.sampling import SamplingConfig

V = len(tiny_models.vocab_tokens())            # 275: 272 <|endoftext|>, 273 <|im_start|>, 274 <|im_end|>


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_model(tied=False)


@pytest.fixture(scope="module")
def assets(model):
    return build_assets(model.lm_head.weight.detach(), cluster_size=16, coarse_iters=2,
                        fine_iters=2, always_ids=[9, 274, 9])


def test_always_scored_ids_from_configs_tokenizer_and_extra(model) -> None:
    tok = tiny_models.tiny_tokenizer()
    assert always_scored_ids(model) == [274]                       # config / generation config
    assert always_scored_ids(model, tok) == [272, 274]              # + <|endoftext|> in vocab
    assert always_scored_ids(model, tok, extra=[5, "<|im_start|>"]) == [5, 272, 273, 274]
    gen = model.generation_config
    old = gen.eos_token_id
    try:
        gen.eos_token_id = [1, 274]
        assert always_scored_ids(model) == [1, 274]
    finally:
        gen.eos_token_id = old
    with pytest.raises(ValueError, match=r"not a row of the LM head \(V=275\)"):
        always_scored_ids(model, extra=[V])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        always_scored_ids(model, tok, extra=["<nope>"])
    with pytest.raises(ValueError, match="pass the tokenizer"):
        always_scored_ids(model, extra=["<|im_end|>"])
    with pytest.raises(TypeError, match="must be ints"):
        always_scored_ids(model, extra=[2.0])


def test_model_files_give_the_same_ids(tiny_hf_untied, tiny_gguf) -> None:
    ids, tok = always_ids_for_model_files(tiny_hf_untied, V)
    assert ids == [272, 274] and tok.convert_ids_to_tokens(274) == "<|im_end|>"
    assert always_ids_for_model_files(tiny_gguf[0], V)[0] == [272, 274]


def test_assets_metadata_round_trip(assets, tmp_path) -> None:
    assert assets.always_ids == [9, 274]                             # sorted, deduplicated
    assert assets.to("cpu", torch.bfloat16).always_ids == [9, 274]
    assets.save(tmp_path)
    assert json.loads((tmp_path / HEADER_FILE).read_text())["always_ids"] == [9, 274]
    assert FlashHeadAssets.load(tmp_path).always_ids == [9, 274]
    with pytest.raises(AssetError, match="always_ids: always-scored id 275"):
        FlashHeadAssets(assets.centroids, assets.weight, assets.offsets, assets.token_ids,
                        16, assets.fingerprint, always_ids=[275])


def test_old_assets_without_the_list_load_and_take_it_from_the_model(assets, model,
                                                                     tmp_path) -> None:
    assets.save(tmp_path)
    header = json.loads((tmp_path / HEADER_FILE).read_text())
    del header["always_ids"]                                         # as written before
    (tmp_path / HEADER_FILE).write_text(json.dumps(header))
    old = FlashHeadAssets.load(tmp_path)
    assert old.always_ids is None
    twin = tiny_models.tiny_model(tied=False)
    head = swap_head(twin, old, probes=2, k=4)
    assert head.always_ids == (274,)                                # the model's eos id


def test_swap_head_sources(assets) -> None:
    m = tiny_models.tiny_model(tied=False)
    assert swap_head(m, assets, probes=2, k=4).always_ids == (9, 274)   # assets' + model's
    m = tiny_models.tiny_model(tied=False)
    head = swap_head(m, assets, probes=2, k=4, always_ids=[])
    assert head.always_ids == () and head.fh_always_ids.shape == (0,)
    m = tiny_models.tiny_model(tied=False)
    head = swap_head(m, assets, probes=2, k=4, always_ids=[30, 7])
    assert head.always_ids == (7, 30)
    assert torch.equal(head.fh_token_ids[head.fh_always_rows], torch.tensor([7, 30]))
    with pytest.raises(ValueError, match="not a row of the LM head"):
        swap_head(tiny_models.tiny_model(tied=False), assets, probes=2, k=4, always_ids=[V + 1])


def planted_head(kernel: str, always: list[int]) -> tuple[FlashHeadLMHead, torch.Tensor, int]:
    """A head (V=1003, probes=1, k=4) whose token in a cluster h never probes has the largest
    logit of every row of h.  Returns (head, h [3, D], that token's id)."""
    a = build_assets(torch.randn(1003, 48), cluster_size=16, coarse_iters=2, fine_iters=2)
    h = torch.randn(3, 48)
    probed = set((h @ a.centroids.t()).topk(2, dim=1).indices.flatten().tolist())
    c = next(c for c in range(a.num_clusters) if c not in probed)
    row = int(a.offsets[c])
    a.weight[row] = 20.0 * torch.nn.functional.normalize(h, dim=1).sum(0)
    eos = int(a.token_ids[row])
    return (FlashHeadLMHead(a, FlashHeadConfig(probes=1, k=4, kernel=kernel),
                            [eos if i < 0 else i for i in always]), h, eos)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_head_scores_the_always_ids_at_every_step(kernel, fresh_seed) -> None:
    head, h, eos = planted_head(kernel, [-1, 3])                     # -1: the planted token
    assert head.always_ids == tuple(sorted({eos, 3}))
    assert bool((head.topk(h).ids[:, 0] == eos).all())
    assert bool((head.next_tokens(h, SamplingConfig()) == eos).all())
    assert bool((head(h).argmax(-1) == eos).all())                 # forward: [N, V] logits
    sampled = head.next_tokens(h, SamplingConfig(do_sample=True, top_k=4))
    assert bool((sampled == eos).all()), "its logit dwarfs the others: sampling draws it"
    noisy = head.next_tokens(h, SamplingConfig(do_sample=True, stochastic_probing=True))
    assert bool((noisy == eos).all())
    plain, h, eos = planted_head(kernel, [])
    assert plain.always_ids == ()
    assert not bool((plain.topk(h).ids == eos).any()), "without always ids probes=1 misses it"


def test_compile_model_takes_always_ids(tmp_path) -> None:
    m = tiny_models.tiny_model(tied=False)
    compile_model(m, probes=2, k=4, mode=None, always_ids=[11], cache_dir=tmp_path,
                  build_kwargs={"coarse_iters": 2, "fine_iters": 2})
    assert m.get_output_embeddings().always_ids == (11,)
    m = tiny_models.tiny_model(tied=False)
    compile_model(m, probes=2, k=4, mode=None, cache_dir=tmp_path)        # cached assets
    assert m.get_output_embeddings().always_ids == (274,)               # from the model


def test_builder_reports_each_always_id(assets, model) -> None:
    weight = model.lm_head.weight.detach()
    report = always_report(assets, weight, tiny_models.tiny_tokenizer())
    assert [r.id for r in report] == [9, 274]
    for r in report:
        assert r.retrievable and int(assets.token_ids[r.row]) == r.id
        assert int(assets.offsets[r.cluster]) <= r.row < int(assets.offsets[r.cluster + 1])
    assert "'<|im_end|>'" in report[1].describe() and "scored at every step" in report[1].describe()
    broken = assets.to("cpu")
    broken.weight = broken.weight.clone()
    broken.weight[report[1].row] += 1.0                              # not the source's row
    bad = always_report(broken, weight)
    assert not bad[1].retrievable and "NOT RETRIEVABLE" in bad[1].describe()
    assert bad[0].retrievable


@pytest.fixture
def restore_log_levels():
    import logging

    from fh_compile import cli

    levels = {n: logging.getLogger(n).level for n in cli.PACKAGES}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_build_assets_cli_records_and_reports_the_always_ids(tiny_hf_untied, tmp_path, capsys,
                                                             restore_log_levels) -> None:
    from fh_compile import cli

    out = tmp_path / "assets"
    rc = cli.main(["build-assets", "--model", str(tiny_hf_untied), "--out", str(out),
                   "--iters", "2", "--always-id", "<|im_start|>", "--always-id", "5"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert json.loads((out / HEADER_FILE).read_text())["always_ids"] == [5, 272, 273, 274]
    lines = [line for line in printed.splitlines() if line.startswith("always-scored id")]
    assert len(lines) == 4 and all("scored at every step" in line for line in lines)
    assert any(line.startswith("always-scored id 274 '<|im_end|>': row ") for line in lines)
    rc = cli.main(["build-assets", "--model", str(tiny_hf_untied), "--out", str(out),
                   "--overwrite", "--iters", "2", "--always-id", "<nope>"])
    assert rc == 2 and "not in the tokenizer's vocabulary" in capsys.readouterr().err
