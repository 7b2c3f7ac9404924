"""The image-reward package's own loop, `model.score(prompt, image_path)` one image at a time, timed.

Runs inside the pinned reference environment (scripts/imagereward_reference.sh), which is the only place
image-reward 1.5 imports (it needs transformers 4). Called by benchmarks/eval_pass.py:

    .cache/ir-ref-venv/bin/python benchmarks/imagereward_loop.py WEIGHTS_DIR JOBS.json
JOBS.json: [[png_path, prompt], ...]. Prints one JSON line: {"seconds": ..., "scores": [...]}.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch


def main(weights: str, jobs_file: str) -> None:
    folder = Path(weights).resolve() / "imagereward"
    jobs = json.loads(Path(jobs_file).read_text())
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.chdir(folder)   # the package loads its tokenizer as 'bert-base-uncased': our local folder of that name
    import ImageReward as RM
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = RM.load(str(folder / "ImageReward.pt"), device="cpu", med_config=str(folder / "med_config.json"))
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        scores = [model.score(prompt, path) for path, prompt in jobs]
    print(json.dumps({"seconds": time.perf_counter() - start, "scores": scores}))


if __name__ == "__main__":
    main(*sys.argv[1:])
