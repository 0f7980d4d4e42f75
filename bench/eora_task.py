"""Task-specific EoRA on SmolLM2-135M: the eigenspace calibrated on task text vs on C4.

    python bench/eora_task.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows (arc_easy accuracy, lm-eval through the offline YAMLs, first --limit questions): dense; GPTQ
3-bit g64; + EoRA rank 32 with its eigenspace from the protocol's C4 calibration; + EoRA rank 32
with its eigenspace from ARC-Challenge text (the local test split: question and correct answer,
one document each; no ARC-Easy question is used, and no ARC train split is available offline).
GPTQ itself always calibrates on the protocol's C4 sample.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import PROTOCOL, Results

from compress import CalibConfig, EvalSpec, compress, evaluate
from compress.models import load_model


def arc_text(data_dir: Path, out: Path) -> Path:
    docs = []
    for line in (data_dir / "tasks" / "arc_challenge" / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
        docs.append({"text": f"Question: {r['question']}\nAnswer: {answer}"})
    out.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eora_task"))
    args = ap.parse_args()
    arc = arc_text(Path(args.data_dir), Path("/tmp/arc_challenge_calib.jsonl"))
    c = PROTOCOL["calibration"]
    protocol = {"calibration": c, "eigenspace_calibration": "C4 (protocol) or ARC-Challenge test text (question + correct answer per document)",
                "lm_eval": {"task": args.task, "limit": args.limit, "num_fewshot": 0, "tasks_dir": "offline YAMLs"}, "model": Path(args.model).name}
    res = Results(Path(args.out), protocol, ["method", "recipe", "metric", "value", "stderr", "seconds"])
    model, tok, _ = load_model(args.model, dtype="float32", device="cpu")
    spec = EvalSpec(tasks=(args.task,), limit=args.limit)
    calib = CalibConfig(source="c4", samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"])
    gptq = "gptq:bits=3,group=64,actorder=false,clip=false,sequential=true"  # the defaults of the measured rows (before 2026-12-03)
    rows = [("dense", []), ("gptq", [gptq]), ("gptq+eora (C4 eigenspace)", [gptq, "eora:rank=32,branch_bits=8"]),
            ("gptq+eora (ARC eigenspace)", [gptq, f"eora:rank=32,branch_bits=8,calib={arc}"])]
    for name, recipe in rows:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if recipe:
            compress(m, recipe, calib, tokenizer=tok, data_dir=args.data_dir)
        secs = time.perf_counter() - t0
        for r in evaluate(m, tok, spec, data_dir=args.data_dir):
            res.add({"method": name, "recipe": " + ".join(recipe) or "-", "metric": r["protocol"]["metric"], "value": r["value"],
                     "stderr": r.get("stderr"), "seconds": round(secs, 1), "samples": r["protocol"]["samples"]})
            print(res.data["rows"][-1], flush=True)
        res.write_markdown("Task-specific EoRA on SmolLM2-135M-Instruct", [
            f"{args.task}, zero-shot, first {args.limit} questions (lm-eval --limit), offline YAMLs. seconds: compression time.",
            "Eigenspace text for the ARC row: /tmp/arc_challenge_calib.jsonl built by this script from data/tasks/arc_challenge/test.jsonl.",
        ])


if __name__ == "__main__":
    main()
