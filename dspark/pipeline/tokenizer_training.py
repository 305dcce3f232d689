"""Byte-level BPE tokenizer trained with `tokenizers` on the corpus (dspark.pipeline.corpus).

Ids 0–2 are the chat special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (EOS), merges fill the
vocabulary up to `vocab_size - 1`, and the last id is `<|mask|>`: the drafters' mask token (the training
config's default `mask_token_id` is `vocab_size - 1`), a row no text ever produces. The saved folder
(`tokenizer.json`, `tokenizer_config.json` with the ChatML template) loads with
`transformers.AutoTokenizer` and `dspark.models.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from dspark.errors import ConfigError
from dspark.models.random_init import CHAT_TEMPLATE, SPECIAL_TOKENS
from dspark.pipeline.corpus import read_documents

MASK_TOKEN = "<|mask|>"


def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 4096) -> Path:
    """Train on `corpus_dir/train.jsonl` (held-out files excluded) and save to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE (need ≥ 512)")
    documents = read_documents(Path(corpus_dir) / "train.jsonl")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in documents), trainer=trainer, length=len(documents))
    tokenizer.add_special_tokens([MASK_TOKEN])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ConfigError(f"BPE produced {tokenizer.get_vocab_size()} tokens, expected {vocab_size} (corpus too small?)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir
