"""`dspark pretrain --config FILE.yaml [section.key=value ...]`: train a Qwen3 target from scratch.

Sections model/data/optim/train of `dspark.pipeline.pretrain.PretrainConfig` (unknown keys rejected). A run
restarted with the same train.output_dir resumes from its latest checkpoint; a second run into the same
train.output_dir while one is running is refused at once. The result, OUTPUT_DIR/model,
is an HF folder that transformers and `dspark generate --model` load.
"""

from __future__ import annotations

from dspark.cli import print_json


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a Qwen3-architecture target on the corpus (dspark data corpus)")
    p.add_argument("--config", default=None, help="YAML config (sections model/data/optim/train)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(handler=run_pretrain)


def run_pretrain(args) -> int:
    from dspark.training.checkpoints import output_lock
    from dspark.pipeline.pretrain import Pretrainer, load_pretrain_config

    config = load_pretrain_config(args.config, args.overrides)  # device resolved, output_dir checked
    with output_lock(config.train.output_dir, "train.output_dir"):
        _, summary = Pretrainer(config).fit()
    if args.json:
        print_json(summary)
    else:
        print(f"model: {summary['model']}  steps: {summary['steps']}  held-out loss: "
              f"{summary['heldout_loss_nats']:.3f} nats/token (perplexity {summary['heldout_perplexity']:.1f})")
    return 0
