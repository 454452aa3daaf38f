import json

import pytest
import torch

import tiny_models
from benchmarks import fidelity, fidelity_data
from benchmarks.fidelity_metrics import HeadClusters, position_stats, probes_for_agreement, summarize
from custom_ops.reference import flashhead_reference
from fh_compile.build_assets import build_assets, centroids_for
from fh_compile.loading import lm_head_of, load_model

TEMPS = (0.6, 1.0)


@pytest.fixture(scope="module")
def head_and_h():
    model = tiny_models.tiny_model(tied=False, seed=3)
    W = lm_head_of(model).weight.detach()                               # [V=275, D=64]
    torch.manual_seed(0)
    ids = torch.randint(0, W.shape[0], (1, 96))
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state[0]      # [96, D]
    assets = build_assets(W, cluster_size=16, coarse_iters=3, fine_iters=3, refine_iters=1)
    return W, h, assets


def test_all_clusters_probed_is_exact(head_and_h):
    W, h, assets = head_and_h
    K = assets.num_clusters
    for mode in ("mean", "normalized"):
        c = HeadClusters.from_assets(assets, centroids_for(assets.weight, assets.offsets, mode))
        (st,) = position_stats(h, W, [c], (K,), TEMPS, chunk=40)
        (row,) = summarize(st, W.shape[0], 16)
        assert row["top1_agreement"] == 1.0
        assert row["top5_recall"] == 1.0 and row["top10_recall"] == 1.0
        assert row["tv_t0.6"] == 0.0 and row["tv_t1"] == 0.0
        assert row["vocab_fraction"] == 1.0
        assert probes_for_agreement(st, 1.0) <= K


def test_metrics_match_reference_op(head_and_h):
    """Agreement/recall from cluster ranks == comparing flashhead_reference with the dense head;
    TV from the tail mass == 1/2 sum |p - q| with q the candidate-restricted softmax."""
    W, h, assets = head_and_h
    probes = (1, 3, 7)
    c = HeadClusters.from_assets(assets)
    (st,) = position_stats(h, W, [c], probes, TEMPS, chunk=33)
    rows = summarize(st, W.shape[0], 16)
    dense = h.float() @ W.float().t()                                   # [N, V]
    dense_top = dense.topk(10, dim=1).indices
    for P, row in zip(probes, rows):
        ids, _ = flashhead_reference(h, assets.centroids, assets.weight, assets.offsets,
                                     assets.token_ids, P, 16, k=10)
        assert row["top1_agreement"] == pytest.approx(float((ids[:, 0] == dense_top[:, 0]).float().mean()))
        for k in (5, 10):
            hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, dense_top)]
            assert row[f"top{k}_recall"] == pytest.approx(sum(hits) / len(hits))
        # Candidate set of every position, from the same cluster selection as the op.
        sel = (h.float() @ assets.centroids.float().t()).topk(P, dim=1).indices
        cand = torch.zeros_like(dense, dtype=torch.bool)
        for n in range(h.shape[0]):
            for k in sel[n].tolist():
                cand[n, assets.token_ids[assets.offsets[k]:assets.offsets[k + 1]]] = True
        assert row["vocab_fraction"] == pytest.approx(float(cand.sum(1).float().mean()) / W.shape[0])
        for T in TEMPS:
            p = torch.softmax(dense / T, dim=1)
            q = torch.softmax((dense / T).masked_fill(~cand, float("-inf")), dim=1)
            tv = 0.5 * (p - q).abs().sum(1)
            assert row[f"tv_t{T:g}"] == pytest.approx(float(tv.mean()), abs=1e-5)
    assert 0 < rows[0]["top1_agreement"] < rows[-1]["top1_agreement"] <= 1


def _write_data(d):
    (d / "gsm8k").mkdir()
    (d / "ifeval").mkdir()
    (d / "mmlu_pro").mkdir()
    lines = lambda items: "".join(json.dumps(x) + "\n" for x in items)  # noqa: E731
    (d / "gsm8k/test.jsonl").write_text(lines(
        [{"question": f"q{i} the cat is in there?", "answer": f"There is {i}.\n#### {i}"} for i in range(12)]))
    (d / "ifeval/input_data.jsonl").write_text(lines(
        [{"key": i, "prompt": f"Write {i} words on the sea.", "instruction_id_list": [], "kwargs": []}
         for i in range(12)]))
    (d / "mmlu_pro/test.jsonl").write_text(lines(
        [{"question": f"Which {i}?", "options": ["one", "two", "three"], "answer": "B",
          "answer_index": 1} for i in range(12)]))


def test_collect_hidden_is_lm_head_input(tiny_hf_untied, tmp_path):
    _write_data(tmp_path)
    model, tok = load_model(tiny_hf_untied, dtype=torch.float32)
    hs = fidelity_data.collect_hidden(model, tok, "gsm8k", tmp_path, positions=50)
    assert hs.h.shape == (50, tiny_models.HIDDEN)
    assert bool(hs.is_answer.any()) and not bool(hs.is_answer.all())
    ids, start = fidelity_data.encode(tok, next(fidelity_data.conversations("gsm8k", tmp_path)))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]         # [L, V]
    first = hs.item == 0
    n0 = int(first.sum())
    torch.testing.assert_close(lm_head_of(model)(hs.h[first]), logits[len(ids) - 1 - n0:len(ids) - 1])
    assert hs.next_ids[first].tolist() == ids[len(ids) - n0:]
    assert hs.is_answer[first].tolist() == [j >= start for j in range(len(ids) - n0, len(ids))]
    capped = fidelity_data.collect_hidden(model, tok, "gsm8k", tmp_path, positions=50, per_item=5)
    assert capped.h.shape[0] == 50 and int(torch.bincount(capped.item).max()) <= 5
    assert int(capped.item.max()) > int(hs.item.max())


def test_main_end_to_end_and_cache(tiny_hf_untied, tmp_path, capsys):
    _write_data(tmp_path)
    out = tmp_path / "res" / "fidelity.json"
    argv = ["--model", str(tiny_hf_untied), "--tokens", "40", "--probes", "2", "18",
            "--clusterings", "2:1", "--data-dir", str(tmp_path), "--dtype", "float32",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert fidelity.main(argv) == 0
    res = json.loads(out.read_text())
    assert {r["dataset"] for r in res["rows"]} == {"gsm8k", "ifeval", "mmlu_pro"}
    full = [r for r in res["rows"] if r["probes"] == 18]
    assert all(r["top1_agreement"] == 1.0 and r["tv_t1"] == 0.0 for r in full)
    assert res["builds"] and "build_seconds" in res["builds"][0]["params"]
    capsys.readouterr()
    assert fidelity.main(argv) == 0                                     # second run: all cached
    printed = capsys.readouterr().out
    assert "loaded" not in printed and "cached in" in printed


def test_given_assets_are_scored_with_their_stored_centroids(tiny_hf_untied, tmp_path, capsys):
    from dataclasses import replace

    from fh_compile.assets import FlashHeadAssets

    _write_data(tmp_path)
    common = ["--model", str(tiny_hf_untied), "--tokens", "40", "--probes", "2",
              "--data-dir", str(tmp_path), "--dtype", "float32",
              "--cache-dir", str(tmp_path / "cache")]
    assert fidelity.main(common + ["--clusterings", "2:1", "--centroid-modes", "mean",
                                   "--out", str(tmp_path / "built.json")]) == 0
    built = json.loads((tmp_path / "built.json").read_text())["rows"]
    folder = next((tmp_path / "cache").glob("assets-*"))
    a = FlashHeadAssets.load(folder)
    # Negated centroids probe the clusters least like h: the stored centroids must be the ones
    # scored, so agreement falls.
    replace(a, centroids=-centroids_for(a.weight.float(), a.offsets, "mean")).save(
        tmp_path / "negated")
    out = tmp_path / "given.json"
    assert fidelity.main(common + ["--assets", str(tmp_path / "negated"), "--out", str(out)]) == 0
    given = json.loads(out.read_text())["rows"]
    assert {r["centroid_mode"] for r in given} == {"stored"}
    mean_top1 = {r["dataset"]: r["top1_agreement"] for r in built if r["positions_subset"] == "all"}
    for r in given:
        if r["positions_subset"] == "all":
            assert r["top1_agreement"] < mean_top1[r["dataset"]], (r, mean_top1)
    # Both folders in one run: the same rows as one folder per run.
    both = tmp_path / "both.json"
    assert fidelity.main(common + ["--assets", str(folder), str(tmp_path / "negated"),
                                   "--out", str(both)]) == 0
    rows = json.loads(both.read_text())["rows"]
    assert {r["clustering"] for r in rows} == {f"assets:{folder.name}", "assets:negated"}
    strip = lambda r: {k: v for k, v in r.items() if k != "clustering"}  # noqa: E731
    assert [strip(r) for r in rows if r["clustering"] == "assets:negated"] == [strip(r) for r in given]
    with pytest.raises(ValueError, match="'stored' scores the centroids saved in --assets"):
        fidelity.main(common + ["--centroid-modes", "stored", "--out", str(out)])
    capsys.readouterr()


def test_eos_recall_with_and_without_always_ids(head_and_h):
    """eos recall == brute force: FlashHead's top-1 (reference op) at the positions whose dense
    argmax is an always id, and the argmax over probed tokens UNION always ids."""
    W, h, assets = head_and_h
    dense = h.float() @ W.float().t()                                   # [N, V]
    top1 = dense.argmax(1)
    always = top1.unique()[:4]                                          # ids that do win somewhere
    probes = (1, 2)
    (st,) = position_stats(h, W, [HeadClusters.from_assets(assets)], probes, TEMPS)
    rows = summarize(st, W.shape[0], 16, always)
    is_eos = torch.isin(top1, always)
    for P, row in zip(probes, rows):
        ids, _ = flashhead_reference(h, assets.centroids, assets.weight, assets.offsets,
                                     assets.token_ids, P, 16, k=1)
        assert row["eos_positions"] == int(is_eos.sum()) > 0
        recall = float((ids[is_eos, 0] == top1[is_eos]).float().mean())
        assert row["eos_top1_recall"] == pytest.approx(recall)
        sel = (h.float() @ assets.centroids.float().t()).topk(P, dim=1).indices
        cand = torch.zeros_like(dense, dtype=torch.bool)
        cand[:, always] = True
        for n in range(h.shape[0]):
            for k in sel[n].tolist():
                cand[n, assets.token_ids[assets.offsets[k]:assets.offsets[k + 1]]] = True
        fh_top1 = dense.masked_fill(~cand, float("-inf")).argmax(1)
        agree = fh_top1 == top1
        assert row["eos_top1_recall_always"] == pytest.approx(float(agree[is_eos].float().mean()))
        assert row["top1_agreement_always"] == pytest.approx(float(agree.float().mean()))
        assert row["top1_agreement_always"] >= row["top1_agreement"]
    assert rows[0]["eos_top1_recall"] < 1.0 and rows[0]["eos_top1_recall_always"] == 1.0
    assert "eos_positions" not in summarize(st, W.shape[0], 16)[0]


def test_end_of_turn_positions_are_kept_under_the_cap(tiny_hf_untied, tmp_path):
    _write_data(tmp_path)
    model, tok = load_model(tiny_hf_untied, dtype=torch.float32)
    always = fidelity_data.end_of_turn_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in always
    hs = fidelity_data.collect_hidden(model, tok, "gsm8k", tmp_path, positions=60, per_item=4)
    assert hs.always_ids.tolist() == always
    convs = fidelity_data.conversations("gsm8k", tmp_path)
    for i in range(int(hs.item.max())):                                 # the last item may be cut
        ids, _ = fidelity_data.encode(tok, next(convs))
        n_eot = sum(t in always for t in ids[-60:])                     # after the shared prefix
        kept = hs.next_ids[hs.item == i]
        assert int(torch.isin(kept, hs.always_ids).sum()) == min(n_eot, 4) > 0


def test_plain_prompt_format(tiny_hf_untied, tmp_path):
    _write_data(tmp_path)
    model, tok = load_model(tiny_hf_untied, dtype=torch.float32)
    msgs = next(fidelity_data.conversations("mmlu_pro", tmp_path))
    ids, start = fidelity_data.encode(tok, msgs, "plain")
    assert tok.decode(ids) == msgs[0]["content"] + "\n\n" + msgs[1]["content"]
    assert tok.decode(ids[start:]) == msgs[1]["content"]
    hs = fidelity_data.collect_hidden(model, tok, "mmlu_pro", tmp_path, positions=200,
                                      prompt_format="plain")
    assert hs.h.shape[0] == 200 and bool(hs.is_answer.any()) and not bool(hs.is_answer.all())
    with pytest.raises(ValueError, match="prompt_format"):
        fidelity_data.encode(tok, msgs, "raw")
