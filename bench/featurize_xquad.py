"""Read + featurize all of XQuAD (12 languages x 1190 questions) with the embedded model's tokenizer.

Prints per language: read time, featurize time, windows, and the gold-span ceiling (EM/F1 of a
predictor whose logits peak exactly at the labelled gold span: below 100 only where a gold answer
starts or ends inside a token of this tokenizer). The baseline is the bare fast-tokenizer pair call
with the same windowing (tokenizer(question, context, return_overflowing_tokens=True)), the floor of
any featurizer that tokenizes pairs; dsxfer tokenizes each distinct context once instead, so its full
featurization (labels, offsets, whitespace trimming included) can undercut that floor: ratio < 1.

    OMP_NUM_THREADS=1 .venv/bin/python bench/featurize_xquad.py [--max_length 384 --doc_stride 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dsxfer.method.backbone import load_tokenizer
from dsxfer.data import TASKS, featurize_qa, load_task, postprocess_qa
from dsxfer.evaluation.metrics import qa_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_length", type=int, default=384, help="tokens per window")
    parser.add_argument("--doc_stride", type=int, default=128, help="overlap of consecutive windows")
    parser.add_argument("--reserved_tokens", type=int, default=16, help="room left for soft-prompt tokens")
    args = parser.parse_args()

    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    print(f"embedded tokenizer loaded in {time.perf_counter() - t0:.2f}s ({type(tokenizer).__name__}, {len(tokenizer)} tokens)")
    print(f"max_length={args.max_length} doc_stride={args.doc_stride} reserved_tokens={args.reserved_tokens}\n")
    header = f"{'lang':<5}{'questions':>10}{'windows':>9}{'read s':>8}{'featurize s':>12}{'baseline s':>11}{'ratio':>7}{'gold EM':>9}{'gold F1':>9}"
    print(header)
    print("-" * len(header))
    totals = {"read": 0.0, "feat": 0.0, "base": 0.0, "q": 0, "w": 0}
    for lang in TASKS["xquad"].langs:
        t = time.perf_counter()
        examples = load_task("xquad", lang).items
        read_s = time.perf_counter() - t

        t = time.perf_counter()
        feats = featurize_qa(examples, tokenizer, max_length=args.max_length, doc_stride=args.doc_stride,
                             reserved_tokens=args.reserved_tokens)
        feat_s = time.perf_counter() - t

        t = time.perf_counter()
        tokenizer([ex.question.lstrip() for ex in examples], [ex.context for ex in examples], truncation="only_second",
                  max_length=args.max_length - args.reserved_tokens, stride=args.doc_stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
        base_s = time.perf_counter() - t

        starts, ends = [], []
        for i in range(len(feats)):
            s, e = np.zeros(len(feats.input_ids[i])), np.zeros(len(feats.input_ids[i]))
            s[feats.start_positions[i]] = e[feats.end_positions[i]] = 10.0
            starts.append(s)
            ends.append(e)
        preds = postprocess_qa(examples, feats, starts, ends, max_answer_length=1000)
        gold = qa_scores({ex.id: ex.answers for ex in examples}, preds)

        print(f"{lang:<5}{len(examples):>10}{len(feats):>9}{read_s:>8.2f}{feat_s:>12.2f}{base_s:>11.2f}"
              f"{feat_s / base_s:>7.2f}{gold['exact_match']:>9.2f}{gold['f1']:>9.2f}")
        totals["read"] += read_s
        totals["feat"] += feat_s
        totals["base"] += base_s
        totals["q"] += len(examples)
        totals["w"] += len(feats)
    print("-" * len(header))
    print(f"{'all':<5}{totals['q']:>10}{totals['w']:>9}{totals['read']:>8.2f}{totals['feat']:>12.2f}{totals['base']:>11.2f}"
          f"{totals['feat'] / totals['base']:>7.2f}")
    print(f"\nread + featurize all of XQuAD: {totals['read'] + totals['feat']:.2f}s "
          f"(featurize / bare pair call = {totals['feat'] / totals['base']:.2f})")


if __name__ == "__main__":
    main()
