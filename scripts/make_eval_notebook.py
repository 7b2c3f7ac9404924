"""Writes notebooks/eval_tiny.ipynb (unexecuted; tests/test_notebooks.py runs it top to bottom)."""
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("""# An eval, end to end, on tiny models

`hsd eval` generates images for each *model spec* over a prompt list with fixed seeds, scores every image
with CLIP, the LAION aesthetic predictor (Aes), ImageReward and PickScore in one pass, and prints the
paper's table. Here the generator is a tiny random-weight SD1.5 and the scorers are tiny random-weight models
in the official file layouts (`hsd random-scorers`), so the numbers mean nothing; the pipeline, the files and
the table are the real ones. With real weights the same call reproduces the paper's Table 2 rows
(`experiments/eval/sd15.yaml`, `docs/eval.md`)."""),
    code("""import json, tempfile, time
from pathlib import Path
import torch
from IPython.display import Markdown, display
from hsd.models.components import build_components
from hsd.scorers.random_weights import write_random_scorers
from eval.run import ModelSpec, run_eval
from eval.coco import prompts_sha256
from eval.table import markdown, rows

torch.set_num_threads(1)
work = Path(tempfile.mkdtemp())
model = build_components("tiny-sd15").save_pretrained(work / "tiny-sd15")
weights = write_random_scorers(work / "scorers", "tiny")
prompts = ["A man riding a wave on top of a surfboard.", "Two giraffes standing next to each other in a field.",
           "A red double decker bus driving down a city street.", "A cat sleeping on a laptop keyboard."]
sorted(str(p.relative_to(weights)) for p in weights.rglob("*") if p.is_file())"""),
    md("""## Specs: one table row each

A spec names a base model, optional LoRAs or a replacement UNet, the scheduler recipe, steps and guidance.
Its folder under the run is named by a hash of exactly those fields, so changing any of them makes new
images and never mixes old ones in. Image *i* always uses seed `seed + i`."""),
    code("""specs = [ModelSpec(name="tiny-sd15", model=str(model), steps=s, scheduler="ddim") for s in (1, 4)]
out = work / "run"
start = time.perf_counter()
summaries = run_eval(specs, prompts, weights, out, batch_size=4)
print(f"{time.perf_counter() - start:.1f} s")
display(Markdown(markdown(rows(summaries), prompts_sha256(prompts), 0)))"""),
    md("""## Reading the table

* **CLIP**: 100 x cosine between the OpenAI ViT-B/32 image and caption embeddings, averaged (clipped at 0
  like torchmetrics). SD1.5 scores about 31-32 on COCO-5k.
* **Aes**: the LAION aesthetic predictor on a 1-10 scale; the paper's models sit between 5.2 and 5.9.
* **ImageReward**: a z-score (the reward model's output standardised by its published mean and std); 0 is an
  average image, the paper's rows run from -0.4 to 1.2.
* **PickScore**: the cosine (about 0.21-0.23 in the paper); `table.csv` also holds the raw README score,
  100 times larger with the real logit scale.
* A value in parentheses is the paper's, printed when a row's name (or its `paper:` field), steps and type
  match a row of Hyper-SD's Table 2 or 4. Differences of a few hundredths are seed and caption noise;
  compare runs only when their prompt sha256 (under the table) is the same.
* **N** counts scored images, **skipped** the unreadable ones, which are never averaged in.

Every image's scores are one JSON line in the spec's `scores.jsonl`:"""),
    code("""store = next(out.glob("tiny-sd15-*"))
for line in (store / "scores.jsonl").read_text().splitlines()[:2]:
    print(json.loads(line))"""),
    md("""## Resuming

Killing an eval loses nothing: PNGs are written atomically and each scored batch is appended and flushed.
Run it again and only what is missing is generated and scored; here everything is done, so it returns at
once with the same table."""),
    code("""start = time.perf_counter()
again = run_eval(specs, prompts, weights, out, batch_size=4)
print(f"rerun: {time.perf_counter() - start:.1f} s, same table: {rows(again) == rows(summaries)}")"""),
    md("""## With real models

```
hsd eval --spec experiments/eval/sd15.yaml --coco annotations/captions_val2017.json \\
         --weights scorers/ --out runs/eval-sd15 --device cuda
```
`docs/eval.md` lists the scorer files to download and where they go."""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                                "name": "python3"}})
nbf.write(nb, Path(__file__).resolve().parent.parent / "notebooks" / "eval_tiny.ipynb")
