"""Golden ImageReward scores from the image-reward==1.5 package itself, for tests/test_imagereward.py.

Runs ONLY in the pinned reference env (bash scripts/imagereward_reference.sh builds it and calls this). It:
  1. builds BLIP's med_config (real BERT-base architecture, vocab_size = synthetic vocab + [DEC] + [ENC]);
  2. writes the synthetic vocab as ./bert-base-uncased/vocab.txt in a temp dir and chdirs there, so the package's
     BertTokenizer.from_pretrained('bert-base-uncased') resolves locally (HF_HUB_OFFLINE=1);
  3. saves random_imagereward_state_dict(med_config, seed) (hsd/scorers/imagereward_weights.py, imported by file path:
     it needs only torch) as ImageReward.pt and loads it with ImageReward.load(path, device='cpu', med_config=...),
     checking that every tensor really landed (the package loads with strict=False);
  4. calls the package's own model.score(prompt, pil_image), one pair at a time, on deterministic synthetic images;
  5. writes the fixture JSON (versions, med_config, vocab, seed, image specs + sha256, prompts, token ids, scores).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 0

# (image seed, width, height, prompt). Cases 0 and 6 share a prompt (image sensitivity), 0 and 7 share an image
# (text sensitivity); 3 is longer than 35 tokens; 2 has an accent (stripped) and an em dash ([UNK]).
CASES = [
    (1, 300, 200, "a photo of a cat"),
    (2, 512, 512, "an astronaut riding a horse on the moon, digital art"),
    (3, 200, 300, "Café in Paris at night \u2014 oil painting, highly detailed"),
    (4, 224, 224, "a highly detailed realistic oil painting of an old castle on a mountain near a lake under a "
                  "golden sky at night with snow and rain and clouds over the dark forest, cinematic lighting, "
                  "trending on artstation, 8k hd render"),
    (5, 640, 360, "PORTRAIT of an old man, 4K, trending on ArtStation!!!"),
    (6, 333, 333, "a red cube"),
    (7, 400, 300, "a photo of a cat"),
    (1, 300, 200, "a green dragon breathing fire over a city street"),
]


def _weights_module():
    path = ROOT / "hsd" / "scorers" / "imagereward_weights.py"
    spec = importlib.util.spec_from_file_location("imagereward_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("image-reward", "torch", "torchvision", "transformers", "tokenizers", "huggingface-hub", "timm",
                 "fairscale", "pillow", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "imagereward_golden.json"))
    args = ap.parse_args()
    out_path = Path(args.out).resolve()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from PIL import Image

    torch.set_num_threads(2)
    w = _weights_module()
    vocab = w.synthetic_bert_vocab()
    med = w.med_config_for(vocab_size=len(vocab) + 2)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w.write_bert_vocab(tmp / "bert-base-uncased", vocab)
        (tmp / "med_config.json").write_text(json.dumps(med, indent=1))
        t0 = time.time()
        sd = w.random_imagereward_state_dict(med, seed=SEED)
        torch.save(sd, tmp / "ImageReward.pt")
        os.chdir(tmp)  # 'bert-base-uncased' now names the local folder

        import ImageReward as RM
        model = RM.load(str(tmp / "ImageReward.pt"), device="cpu", med_config=str(tmp / "med_config.json"))
        ours = model.state_dict()
        assert set(ours) == set(sd), (sorted(set(ours) ^ set(sd)))[:10]
        bad = [k for k in sd if not torch.equal(ours[k], sd[k])]
        assert not bad, f"tensors not loaded by the package: {bad[:5]}"
        tok = model.blip.tokenizer
        assert len(tok) == med["vocab_size"], (len(tok), med["vocab_size"])
        print(f"loaded in {time.time() - t0:.1f} s; scoring {len(CASES)} pairs", flush=True)

        cases = []
        with torch.no_grad():
            for seed, width, height, prompt in CASES:
                img = w.synthetic_image(seed, width, height)
                score = model.score(prompt, Image.fromarray(img.numpy()))
                ids = tok(prompt, padding="max_length", truncation=True, max_length=35)["input_ids"]
                cases.append({"image": {"seed": seed, "width": width, "height": height,
                                        "sha256": w.tensor_sha256(img)},
                              "prompt": prompt, "input_ids": ids, "score": score})
                print(f"{score:+.6f}  {width}x{height}  {prompt[:50]!r}", flush=True)

    fixture = {
        "about": "image-reward==1.5 ImageReward.score(prompt, pil_image) on a synthetic checkpoint; "
                 "made by scripts/imagereward_reference.sh (scripts/imagereward_golden.py)",
        "versions": _versions(),
        "weights": "hsd/scorers/imagereward_weights.py:random_imagereward_state_dict(med_config, seed)",
        "seed": SEED,
        "images": "hsd/scorers/imagereward_weights.py:synthetic_image(seed, width, height)",
        "med_config": med,
        "vocab_generator": "hsd/scorers/imagereward_weights.py:synthetic_bert_vocab()",
        "vocab": vocab,
        "cases": cases,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
