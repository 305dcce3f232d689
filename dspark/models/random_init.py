"""Build a randomly initialised model folder (config.json, model.safetensors, tokenizer) that both
transformers and dspark load. Used by `dspark demo` until the built-in trained model exists, by the
tests, and by the benchmarks (e.g. a Qwen3-0.6B-shaped model for bandwidth measurements).

The tokenizer is byte-level (256 byte tokens + chat special tokens, no merges), so it needs no
training data and is identical on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.models.checkpoint import save_folder_atomically, save_safetensors
from dspark.models.config import parse_decoder_config
from dspark.models.decoder import DecoderModel

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRESETS: dict[str, dict] = {
    # Small enough for CPU tests and the demo.
    "tiny-qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=320, hidden_size=128,
        intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False,
    ),
    # Qwen3-0.6B's shapes (random weights), for bandwidth benchmarks on a GPU.
    "qwen3-0.6b-shape": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, attention_bias=False,
    ),
}


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` over the 256 byte symbols plus SPECIAL_TOKENS (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def write_tokenizer(folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(folder))


def build_random_model(
    folder: str | Path,
    preset: str = "tiny-qwen3",
    *,
    seed: int = 0,
    init_std: float = 0.02,
    with_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a random-weight model folder (atomically) and return its path.

    Weights ~ N(0, init_std²) (HF's initialiser), norms = 1. `overrides` replace config fields.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    hf = dict(PRESETS[preset], **overrides)
    if with_tokenizer:
        hf.setdefault("eos_token_id", SPECIAL_TOKENS.index("<|im_end|>") + 256)
        hf.setdefault("bos_token_id", None)
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    config = parse_decoder_config(hf, where=f"preset {preset}")
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DecoderModel(config)
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=dtype)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(param.shape, dtype=dtype)
        else:
            state[name] = (torch.randn(param.shape, generator=generator) * init_std).to(dtype)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_safetensors(state, tmp / "model.safetensors")
        if with_tokenizer:
            write_tokenizer(tmp)
            eos = hf.get("eos_token_id")
            (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")

    folder = Path(folder)
    save_folder_atomically(folder, write)
    return folder
