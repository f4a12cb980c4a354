"""Where the time of one dsxfer training step goes: torch.profiler over one optimizer step.

    python bench/profile_step.py --method lora                 # embedded default, the bench's job
    python bench/profile_step.py --method prefix_topk_cached   # top-4 prefixes on the activation cache
    python bench/profile_step.py --smoke                       # tiny random model: checks the script

The job is bench/cpu_train.py's (same config overrides, same questions): the model and data are built
as `dsxfer train` builds them, the DeepSpeed engine is the one training uses, --warmup steps run
untimed, then the first warm-up batch again as one optimizer step under the profiler (so with
prefix_topk_cached its rows come from the activation cache, as in every epoch after the first). It prints the
operators by self CPU time and the step's split into forward / backward / optimizer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_train  # noqa: E402  (the benchmark's job definition)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora", choices=cpu_train.METHODS)
    p.add_argument("--questions", type=int, default=60)
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the profiled one")
    p.add_argument("--rows", type=int, default=15, help="operators shown")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 8 questions")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from dsxfer.config import load_config
    from dsxfer.method.model import build_transfer_model
    from dsxfer.training import engine as eng
    from dsxfer.training.train import DataOrder, build_train_data

    work = Path(tempfile.mkdtemp(prefix="dsxfer-profile-"))
    if args.smoke:
        args.questions, args.max_length, args.stride, args.batch = 8, 96, 16, 2
        model_path = str(cpu_train.smoke_model(work / "tiny-model"))
    else:
        from dsxfer.method.embedded import embedded_model_path

        model_path = str(embedded_model_path())
    questions = work / "questions.json"
    cpu_train.write_questions(questions, args.questions)
    spec = {"max_length": args.max_length, "stride": args.stride, "questions_file": str(questions), "warmup_steps": args.warmup,
            "steps": 1, "lr": 3e-3, "batch": args.batch, "embedded": not args.smoke, "model_path": model_path,
            "work_dir": str(work)}
    cfg = load_config(None, cpu_train.dsxfer_overrides(spec, args.method, work / "run"))
    eng.init_distributed()
    ds = eng.build_ds_config(cfg, 1)
    model = build_transfer_model(cfg)
    data, _ = build_train_data(cfg, model, model.tokenizer)
    engine, _, _ = eng.initialize(model, cfg, ds)
    engine.train()
    order = DataOrder(data.task.n, cfg.train.seed)

    def step():
        with record_function("batch"):
            batch = data.task.make(order.next(args.batch, 0, 1))
        with record_function("forward"):
            out = engine(batch)
        with record_function("backward"):
            engine.backward(out["loss"])
        with record_function("optimizer"):
            engine.step()

    for _ in range(args.warmup):
        step()
    order = DataOrder(data.task.n, cfg.train.seed)  # the profiled step repeats the first warm-up batch (cached rows)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - t0
    averages = prof.key_averages()
    print(f"method {args.method}, batch {args.batch} x {args.max_length}, torch threads {torch.get_num_threads()}; "
          f"one step {wall:.2f} s under the profiler")
    for name in ("batch", "forward", "backward", "optimizer"):
        hit = [e for e in averages if e.key == name]
        if hit:
            print(f"  {name:9s} {hit[0].cpu_time_total / 1e6:7.3f} s")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
