"""Tiny random Qwen2 checkpoints for CPU tests: Hugging Face folders (tied / untied) and a GGUF file.

The vocabulary is byte-level BPE (256 byte symbols, a few merges, three chat special tokens), so
the same token list serves the HF tokenizer and the GGUF's tokenizer.ggml.* metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN = 64          # a multiple of 32 so output.weight can be stored Q8_0 in the GGUF
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
           ("r", "e"), ("Ġ", "a"), ("Ġ", "s"), ("e", "n"), ("a", "t"), ("o", "r"), ("e", "s"),
           ("Ġ", "w"), ("i", "s")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vocab_tokens() -> list[str]:
    """Token strings in id order: 256 byte symbols, merge results, then the special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    tokens += [a + b for a, b in _MERGES]
    return tokens + SPECIALS                                           # V = 275, not a multiple of 16


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = vocab_tokens()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens[:-len(SPECIALS)])}, merges=_MERGES)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(len(tokens) - 3, len(tokens)))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(tied: bool):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(vocab_tokens()), hidden_size=HIDDEN, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=tied,
                       eos_token_id=len(vocab_tokens()) - 1, bos_token_id=None)


def tiny_model(tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tied), dtype=torch.float32)
    with torch.no_grad():  # HF's init is tiny (std 0.02); give the logits some spread
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_hf_folder(folder: Path, tied: bool, seed: int = 0) -> Path:
    model = tiny_model(tied, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_gguf(path: Path, seed: int = 1) -> tuple[Path, torch.Tensor]:
    """Write an untied tiny Qwen2 as GGUF (F32 tensors, output.weight Q8_0).

    Returns (path, the dequantized output.weight [V, D] fp32 in vocabulary order).
    """
    import gguf

    model = tiny_model(tied=False, seed=seed)
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = vocab_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges([f"{a} {b}" for a, b in _MERGES])
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 3)
    w.add_chat_template(CHAT_TEMPLATE)
    head = None
    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        arr = t.detach().float().numpy()
        if name == "output.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            head = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert head is not None
    return path, head
