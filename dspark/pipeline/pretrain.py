"""`dspark pretrain`: train a Qwen3-architecture target from scratch on the corpus (dspark.pipeline.corpus).

Read top to bottom: config → token stream → model → AdamW loop (warmup + cosine, clipping) → atomic
checkpoints with automatic resume (`dspark.training.checkpoints`: output_dir/checkpoints/step_N, `latest`,
`train.keep_last`) → held-out loss → an HF folder (config.json, model.safetensors,
tokenizer, generation_config.json, pretrain_report.json) that transformers' `Qwen3ForCausalLM` and
dspark's TargetRunner both load.

Training text. Every training file is cut into windows of whole lines. Half of the windows
(`data.chat_fraction`) are rendered as a chat exchange — user: "Continue this Python code:" (or the
documentation variant) + the window's first 8–24 lines; assistant: the rest of the window + `<|im_end|>`
— so the model answers the instruction-style prompts that `dspark demo`, `dspark eval` and the
drafter-training data use. The other half is raw text. Windows are joined with `<|endoftext|>` and cut into
rows of `data.seq_len` tokens; row order is a fixed permutation per seed, so the batch at step s is known
without any saved RNG state and a resumed run sees exactly the data an uninterrupted one would.

The forward/backward pass is transformers' Qwen3ForCausalLM (dense causal SDPA), so the exported weights use
HF names by construction. The loss is mean next-token cross-entropy in nats; held-out loss is the same on the
held-out files (raw windows), reported with its perplexity.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.config import apply_overrides, from_dict, load_yaml, to_dict
from dspark.devices import resolve_device
from dspark.errors import CheckpointError, ConfigError
from dspark.files import check_output_folder
from dspark.models.checkpoint import save_folder_atomically, save_safetensors
from dspark.training.checkpoints import CheckpointFolder, stderr_note
from dspark.pipeline.corpus import CODE_INSTRUCTION, PROSE_INSTRUCTION, Document, read_documents


@dataclass
class PretrainModelSection:
    vocab_size: int = 4096  # must equal the tokenizer's
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class PretrainDataSection:
    corpus: str = ""  # folder written by `dspark data corpus`
    tokenizer: str = ""  # folder written by `dspark data tokenizer`
    seq_len: int = 256
    chat_fraction: float = 0.5
    window_lines: list[int] = field(default_factory=lambda: [24, 64])  # min, max lines per window
    heldout_tokens: int = 65536  # held-out tokens scored for the report


@dataclass
class PretrainOptimSection:
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0


@dataclass
class PretrainTrainSection:
    output_dir: str = "runs/pretrain"
    max_steps: int = 1200
    batch_size: int = 16  # rows of seq_len tokens per step
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    checkpoint_every: int = 100
    keep_last: int | None = None  # checkpoints/step_N kept (the newest); None = all
    log_every: int = 10
    eval_every: int = 200
    export_dtype: str = "bfloat16"  # dtype of the exported model.safetensors
    progress: bool = True


@dataclass
class PretrainConfig:
    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    optim: PretrainOptimSection = field(default_factory=PretrainOptimSection)
    train: PretrainTrainSection = field(default_factory=PretrainTrainSection)


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    config = from_dict(PretrainConfig, data)
    m, d, o, t = config.model, config.data, config.optim, config.train
    checks = [
        (bool(d.corpus), "data.corpus: the corpus folder is required (`dspark data corpus`)"),
        (bool(d.tokenizer), "data.tokenizer: the tokenizer folder is required (`dspark data tokenizer`)"),
        (m.num_attention_heads % m.num_key_value_heads == 0, "model.num_attention_heads must be a multiple of num_key_value_heads"),
        (d.seq_len >= 16 and d.seq_len <= m.max_position_embeddings, "data.seq_len must be in [16, model.max_position_embeddings]"),
        (0 <= d.chat_fraction <= 1, "data.chat_fraction must be in [0, 1]"),
        (len(d.window_lines) == 2 and 8 < d.window_lines[0] <= d.window_lines[1], "data.window_lines must be [min, max] with 8 < min ≤ max"),
        (o.lr > 0 and 0 <= o.warmup_ratio < 1 and 0 <= o.min_lr_ratio <= 1, "optim.lr > 0, warmup_ratio in [0, 1), min_lr_ratio in [0, 1]"),
        (t.max_steps >= 1 and t.batch_size >= 1, "train.max_steps and train.batch_size must be ≥ 1"),
        (t.export_dtype in ("float32", "bfloat16"), "train.export_dtype must be float32 or bfloat16"),
        (t.keep_last is None or t.keep_last >= 1, "train.keep_last must be ≥ 1 (or null: keep every checkpoint)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    t.device = str(resolve_device(t.device, "train.device"))
    check_output_folder(t.output_dir, "train.output_dir")
    return config


def render_windows(doc: Document, rng: random.Random, config: PretrainDataSection, tokenizer) -> list[list[int]]:
    """Token ids of each window of `doc`: raw text, or a chat exchange (see the module docstring)."""
    lines = doc.text.splitlines(keepends=True)
    out, start = [], 0
    lo, hi = config.window_lines
    while start < len(lines):
        window = lines[start:start + rng.randint(lo, hi)]
        start += len(window)
        split = rng.randint(8, min(24, max(8, len(window) - 4)))
        if rng.random() < config.chat_fraction and len(window) > split + 2:
            instruction = CODE_INSTRUCTION if doc.source == "stdlib" else PROSE_INSTRUCTION
            prompt = f"{instruction}\n\n{''.join(window[:split]).rstrip(chr(10))}"
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False,
            )
            ids = list(ids) + tokenizer("".join(window[split:]).rstrip("\n"))["input_ids"] + [tokenizer.eos_token_id]
        else:
            ids = tokenizer("".join(window))["input_ids"]
        out.append(ids)
    return out


def token_rows(documents: list[Document], tokenizer, config: PretrainDataSection, seed: int, chat: bool = True) -> torch.Tensor:
    """[num_rows, seq_len] int64: the rendered windows joined by `<|endoftext|>` and cut into rows."""
    rng = random.Random(seed)
    data = PretrainDataSection(**{**config.__dict__, "chat_fraction": config.chat_fraction if chat else 0.0})
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for doc in documents:
        for ids in render_windows(doc, rng, data, tokenizer):
            stream.extend(ids)
            stream.append(separator)
    usable = len(stream) // config.seq_len * config.seq_len
    if usable == 0:
        raise ConfigError(f"the corpus has fewer than seq_len={config.seq_len} tokens")
    return torch.tensor(stream[:usable], dtype=torch.int64).view(-1, config.seq_len)


def hf_config_dict(m: PretrainModelSection, tokenizer) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim,
        "max_position_embeddings": m.max_position_embeddings, "rope_theta": m.rope_theta,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": m.tie_word_embeddings, "attention_bias": False,
        "hidden_act": "silu", "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "torch_dtype": "float32",
    }


def lr_at(step: int, config: PretrainConfig) -> float:
    o, total = config.optim, config.train.max_steps
    warmup = max(1, int(o.warmup_ratio * total))
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


CHECKPOINT_FILES = ("state.safetensors", "state.json")  # what a complete pretraining checkpoint holds


class Pretrainer:
    def __init__(self, config: PretrainConfig):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from dspark.models.tokenizer import load_tokenizer

        self.config = config
        d, t = config.data, config.train
        self.tokenizer = load_tokenizer(d.tokenizer)
        if len(self.tokenizer) != config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size} but the tokenizer has {len(self.tokenizer)} tokens")
        corpus = Path(d.corpus)
        self.train_rows = token_rows(read_documents(corpus / "train.jsonl"), self.tokenizer, d, t.seed)
        heldout = token_rows(read_documents(corpus / "heldout.jsonl"), self.tokenizer, d, t.seed, chat=False)
        self.heldout_rows = heldout[: max(1, d.heldout_tokens // d.seq_len)]
        self.hf_config = hf_config_dict(config.model, self.tokenizer)
        torch.manual_seed(t.seed)
        self.model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in self.hf_config.items() if k != "architectures"}))
        self.device = resolve_device(t.device, "train.device")
        self.model.to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), fused=False, foreach=True,
        )
        self.output_dir = Path(t.output_dir)
        self.checkpoints = CheckpointFolder(self.output_dir / "checkpoints", CHECKPOINT_FILES, t.keep_last,
                                            stderr_note("dspark pretrain"))
        self.step = 0
        self.history: list[dict] = []

    def batch(self, step: int) -> torch.Tensor:
        """Rows of step `step`: a fixed permutation per epoch (seeded by seed + epoch)."""
        t = self.config.train
        per_epoch = len(self.train_rows) // t.batch_size
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(t.seed + epoch))
        return self.train_rows[order[index * t.batch_size:(index + 1) * t.batch_size]].to(self.device)

    def train_step(self) -> dict:
        self.model.train()
        rows = self.batch(self.step)
        loss = self.model(input_ids=rows, labels=rows).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(norm)}

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean next-token cross-entropy (nats) over the held-out rows."""
        self.model.eval()
        total, count = 0.0, 0
        for chunk in self.heldout_rows.split(self.config.train.batch_size):
            chunk = chunk.to(self.device)
            n = chunk.numel() - chunk.shape[0]
            total += float(self.model(input_ids=chunk, labels=chunk).loss) * n
            count += n
        return total / count

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                 if not (k == "lm_head.weight" and self.config.model.tie_word_embeddings)}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                s = self.optimizer.state.get(p)
                if s:
                    state[f"adam.exp_avg.{names[id(p)]}"] = s["exp_avg"].cpu().contiguous()
                    state[f"adam.exp_avg_sq.{names[id(p)]}"] = s["exp_avg_sq"].cpu().contiguous()
                    state[f"adam.step.{names[id(p)]}"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
        return state

    def save_checkpoint(self) -> Path:
        """`output_dir/checkpoints/step_<N>` (model and AdamW state, history), then `latest` (atomically)."""
        state = self._state()

        def write(tmp: Path) -> None:
            save_safetensors(state, tmp / "state.safetensors")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "history": self.history}) + "\n")

        return self.checkpoints.save(self.step, write)

    def resume(self) -> bool:
        """Continue from the checkpoint `CheckpointFolder.resume_point` picks. Returns whether one was loaded."""
        folder = self.checkpoints.resume_point()
        if folder is None:
            return False
        from safetensors.torch import load_file

        try:
            state = load_file(str(folder / "state.safetensors"))
            meta = json.loads((folder / "state.json").read_text())
        except Exception as exc:
            raise CheckpointError(f"{folder}: unreadable pretraining checkpoint ({type(exc).__name__}: {exc})") from None
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if unexpected or [k for k in missing if not (k == "lm_head.weight" and self.config.model.tie_word_embeddings)]:
            raise CheckpointError(f"{folder}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
        for name, p in self.model.named_parameters():
            if f"adam.exp_avg.{name}" in state:
                self.optimizer.state[p] = {
                    "step": state[f"adam.step.{name}"].reshape(()).clone(),
                    "exp_avg": state[f"adam.exp_avg.{name}"].to(p.device),
                    "exp_avg_sq": state[f"adam.exp_avg_sq.{name}"].to(p.device),
                }
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        return True

    def export(self, heldout_loss: float, elapsed_s: float) -> Path:
        """Write the HF folder `output_dir/model` (atomically)."""
        from transformers import AutoTokenizer

        dtype = getattr(torch, self.config.train.export_dtype)
        hf = dict(self.hf_config, torch_dtype=self.config.train.export_dtype)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.model.state_dict().items()}
        if self.config.model.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        report = {
            "steps": self.step, "tokens_seen": self.step * self.config.train.batch_size * self.config.data.seq_len,
            "train_tokens_available": self.train_rows.numel(), "heldout_loss_nats": heldout_loss,
            "heldout_perplexity": math.exp(heldout_loss), "heldout_tokens": self.heldout_rows.numel(),
            "parameters": sum(p.numel() for p in self.model.parameters()), "elapsed_s": elapsed_s,
            "history": self.history, "config": to_dict(self.config),
        }
        tokenizer = AutoTokenizer.from_pretrained(self.config.data.tokenizer, local_files_only=True)

        def write(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            save_safetensors(state, tmp / "model.safetensors")
            tokenizer.save_pretrained(str(tmp))
            (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": hf["eos_token_id"]}, indent=2) + "\n")
            (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")

        folder = self.output_dir / "model"
        save_folder_atomically(folder, write)
        return folder

    def fit(self) -> tuple[Path, dict]:
        from tqdm import tqdm

        t = self.config.train
        self.checkpoints.remove_stale()
        resumed = self.resume()
        started = time.perf_counter()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not t.progress, desc="pretrain", unit="step")
        while self.step < t.max_steps:
            stats = self.train_step()
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
                self.history.append(stats)
            if self.step % t.eval_every == 0:
                self.history.append({"step": self.step, "heldout_loss": self.heldout_loss()})
            if self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                self.save_checkpoint()
        bar.close()
        heldout = self.heldout_loss()
        self.save_checkpoint()
        folder = self.export(heldout, time.perf_counter() - started)
        return folder, {"model": str(folder), "steps": self.step, "resumed": resumed, "heldout_loss_nats": heldout,
                        "heldout_perplexity": math.exp(heldout)}
