"""lm-eval table on SmolLM2-135M: dense vs compressed recipes (compress run's sequential calibration).

    python bench/lmeval_table.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data \
        [--recipe svd-llm:ratio=0.2 --recipe "cospadi:ratio=0.2,solver=closed-form" --out bench/results/lmeval_cospadi20]

Each ``--recipe`` is one row group; passes within a recipe are separated by '|'.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from common import PROTOCOL, Results

from compress import CalibConfig, EvalSpec, compress, evaluate
from compress.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag,winogrande")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--recipe", action="append", default=None, help="a recipe ('|' between passes); repeat for more rows")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lmeval_svdllm20"))
    args = ap.parse_args()
    recipes = args.recipe or ["svd-llm:ratio=0.2"]
    protocol = {"calibration": PROTOCOL["calibration"], "lm_eval": {"tasks": args.tasks, "limit": args.limit, "num_fewshot": 0,
                "batch_size": 8, "tasks_dir": "offline YAMLs (data/lm_eval_tasks)"}, "model": Path(args.model).name}
    res = Results(Path(args.out), protocol, ["method", "task", "metric", "value", "stderr"])
    model, tok, _ = load_model(args.model, dtype="float32", device="cpu")
    spec = EvalSpec(tasks=tuple(args.tasks.split(",")), limit=args.limit)
    t0 = time.perf_counter()
    for m in evaluate(model, tok, spec, data_dir=args.data_dir):
        res.add({"method": "dense", "task": m["protocol"]["task"], "metric": m["protocol"]["metric"], "value": m["value"],
                 "stderr": m.get("stderr"), "lm_eval_version": m["protocol"]["lm_eval_version"],
                 "task_version": m["protocol"]["task_version"], "samples": m["protocol"]["samples"]})
    print("dense done", time.perf_counter() - t0, flush=True)
    c = PROTOCOL["calibration"]
    for recipe in recipes:
        m2 = copy.deepcopy(model)
        t0 = time.perf_counter()
        compress(m2, recipe.split("|"), CalibConfig(source="c4", samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"]), tokenizer=tok,
                 data_dir=args.data_dir)
        print(recipe, "compressed in", round(time.perf_counter() - t0, 1), "s", flush=True)
        for m in evaluate(m2, tok, spec, data_dir=args.data_dir):
            res.add({"method": recipe, "task": m["protocol"]["task"], "metric": m["protocol"]["metric"], "value": m["value"],
                     "stderr": m.get("stderr"), "lm_eval_version": m["protocol"]["lm_eval_version"],
                     "task_version": m["protocol"]["task_version"], "samples": m["protocol"]["samples"]})
        del m2
    res.write_markdown(f"lm-eval on SmolLM2-135M-Instruct: dense vs {', '.join(recipes)}", [
        f"Zero-shot, first {args.limit} examples of each task (lm-eval --limit), offline task YAMLs reproducing the stock prompts;",
        "hellaswag's offline copy is rebuilt from a text dump and close to, not identical with, the stock set (data/SOURCES.md).",
    ])


if __name__ == "__main__":
    main()
