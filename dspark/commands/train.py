"""`dspark train --config FILE.yaml [section.key=value ...]`: train a drafter against a frozen target.

Single process: `dspark train --config c.yaml`. Several processes / GPUs / nodes: launch the same command
with torchrun (`torchrun --nproc_per_node N -m dspark train --config c.yaml`, plus `--nnodes`/rendezvous
options across nodes); the process group is set up from torchrun's environment: NCCL when `train.device`
resolves to CUDA (each process on cuda:LOCAL_RANK), gloo on CPU.
`train.parallel=ddp` (default) keeps a replica per process; `train.parallel=fsdp` shards the drafter's
parameters, gradients and optimizer state (large drafters). A run restarted with the same output_dir
resumes from its latest checkpoint, whatever the number of processes or mode that wrote it. The process
writing the output (RANK 0) holds a lock on train.output_dir for the whole run: a second run into the same
folder is refused at once.
"""

from __future__ import annotations

import gc
import json
import os

import torch
import torch.distributed as dist

from dspark.cli import print_json


def register(sub) -> None:
    p = sub.add_parser("train", help="train a drafter (DSpark, DFlash) against a frozen target")
    p.add_argument("--config", default=None, help="YAML config (sections model/data/optim/train; optional `preset`)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-4 train.max_steps=100")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(handler=run_train)


def run_train(args) -> int:
    from dspark.devices import resolve_device
    from dspark.training.checkpoints import output_lock
    from dspark.training.config import load_train_config
    from dspark.training.data_loading import load_samples
    from dspark.training.trainer import Trainer

    config = load_train_config(args.config, args.overrides)  # device resolved, output_dir checked
    with output_lock(config.train.output_dir, "train.output_dir"):  # RANK 0 only under torchrun
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed:
            backend = "nccl" if torch.device(config.train.device).type == "cuda" else "gloo"
            if backend == "nccl":  # one GPU per process: cuda:LOCAL_RANK, refused if this machine lacks it
                device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}", "train.device")
                torch.cuda.set_device(device)
                config.train.device = str(device)
            dist.init_process_group(backend=backend)
        try:
            samples = load_samples(config.data.train, config.model.target, config.data.max_length, config.model.drafter)
            trainer = Trainer(config, samples)
            final = trainer.fit()
            rank, steps = trainer.rank, trainer.step
            if distributed:
                dist.barrier()  # every process past its last collective
            # The FSDP/DDP modules hold the process group and pending gloo work inside reference cycles;
            # freed here, while the interpreter is whole, not at its finalisation (where gloo's worker
            # threads then abort the process, "terminate called without an active exception").
            del trainer
            gc.collect()
            if rank == 0:
                summary = {"checkpoint": str(final), "drafter": str(final / "drafter"), "steps": steps}
                if args.json:
                    print_json(summary)
                else:
                    print(json.dumps(summary))
        finally:
            if distributed:
                dist.destroy_process_group()
    return 0
