"""The same training job run by dsxfer and by PEFT + the HF Trainer, side by side on the CPU.

    python bench/cpu_train.py                                     # all four methods, 2 repeats
    python bench/cpu_train.py --questions 120 --max_length 192 --steps 6 --methods lora,prefix_topk
    python bench/cpu_train.py --smoke                              # tiny random model, seconds: checks the script

The job: the embedded default model, the first --questions TyDi QA GoldP English training questions of
the bundled data, windows of --max_length tokens overlapping by --stride, --batch windows per step,
AdamW at --lr with the same linear schedule (LR warm-up over the untimed steps, then linear decay),
gradient clipping at 1.0, --warmup_steps untimed optimizer steps, then --steps timed ones.

Methods (dsxfer config | peer, written with PEFT's and the Trainer's own API):
  lora         LoRA r 8 on query,value, no prompts, no prefixes, no alignment | PEFT LoRA, same r and modules
  prefix_all   prefixes (8, MLP-reparameterised) in all layers | PEFT PrefixTuning (8 virtual tokens, projection 128)
  prefix_topk  prefixes in the top 4 layers, activation cache off | PEFT LoRA (PEFT has no top-k prefix; the issue's
               goal compares to LoRA)
  prefix_topk_cached  the same with the frozen-activation cache on disk (model.activation_cache_dir), filled
               before training by one untimed no-grad pass over the windows, as a grid run finds it when an
               earlier run of the grid computed it (the fill time is printed); evaluation reads the same cache
               (its windows are the training windows) | the same peer as prefix_topk (its runs are re-used)
  full         soft prompt + prefixes in all layers + alignment loss on Tatoeba eng-deu pairs |
               PEFT LoRA + the same extra work through a Trainer.compute_loss override: one student
               forward of 16 target sentences and one teacher forward (adapters off, no grad) of their
               source sentences per step, cosine loss of the mean-pooled last hidden states

Runs alternate dsxfer, peer, dsxfer, peer, ... (per method and repeat), each in a fresh subprocess, so
peak RSS (ru_maxrss, read in the child right after training, before evaluation) is that run's own.

What is timed, the same thing for both: the wall time of the optimizer steps after the warm-up, i.e.
from the end of step W to the end of step W + T (one step = fetch and collate a batch, forward,
backward, clip, optimizer and scheduler step). dsxfer: train.log_every=1, and dsxfer's log line of
step k gives the samples/s of that step alone (its window restarts after each log line, so logging is
not in it); the step's time is batch / samples/s, summed over steps W+1..W+T. Peer: a TrainerCallback
records time.perf_counter() at every on_step_end; the time is t(W+T) - t(W).
samples/s = the windows of the timed steps / that time, real tokens/s = their real (unpadded) tokens / that
time, counted per step for each runner: dsxfer's step line reports both; the peer's collator records each batch
as the Trainer draws it (for `full`, plus the real tokens of the pair batches, as dsxfer's line counts them). Both
count the steps they really ran, so a runner whose length-grouped timed steps happen to hold shorter (or
longer) windows than the other's shows it in "real tokens/window", and the real tokens/s ratio is the one
that compares equal work.
wall s = launch of the child process (interpreter, imports, model load, featurization) to the end of
training. Both pad each batch to its longest window (dsxfer's collate; the peer's
DataCollatorWithPadding). dsxfer's attention runs torch's fused SDPA on CPU (kernels/sdpa.py); the peer gets the transformers default.

Evaluation, after training, on the windows of the same questions, --eval_batch windows per batch:
  model loop  dsxfer: time inside the predict calls of dsxfer.evaluation.evaluate.evaluate_qa (forward passes) |
              peer: Trainer.predict on the featurized windows (collate + forward + gathering logits)
  end to end  dsxfer: the whole evaluate_qa call (featurize, forward, decode answers, score) |
              peer: its featurization + Trainer.predict (no answer decoding: the Trainer has none)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lora", "prefix_all", "prefix_topk", "prefix_topk_cached", "full")
PEER_KIND = {"lora": "PEFT LoRA", "prefix_all": "PEFT PrefixTuning", "prefix_topk": "PEFT LoRA", "prefix_topk_cached": "PEFT LoRA",
             "full": "PEFT LoRA + align forward"}
LORA_R, LORA_ALPHA, LORA_MODULES = 8, 16, ["query", "value"]
PREFIX_LENGTH, PREFIX_HIDDEN, TOP_K = 8, 128, 4
ALIGN_PAIRS, ALIGN_BATCH, ALIGN_MAX_LENGTH = 1000, 16, 64
SEED = 42


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=200, help="first N TyDi QA GoldP English training questions")
    p.add_argument("--max_length", type=int, default=256, help="tokens per window")
    p.add_argument("--stride", type=int, default=64, help="overlap in tokens between windows of a long context")
    p.add_argument("--batch", type=int, default=8, help="windows per optimizer step")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed optimizer steps first (also the LR warm-up)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--repeats", type=int, default=2, help="runs per runner and method (alternating A B A B)")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default all; lora with --smoke)")
    p.add_argument("--eval_batch", type=int, default=32, help="windows per evaluation batch (both runners)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 8 questions, a few steps: checks the script in seconds")
    p.add_argument("--work_dir", default=None, help="folder for run outputs and child logs (default: a temporary folder)")
    p.add_argument("--child", choices=("dsxfer", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.questions, args.max_length, args.stride, args.batch = min(args.questions, 8), 96, 16, 2  # 96: room for the full method's 16 virtual tokens
        args.steps, args.warmup_steps, args.repeats, args.eval_batch = min(args.steps, 2), 1, 1, 8
        args.methods = args.methods or "lora"
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown method {bad[0]!r}; use a comma list of {', '.join(METHODS)}")
    args.methods = methods
    if args.stride >= args.max_length:
        p.error(f"--stride {args.stride} must be smaller than --max_length {args.max_length}")
    return args


# ------------------------------------------------------------------------------------------ parent


def write_questions(path: Path, n: int) -> int:
    """The first n TyDi QA GoldP English training questions as a SQuAD-format file both runners read."""
    from dsxfer.data.tasks import load_task

    examples = list(load_task("tydiqa", "en", "train"))[:n]
    data = [{"title": ex.title, "paragraphs": [{"context": ex.context, "qas": [{
        "id": ex.id, "question": ex.question,
        "answers": [{"text": t, "answer_start": s} for t, s in zip(ex.answers, ex.answer_starts)]}]}]} for ex in examples]
    path.write_text(json.dumps({"version": "bench", "data": data}), encoding="utf-8")
    return len(examples)


def smoke_model(folder: Path) -> Path:
    """A tiny random XLM-R (6 layers, so top-4 prefixes leave layers without) with its small tokenizer,
    built by the tests' model helper: --smoke checks this script end to end, it measures nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_tiny_folder, tiny_backbone_and_tokenizer

    return save_tiny_folder(folder, *tiny_backbone_and_tokenizer("xlm-roberta", num_hidden_layers=6))


def run_child(runner: str, method: str, spec_path: Path, work: Path, tag: str) -> dict:
    result = work / f"{tag}.json"
    log = work / f"{tag}.log"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", runner, "--method", method, "--spec", str(spec_path),
           "--result", str(result), "--launched", repr(time.time())]
    with open(log, "w", encoding="utf-8") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if result.is_file():
        return json.loads(result.read_text())
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
    return {"error": f"exit code {rc}: " + " / ".join(tail)}


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def med(values: list[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(statistics.median(values)) if values else "n/a"


def tables(results: dict[tuple[str, str], list[dict]], methods: list[str]) -> str:
    train = ["| method | runner | samples/s | real tokens/window | real tokens/s | peak RSS MB | wall s | "
             "dsxfer/peer samples/s (min / median / max) | dsxfer/peer real tokens/s (min / median / max) | "
             "dsxfer/peer peak RSS (min / median / max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    evals = ["| method | runner | features | features/s, model loop | features/s, end to end | "
             "dsxfer/peer model loop (min / median / max) | dsxfer/peer end to end (min / median / max) |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        ours, peer = results.get((m, "dsxfer"), []), results.get((m, "peer"), [])
        pairs = [(a, b) for a, b in zip(ours, peer) if "error" not in a and "error" not in b]
        ratio = lambda key: [a[key] / b[key] for a, b in pairs if b.get(key)]
        for runner, runs in (("dsxfer", ours), (PEER_KIND[m], peer)):
            ok = [r for r in runs if "error" not in r]
            dsx = runner == "dsxfer"
            if not ok:
                why = runs[0]["error"] if runs else "not run"
                train.append(f"| {m} | {runner} | failed: {why} | | | | | | | |")
                evals.append(f"| {m} | {runner} | failed | | | | |")
                continue
            get = lambda key: [r[key] for r in ok if r.get(key) is not None]
            train.append(f"| {m} | {runner} | {med(get('samples_per_s'))} | {med(get('tokens_per_window'), '{:.0f}')} | "
                         f"{med(get('tokens_per_s'), '{:.0f}')} | {med(get('peak_rss_mb'), '{:.0f}')} | {med(get('wall_s'), '{:.1f}')} | "
                         f"{spread(ratio('samples_per_s')) if dsx else '1.00'} | {spread(ratio('tokens_per_s')) if dsx else '1.00'} | "
                         f"{spread(ratio('peak_rss_mb')) if dsx else '1.00'} |")
            evals.append(f"| {m} | {runner} | {med(get('eval_features'), '{:.0f}')} | {med(get('eval_model_fps'))} | "
                         f"{med(get('eval_e2e_fps'))} | {spread(ratio('eval_model_fps')) if dsx else '1.00'} | "
                         f"{spread(ratio('eval_e2e_fps')) if dsx else '1.00'} |")
    return ("Training (medians over the repeats; ratios pair run i of dsxfer with run i of the peer)\n\n" + "\n".join(train)
            + "\n\nEvaluation (the same runs, after training)\n\n" + "\n".join(evals))


def main_parent(args: argparse.Namespace) -> None:
    started = time.time()
    holder = None if args.work_dir else tempfile.TemporaryDirectory(prefix="dsxfer-cpu-bench-")
    work = Path(args.work_dir or holder.name)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        model_path = str(smoke_model(work / "tiny-model"))
    else:
        from dsxfer.method.embedded import embedded_model_path

        model_path = str(embedded_model_path())
    questions = work / "questions.json"
    n = write_questions(questions, args.questions)
    spec = {k: v for k, v in vars(args).items() if k not in ("child", "method", "spec", "result", "launched", "work_dir")}
    spec.update(model_path=model_path, embedded=not args.smoke, questions_file=str(questions), work_dir=str(work))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    import torch

    print(f"{n} questions, windows {args.max_length} / stride {args.stride}, batch {args.batch}, {args.warmup_steps} warm-up + "
          f"{args.steps} timed steps, {args.repeats} repeat(s), methods {', '.join(args.methods)}, torch threads "
          f"{torch.get_num_threads()} of {os.cpu_count()} CPUs; model {'tiny random (smoke)' if args.smoke else 'embedded default'}",
          flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for m in args.methods:
            for runner in ("dsxfer", "peer"):
                if runner == "peer" and m == "prefix_topk_cached" and len(results.get(("prefix_topk", "peer"), [])) > rep:
                    r = results[("prefix_topk", "peer")][rep]  # the same peer job: its run is not repeated
                else:
                    r = run_child(runner, m, spec_path, work, f"{m}-{runner}-{rep}")
                results.setdefault((m, runner), []).append(r)
                shown = r.get("error") or f"{r['samples_per_s']:.2f} samples/s, {r['peak_rss_mb']:.0f} MB, {r['wall_s']:.1f} s"
                if r.get("cache_fill_s") is not None:
                    shown += f" (activation cache filled before training in {r['cache_fill_s']:.1f} s, untimed)"
                print(f"  repeat {rep + 1} {m} {runner}: {shown}", flush=True)
    print()
    print(tables(results, args.methods))
    print(f"\n(total {time.time() - started:.0f} s)")
    if holder is not None:
        holder.cleanup()


# ------------------------------------------------------------------------------------------- children


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def dsxfer_overrides(spec: dict, method: str, out_dir: Path) -> list[str]:
    common = [f"model.max_length={spec['max_length']}", f"model.doc_stride={spec['stride']}",
              f"data.train_files=[{spec['questions_file']}]", "data.max_train_examples=null", "data.dev_examples=0",
              "eval.tasks=[]", f"train.max_steps={spec['warmup_steps'] + spec['steps']}", f"train.warmup_steps={spec['warmup_steps']}",
              "train.scheduler=linear", f"train.lr={spec['lr']}", "train.weight_decay=0.0", "train.grad_clip=1.0",
              f"train.micro_batch_size={spec['batch']}", "train.grad_accum=1", "train.log_every=1", "train.tensorboard=false",
              f"train.output_dir={out_dir}", "train.overwrite=true", f"train.seed={SEED}"]
    if not spec["embedded"]:
        common.append(f"model.name_or_path={spec['model_path']}")
    no_extras = ["prompts.length=0", "alignment.enabled=false"]
    prefixes = [f"injection.length={PREFIX_LENGTH}", "injection.reparam=true", f"injection.reparam_hidden={PREFIX_HIDDEN}"]
    per_method = {
        "lora": ["adapters.lora=true", f"adapters.r={LORA_R}", f"adapters.alpha={LORA_ALPHA}",
                 f"adapters.target_modules=[{','.join(LORA_MODULES)}]", "injection.length=0", *no_extras],
        "prefix_all": [*prefixes, "injection.layers=all", *no_extras],
        "prefix_topk": [*prefixes, "injection.layers=top_k", f"injection.top_k={TOP_K}", "model.activation_cache=disabled", *no_extras],
        "prefix_topk_cached": [*prefixes, "injection.layers=top_k", f"injection.top_k={TOP_K}", "model.activation_cache=auto",
                               f"model.activation_cache_dir={Path(spec['work_dir']) / 'activation_cache'}", *no_extras],
        "full": [*prefixes, "injection.layers=all", "alignment.enabled=true", "alignment.loss=cosine",
                 f"alignment.batch_size={ALIGN_BATCH}", f"alignment.max_length={ALIGN_MAX_LENGTH}",
                 f"alignment.max_pairs={ALIGN_PAIRS}", "alignment.target_langs=[deu]"],
    }
    return common + per_method[method]


STEP_LINE = re.compile(r"^step (\d+) \| loss .*?\| ([0-9.]+) samples/s, ([0-9.]+) tokens/s")


def child_dsxfer(spec: dict, method: str) -> dict:
    from dsxfer.config import load_config
    from dsxfer.data.qa import featurize_qa
    from dsxfer.data.readers import read_squad_json
    from dsxfer.evaluation.evaluate import evaluate_qa
    from dsxfer.method.model import load_trained
    from dsxfer.training.train import train

    out_dir = Path(spec["work_dir"]) / f"run-dsxfer-{method}"
    cfg = load_config(None, dsxfer_overrides(spec, method, out_dir))
    fill_s = fill_activation_cache(cfg, spec) if method == "prefix_topk_cached" else None
    train(cfg, quiet=True)
    trained_at, rss = time.time(), peak_rss_mb()

    first, last = spec["warmup_steps"] + 1, spec["warmup_steps"] + spec["steps"]
    step_seconds, step_tokens = {}, {}
    for line in (out_dir / "train.log").read_text(encoding="utf-8").splitlines():
        if (hit := STEP_LINE.match(line)) and first <= int(hit.group(1)) <= last:
            step = int(hit.group(1))
            step_seconds[step] = spec["batch"] / float(hit.group(2))
            step_tokens[step] = float(hit.group(3)) * step_seconds[step]  # the step's real tokens (task + alignment)
    if len(step_seconds) != spec["steps"]:
        raise RuntimeError(f"train.log of {out_dir} holds {len(step_seconds)} of the {spec['steps']} timed step lines")
    seconds = sum(step_seconds.values())
    samples_per_s, tokens_per_s = spec["steps"] * spec["batch"] / seconds, sum(step_tokens.values()) / seconds

    model = load_trained(out_dir)
    model.merge_lora()  # as `dsxfer eval` (evaluation.load_predictor) does
    tokenizer = model.tokenizer
    examples = list(read_squad_json(spec["questions_file"], "en"))
    reserved = int(model.num_virtual_tokens)
    feats = featurize_qa(examples, tokenizer, max_length=spec["max_length"], doc_stride=spec["stride"], reserved_tokens=reserved)

    from dsxfer.evaluation.evaluate import transfer_predictor

    in_model, forward = [0.0], transfer_predictor(model)  # `dsxfer eval`'s own predict (inference mode)

    def predict(batch):
        t0 = time.perf_counter()
        out = forward(batch)
        in_model[0] += time.perf_counter() - t0
        return out

    t0 = time.perf_counter()
    evaluate_qa(predict, tokenizer, examples, lang="en", max_length=spec["max_length"], doc_stride=spec["stride"],
                reserved_tokens=reserved, batch_size=spec["eval_batch"], progress=False)
    e2e = time.perf_counter() - t0
    return {"samples_per_s": samples_per_s, "tokens_per_window": tokens_per_s / samples_per_s, "tokens_per_s": tokens_per_s,
            "peak_rss_mb": rss, "cache_fill_s": fill_s, "trained_at": trained_at, "eval_features": len(feats),
            "eval_model_fps": len(feats) / in_model[0], "eval_e2e_fps": len(feats) / e2e}


def fill_activation_cache(cfg, spec: dict) -> float:
    """One untimed no-grad pass of the frozen bottom over the training windows into the cache folder (what a
    grid's earlier run leaves behind); returns its seconds. A folder already filled by an earlier repeat is
    read, not recomputed."""
    import torch

    from dsxfer.data.qa import featurize_qa, pad_token_id
    from dsxfer.data.readers import read_squad_json
    from dsxfer.method.model import build_transfer_model

    t0 = time.perf_counter()
    model = build_transfer_model(cfg).eval()
    cache = model.activation_cache
    feats = featurize_qa(list(read_squad_json(spec["questions_file"], "en")), model.tokenizer, max_length=spec["max_length"],
                         doc_stride=spec["stride"], with_labels=False)
    pad = pad_token_id(model.tokenizer)
    with torch.inference_mode():
        for lo in range(0, len(feats), spec["eval_batch"]):
            b = feats.batch(list(range(lo, min(lo + spec["eval_batch"], len(feats)))), pad)
            cache.entering_states(model, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    cache.flush()
    return time.perf_counter() - t0


def alignment_batches(spec: dict, tokenizer):
    """An endless seeded stream of (source, target) tokenized batches of Tatoeba eng-deu pairs."""
    import random

    from dsxfer.data.tasks import tatoeba_pairs

    pairs = list(tatoeba_pairs("deu", max_pairs=ALIGN_PAIRS))
    order = random.Random(SEED)
    while True:
        picked = order.sample(pairs, min(ALIGN_BATCH, len(pairs)))
        enc = lambda texts: tokenizer(texts, truncation=True, max_length=ALIGN_MAX_LENGTH, padding=True, return_tensors="pt")
        yield enc([p.src for p in picked]), enc([p.tgt for p in picked])


def child_peer(spec: dict, method: str) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from dsxfer.data.readers import read_squad_json
    from dsxfer.peers import featurize_windows  # the windows every peer of dsxfer reproduce trains on, too

    path = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForQuestionAnswering.from_pretrained(path)  # the QA head is new, randomly initialised
    if method == "prefix_all":
        peft_config = PrefixTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=PREFIX_LENGTH, prefix_projection=True,
                                         encoder_hidden_size=PREFIX_HIDDEN)
    else:
        peft_config = LoraConfig(task_type="QUESTION_ANS", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=LORA_MODULES)
    model = get_peft_model(model, peft_config)
    examples = list(read_squad_json(spec["questions_file"], "en"))
    train_windows = featurize_windows(examples, tokenizer, spec["max_length"], spec["stride"], with_labels=True)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = time.perf_counter()

    class AlignedTrainer(Trainer):
        """The task loss plus a cosine alignment loss on a batch of parallel pairs: the same extra
        forward passes as dsxfer's alignment (student on the target side, frozen teacher on the source)."""

        def __init__(self, *a, pairs, **kw):
            super().__init__(*a, **kw)
            self.pairs = pairs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            src, tgt = next(self.pairs)
            pair_tokens.append(int(src["attention_mask"].sum() + tgt["attention_mask"].sum()))  # counted as dsxfer counts them
            pooled = lambda h, mask: (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            student = model(**tgt, output_hidden_states=True).hidden_states[-1]
            with torch.no_grad(), model.disable_adapter():
                teacher = model(**src, output_hidden_states=True).hidden_states[-1]
            cos = F.cosine_similarity(pooled(student, tgt["attention_mask"]), pooled(teacher, src["attention_mask"]), dim=-1)
            loss = loss + (1.0 - cos).mean()
            return (loss, outputs) if return_outputs else loss

    clock = StepClock()
    # the real tokens and windows of every batch, in the order the Trainer collates them (batch i is step i: no
    # accumulation; the dataloader may fetch one batch ahead, which a per-batch list does not mind)
    batch_tokens, batch_samples, pair_tokens = [], [], []
    pad_batch = DataCollatorWithPadding(tokenizer)

    def collate(features):
        batch_tokens.append(sum(sum(f["attention_mask"]) for f in features))
        batch_samples.append(len(features))
        return pad_batch(features)
    args = TrainingArguments(output_dir=str(Path(spec["work_dir"]) / f"run-peer-{method}"), max_steps=spec["warmup_steps"] + spec["steps"],
                             per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=spec["eval_batch"],
                             learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=spec["warmup_steps"],
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=10_000, report_to=[], save_strategy="no",
                             use_cpu=True, seed=SEED, disable_tqdm=True)
    extra = {"pairs": alignment_batches(spec, tokenizer)} if method == "full" else {}
    trainer = (AlignedTrainer if method == "full" else Trainer)(
        model=model, args=args, train_dataset=train_windows, data_collator=collate, callbacks=[clock], **extra)
    trainer.train()
    trained_at, rss = time.time(), peak_rss_mb()
    w, t = spec["warmup_steps"], spec["steps"]
    seconds, timed = clock.ends[w + t] - clock.ends[w], slice(w, w + t)  # steps w+1 .. w+t are batches w .. w+t-1
    samples = sum(batch_samples[timed])
    tokens = sum(batch_tokens[timed]) + sum(pair_tokens[timed])
    samples_per_s, tokens_per_s = samples / seconds, tokens / seconds

    t0 = time.perf_counter()
    eval_windows = featurize_windows(examples, tokenizer, spec["max_length"], spec["stride"], with_labels=False)
    t1 = time.perf_counter()
    trainer.predict(eval_windows)
    t2 = time.perf_counter()
    return {"samples_per_s": samples_per_s, "tokens_per_window": tokens / samples, "tokens_per_s": tokens_per_s,
            "peak_rss_mb": rss, "trained_at": trained_at, "eval_features": len(eval_windows),
            "eval_model_fps": len(eval_windows) / (t2 - t1), "eval_e2e_fps": len(eval_windows) / (t2 - t0)}


def main_child(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    try:
        out = (child_dsxfer if args.child == "dsxfer" else child_peer)(spec, args.method)
        out["wall_s"] = out.pop("trained_at") - args.launched
    except Exception as e:  # reported in the table (e.g. a PEFT method this stack cannot run), not a crash of the whole bench
        import traceback

        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    Path(args.result).write_text(json.dumps(out))


if __name__ == "__main__":
    parsed = parse_args()
    main_child(parsed) if parsed.child else main_parent(parsed)
