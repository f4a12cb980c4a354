"""Start a dsxfer training run under any launcher: deepspeed, torchrun, srun or plain python.

    deepspeed launchers/train.py --deepspeed ds_configs/zero3.json --config configs/xquad_fewshot.yaml
    torchrun --nproc_per_node 8 launchers/train.py --deepspeed ds_configs/zero2.json --config configs/mlqa_fewshot.yaml
    srun --ntasks-per-node 8 python launchers/train.py --config configs/xquad_fewshot.yaml train.lr=1e-3
    python launchers/train.py --config configs/demo.yaml train.max_steps=10        # one process

Rank discovery: deepspeed and torchrun set RANK / LOCAL_RANK / WORLD_SIZE; under srun they are
mapped from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS; plain python makes a one-process world.
Trailing arguments of the form section.key=value override the config file.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="dsxfer YAML config (configs/*.yaml); defaults apply when left out")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (ds_configs/zero*.json); overrides deepspeed.config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used otherwise")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-3 data.k_shot=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from dsxfer.training import engine
    from dsxfer.errors import DsxferError

    engine.init_process_env()  # before torch.distributed starts: maps SLURM_* when srun started us
    try:
        from dsxfer.config import load_config
        from dsxfer.training.train import train

        overrides = list(args.overrides)
        if args.deepspeed:
            overrides.append(f"deepspeed.config={args.deepspeed}")
        cfg = load_config(args.config, overrides)
        train(cfg, quiet=not sys.stderr.isatty())
    except DsxferError as e:
        print(f"dsxfer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
