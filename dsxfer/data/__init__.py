"""Data: readers, task registry, featurization, k-shot sampling."""

from dsxfer.data.qa import QAFeatures, collate_pairs, featurize_pairs, featurize_qa, pad_token_id, postprocess_qa
from dsxfer.data.readers import (
    PairExample, ParallelPair, QAExample, Records, Skipped, as_dataset, read_jsonl, read_parallel, read_pawsx_tsv,
    read_squad_json,
)
from dsxfer.data.sampling import load_shots, sample_k_shot, save_shots
from dsxfer.data.tasks import (
    TASKS, check_no_overlap, get_task, load_task, parse_langs, resolve_data_dir, split_rows, tatoeba_pairs,
    task_file,
)

__all__ = [
    "TASKS", "PairExample", "ParallelPair", "QAExample", "QAFeatures", "Records", "Skipped", "as_dataset",
    "check_no_overlap", "collate_pairs", "featurize_pairs", "featurize_qa", "get_task", "load_shots", "load_task",
    "pad_token_id", "parse_langs", "postprocess_qa", "read_jsonl", "read_parallel", "read_pawsx_tsv",
    "read_squad_json", "resolve_data_dir", "sample_k_shot", "save_shots", "split_rows", "tatoeba_pairs",
    "task_file",
]
