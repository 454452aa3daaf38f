"""The README's Python snippets run as written, and .ci/run runs the README's commands.

Each snippet runs in a fresh Python process (a user's script), in a temporary working folder, with
only these string substitutions (SUBSTITUTIONS below):
  * "path/to/model" -> a model: the quick start gets SmolLM2-135M-Instruct (a real GGUF from
    ../shared/tools/real_model.sh, cached under ~/.cache/fh-models); the Python API a random Qwen2
    with an 8,192-row head (so that probes=256 fits); the export snippets the tiny random Qwen2 of
    tests/tiny_models.py that the test exported;
  * "DIR" -> the folder that `python -m export.run` wrote (here, with --aoti --onnx).
The device is the snippets' own choice ("cuda" if available else "cpu").  The quick start runs
with TORCHDYNAMO_DISABLE=1, so its torch.compile calls run eagerly: compiling SmolLM2 on two CPU
cores takes 80 to 140 s (compiled decoding is tested in tests/fh_compile/test_compile.py).  The
quick start uses the default asset and GGUF caches under ~ (as a user would; built once, reused).
After the snippets, a few lines of test code check what they computed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import real_models

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPETS = {"quick start": "## Quick start", "python api": "## Python API",
            "torch.export": "### torch.export programs", "aoti": "### AOTInductor packages",
            "onnx": "### ONNX"}


def python_snippets() -> dict[str, str]:
    """{name: code} of the first ```python block under each heading of SNIPPETS."""
    text = README.read_text()
    found = {}
    for name, heading in SNIPPETS.items():
        m = re.search(rf"^{re.escape(heading)}\b.*?^```python\n(.*?)^```", text, re.M | re.S)
        assert m is not None, f"README has no ```python block under {heading!r} (tested here)"
        found[name] = m.group(1)
    return found


def substitute(code: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in code, f"the snippet no longer contains {old!r}; update tests/test_readme.py"
        code = code.replace(old, new)
    return code


def run_script(code: str, cwd: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(code)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return proc


def test_ci_runs_the_readme_commands():
    text = README.read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    install = next(b.strip() for b in blocks if "pip install" in b)
    tests = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for marker, command in (("# --- README: Install ---", install),
                            ("# --- README: Tests ---", tests)):
        i = ci.index(marker)
        assert command in ci[i + 1:i + 3], f".ci/run does not run the README's {command!r}"
    assert "-m interpret tests/custom_ops" in tests  # every interpreter test file, new ones too


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return real_models.fetch("smollm2")


def test_quick_start(smollm2, tmp_path):
    code = substitute(python_snippets()["quick start"], {"path/to/model": str(smollm2)})
    check = """
assert out.path == "flashhead", out.path
assert out.new_tokens.shape[1] >= 1 and int(out.num_generated[0]) >= 1
print("CHECK", json.dumps({"generated": int(out.num_generated[0])}))
"""
    proc = run_script(code + "\nimport json\n" + check, tmp_path, timeout=900,
                      TORCHDYNAMO_DISABLE="1")
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("CHECK") and lines[:-1], "the snippet printed no answer"
    assert "FlashHead assets" in proc.stderr, "logging.basicConfig(INFO) shows no progress"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A random Qwen2 whose head has 8,192 rows (the tiny tokenizer uses the first 275)."""
    import torch
    from transformers import AutoModelForCausalLM

    import tiny_models

    folder = tmp_path_factory.mktemp("wide_model")
    config = tiny_models.tiny_config(tied=False)
    config.vocab_size = 8192
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tiny_models.tiny_tokenizer().save_pretrained(folder)
    return folder


def test_python_api(wide_model, tmp_path):
    code = substitute(python_snippets()["python api"], {"path/to/model": str(wide_model)})
    check = """
from pathlib import Path
assert Path("assets/flashhead.json").is_file()
assert out.shape[0] == 1 and out.shape[1] > prompt["input_ids"].shape[1]
assert top.ids.shape == (4, 8) and top.logits.shape == (4, 8)
assert bool((top.logits[:, :-1] >= top.logits[:, 1:]).all())
print("CHECK ok")
"""
    proc = run_script(code + check, tmp_path, timeout=600)
    assert proc.stdout.strip().endswith("CHECK ok")


@pytest.fixture(scope="module")
def exported(tiny_hf_untied, tmp_path_factory) -> Path:
    """`python -m export.run --aoti --onnx` of the tiny model (verified by the snippets below)."""
    out = tmp_path_factory.mktemp("readme_export") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "export.run", "--model", str(tiny_hf_untied), "--out", str(out),
         "--max-seq-len", "128", "--aoti", "--onnx", "--no-verify", "-q"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True,
        timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_export_aoti_onnx(exported, tiny_hf_untied, tmp_path):
    pytest.importorskip("onnxruntime")
    snippets = python_snippets()
    subs = {"DIR": str(exported)}
    code = "\n".join([substitute(snippets["torch.export"],
                                 {**subs, "path/to/model": str(tiny_hf_untied)}),
                      substitute(snippets["aoti"], subs), substitute(snippets["onnx"], subs)])
    check = """
import json
V = json.load(open(f"{d}/manifest.json"))["assets"]["vocab_size"]
exp = torch.cat(tokens, dim=1)                                   # [B, 32] from the .pt2 programs
aoti = torch.cat(aoti_tokens, dim=1)
onnx = np.concatenate(onnx_tokens, axis=1)
assert exp.shape == aoti.shape == onnx.shape == (ids.shape[0], 32), (exp.shape, onnx.shape)
assert bool(((exp >= 0) & (exp < V)).all())
assert head_ids.shape == (B, settings["k"]) and bool((head_ids < V).all())
print("CHECK", json.dumps({"export": exp[0].tolist(), "aoti": aoti[0].tolist(),
                           "onnx": onnx[0].tolist()}))
"""
    proc = run_script(code + check, tmp_path, timeout=600)
    got = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("CHECK "))
    # The same fp32 graph three ways: greedy tokens agree (export.run verifies 8 steps so).
    assert got["aoti"][:8] == got["export"][:8], got
    assert got["onnx"][:8] == got["export"][:8], got
