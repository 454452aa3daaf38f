"""RESULTS.md rendering from hand-made result files (and from scored generations)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import results_page
from benchmarks.eval.report import merge_results, score_rows, table


def _gsm8k_rows() -> list[dict]:
    header = {"task": "gsm8k", "model": "/m/tiny.gguf", "model_name": "tiny.gguf",
              "device": "NVIDIA H100 80GB HBM3", "date": "2026-01-02T03:04:05+00:00",
              "command": "python -m benchmarks.tasks --model /m/tiny.gguf", "dtype": "bfloat16",
              "subset": "first 3 of 1319 test items", "max_new_tokens": 256,
              "flashhead_config": {"probes": 256, "k": 64}}
    outputs = {"dense": ["The answer is 18.", "The answer is 3.", "so 5"],
               "flashhead": ["The answer is 18.", "The answer is 4.", "The answer is 5."]}
    gens = [{"head": h, "id": str(i), "item": {"answer": f"#### {a}"}, "generation": g,
             "hit_max": False, "n_new_tokens": 10}
            for h, outs in outputs.items() for i, (g, a) in enumerate(zip(outs, (18, 3, 5)))]
    return score_rows(header, gens)


def test_score_rows_and_merge(tmp_path: Path) -> None:
    rows = _gsm8k_rows()
    em = next(r for r in rows if r["metric"] == "exact_match")
    assert em["dense"]["correct"] == 3 and em["flashhead"]["correct"] == 2
    assert (em["paired"]["a_only"], em["paired"]["b_only"]) == (1, 0)
    strict = next(r for r in rows if r["metric"] == "strict_match")
    assert (strict["paired"]["a_only"], strict["paired"]["b_only"]) == (1, 1)
    assert em["device"] == "NVIDIA H100 80GB HBM3" and em["headline"] and not strict["headline"]
    assert "McNemar" in table(rows)
    out = tmp_path / "tasks.json"
    merge_results(out, rows)
    other = [{**rows[0], "model": "/m/other.gguf"}]
    merged = merge_results(out, other)
    assert len(merged) == 3
    assert len(merge_results(out, rows)) == 3          # same key: replaced, not duplicated


def test_results_page(tmp_path: Path) -> None:
    res = tmp_path / "results"
    res.mkdir()
    merge_results(res / "tasks.json", _gsm8k_rows())
    (res / "fidelity.json").write_text(json.dumps({
        "model": "tiny.gguf", "vocab_size": 151936, "date": "2026-01-01T00:00:00",
        "command": "python -m benchmarks.fidelity", "cpu": "x86_64",
        "rows": [{"dataset": "gsm8k", "positions_subset": s, "probes": p,
                  "top1_agreement": a, "top5_recall": a} for s in ("all", "answer")
                 for p, a in ((64, 0.97), (256, 0.995))]}))
    (res / "head_latency.json").write_text(json.dumps({"config": {}, "rows": [
        {"gpu": "NVIDIA H100", "date": "2026-01-01", "B": b, "probes": p, "method": m,
         "ms": ms, "speedup": sp, "V": 151936}
        for b, p, m, ms, sp in ((1, None, "dense", 0.1, 1.0), (1, 256, "triton", 0.02, 5.0),
                                (8, 256, "triton", 0.04, 2.5))]}))
    out = tmp_path / "bench" / "RESULTS.md"
    assert results_page.main(["--results", str(res), "--out", str(out)]) == 0
    page = out.read_text()
    assert "Not run yet (no" in page and "tpot.json" in page             # missing file
    (res / "tpot.json").write_text(json.dumps({
        "meta": {"gpu": "NVIDIA H200", "date": "2026-01-03", "model": "m", "dtype": "bf16"},
        "rows": [{"exec": "eager", "head": h, "B": b, "tpot_ms": ms, "raw_ms": [ms]}
                 for h, b, ms in (("dense", 1, 20.0), ("fh-triton", 1, 16.0),
                                  ("dense", 16, 24.0), ("fh-triton", 16, 20.0))]}))
    (res / "export_times.json").write_text(json.dumps({
        "meta": {"gpu": "NVIDIA H200", "date": "2026-01-04", "export_decode_s": 3.5,
                 "aoti_compile_decode_s": 120.0, "aoti_tokens": "passed",
                 "aoti_tokens_detail": "decode.aoti.pt2: 33 greedy tokens identical"},
        "rows": [{"row": r, "B": 1, "tpot_ms": ms, "raw_ms": [ms]}
                 for r, ms in (("eager", 30.0), ("aoti+graph", 2.5))]}))
    (res / "head_latency_real.json").write_text(json.dumps({
        "gpu": "NVIDIA H200", "date": "2026-01-05", "inputs": "real centroids and hidden states",
        "rows": [{"B": 16, "probes": p, "method": "triton", "ms": ms, "union": u}
                 for p, ms, u in ((64, 0.05, 671), (256, 0.08, 2303))]}))
    (res / "tpot_gemma.json").write_text(json.dumps({
        "meta": {"gpu": "NVIDIA H200", "date": "2026-01-06", "copy_gb_per_s": 4236.0},
        "rows": [{"variant": v, "forward": "fast", "attention": "flashhead::decode_attention",
                  "B": 1, "cache_len": 16384, "position": 128, "tpot_ms": ms,
                  "kernels_per_step": k, "floor_ms": 0.05, "gb_per_s": 300.0,
                  "bw_fraction": 0.07} for v, ms, k in (("fast-dense", 0.86, 153),
                                                         ("fast-fh", 0.74, 138))]
                + [{"variant": "hf-dense", "B": 1, "cache_len": 16384, "error": "boom"},
                   {"variant": "hf-dense", "forward": "hf", "attention": "sdpa", "B": 16,
                    "cache_len": 16384, "position": 128, "tpot_ms": 2.0, "mode": "default",
                    "mode_note": "compiled without CUDA graphs"}]}))
    (res / "attention_latency.json").write_text(json.dumps({
        "gpu": "NVIDIA H200", "date": "2026-01-07", "copy_bandwidth_gbps": 4210.0,
        "rows": [{"model": "r1", "B": 1, "capacity": 32768, "fill": 8192, "method": m,
                  "ms": ms, "floor_ms": 0.002} for m, ms in (("sdpa_hf", 0.28), ("triton", 0.026))]}))
    (res / "gemv_sweep.json").write_text(json.dumps({
        "gpu": "NVIDIA H200", "date": "2026-01-08", "copy_gbps": 4225.0,
        "rows": [{"shape": "q/o", "B": 1, "method": m, "ms": ms, "gbps": g, "config": c,
                  "weight_bytes": 4.7e6} for m, ms, g, c in (("cublas", 0.0064, 740.0, None),
                                                             ("triton", 0.0050, 940.0, [1, 8]),
                                                             ("triton", 0.0041, 1141.0, [1, 4]))]}))
    (res / "pdl_chain.json").write_text(json.dumps({
        "meta": {"gpu": "NVIDIA H200", "date": "2026-01-09", "copy_gb_per_s": 4200.0},
        "rows": [{"arch": "r1-1.5b", "B": 1, "launch": launch, "us_per_chain": us,
                  "kernels": 112, "floor_us": 300.0, "same_output": True}
                 for launch, us in (("plain", 1000.0), ("pdl", 800.0))]}))
    assert results_page.main(["--results", str(res), "--out", str(out)]) == 0
    page = out.read_text()
    assert "Not run yet" not in page
    assert "| pdl | 800 |" in page and "| 1.25 |" in page
    assert "| fast-fh | 1 | 16384 | 128 | flashhead::decode_attention | 0.74 | 138 |" in page
    assert "Failed: hf-dense B=1: boom" in page
    assert "hf-dense: compiled without CUDA graphs." in page
    assert "| triton | 0.026 |" in page and "Same in every row: model = r1, B = 1" in page
    assert "| q/o | 1 | 4.7 | 6.4 | 4.1 | 1141 | 1.561 | [1, 4] |" in page
    assert "real model's centroids and hidden states" in page and "| 256 | 0.08 | 2303 |" in page
    assert "- AOTInductor compile of the decode step: 120 s" in page
    assert "greedy tokens: **passed** (decode.aoti.pt2: 33" in page
    assert "| aoti+graph | 2.5 |" in page
    assert "| eager | 1 | 20 | 16 | 1.25 |" in page and "**NVIDIA H200**, 2026-01-03" in page
    assert "| gsm8k | exact_match **(headline)** | 3 |" in page
    assert "NVIDIA H100 80GB HBM3" in page and "2026-01-02T03:04:05" in page
    assert "`python -m benchmarks.tasks --model /m/tiny.gguf`" in page
    assert "| P=64 | P=256 |" in page and "0.995" in page                # fidelity pivot
    assert "Same in every row: V = 151936" in page                      # constant column
    assert "NVIDIA H100" in page and "| triton | 8 | 256 |" in page.replace("  ", " ")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "![" not in page
    else:
        for name in ("tasks", "fidelity", "head_latency", "tpot"):
            assert (out.parent / "figures" / f"{name}.png").is_file()
            assert f"](figures/{name}.png)" in page
