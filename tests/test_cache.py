"""`hsd cache` and data.cache (hsd.data.cache; issue 23): a cached run reads the same batches as the uncached run
over the same shards (latents drawn from the stored posterior with the batch's generator, the stored conditioning and
the empty prompt's), trains without loading a text encoder or a VAE, and a cache made for another model, resolution
or view is refused in one line."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from dit_common import ROOT, hsd
from hsd.config import load_config
from hsd.data.cache import CacheError, write_cache
from hsd.models.components import build_components
from hsd.models.dit import build_dit
from hsd.worlds.sd import SD

CONFIGS = {"sd15": "experiments/tiny/sd15.yaml", "flux": "experiments/tiny/flux.yaml"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two shards of three captioned images, a random tiny SD1.5 and FLUX folder, and each one's cache."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    for j in range(2):
        with wds.TarWriter(str(root / f"data-{j}.tar")) as w:
            for i in range(3):
                b = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(b, format="png")
                w.write({"__key__": f"{j}_{i}", "png": b.getvalue(), "txt": f"a photo of thing {j} {i}"})
    models = {"sd15": build_components("tiny-sd15").save_pretrained(root / "sd15"),
              "flux": build_dit("tiny-flux").save_pretrained(root / "flux")}
    shards = f"data.shards={root}/data-{{0..1}}.tar"
    for family, model in models.items():
        write_cache(config(family, model, shards), root / f"cache-{family}")
    return root, models, shards


def config(family, model, *overrides):
    return load_config([str(ROOT / CONFIGS[family])], [f"model.path={model}", "data.crop=center", *overrides])


def encoded(cfg) -> list[dict]:
    w = SD(cfg)
    return [w.encoder(b, torch.Generator().manual_seed(b["index"])) for b in w.data(3, 7, 2).train_dataloader()]


def leaves(tree, prefix=""):
    for k, v in tree.items():
        yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_cached_run_reads_the_same_batches(world, family):
    root, models, shards = world
    plain = encoded(config(family, models[family], shards))
    cfg = config(family, models[family], f"data.cache={root}/cache-{family}")
    cached = encoded(cfg)
    assert len(plain) == len(cached) == 3
    for a, b in zip(plain, cached):
        assert a["captions"] == b["captions"] and a["index"] == b["index"]
        assert (a["x0"] - b["x0"]).abs().max() < 1e-5  # one posterior, the same draw
        for part in ("cond", "uncond"):
            x, y = dict(leaves(a[part])), dict(leaves(b[part]))
            assert x.keys() == y.keys() and all((x[k] - y[k]).abs().max() < 1e-5 for k in x), part
    w = SD(cfg)
    assert w._components is None  # trained from the cache: no text encoder, no VAE loaded
    assert not any(True for _ in w.encoder.parameters())


def test_a_cached_flux_run_trains_on_an_nf4_base_and_loads_the_encoders_only_for_samples(world, tmp_path):
    root, models, shards = world
    common = [str(ROOT / CONFIGS["flux"]), f"model.path={models['flux']}", "data.crop=center", f"out_dir={tmp_path}",
              "dmd.iterations=0", "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2}]"]
    files = {}
    for name, extra in (("plain", [shards]), ("cached", [f"data.cache={root}/cache-flux", "model.quantize=nf4"])):
        r = hsd("train", *common, f"name={name}", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        files[name] = load_file(tmp_path / name / "lora_stage0_k2.safetensors")
    assert files["plain"].keys() == files["cached"].keys()
    assert all(v.abs().sum() > 0 for k, v in files["cached"].items() if "lora_B" in k)


def test_a_cache_for_another_model_resolution_or_view_is_refused(world, tmp_path):
    root, models, shards = world
    cache = f"data.cache={root}/cache-sd15"
    with pytest.raises(CacheError, match=r"made with resolution=16, but this run has resolution=32"):
        SD(config("sd15", models["sd15"], cache, "model.resolution=32"))
    other = build_components("tiny-sd15", seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(CacheError, match=r"other text encoder / VAE weights than model.path="):
        SD(config("sd15", other, cache))
    with pytest.raises(CacheError, match=r"made with world='flux', but this run has world='sd15'"):
        SD(config("sd15", models["sd15"], f"data.cache={root}/cache-flux"))
    r = hsd("train", str(ROOT / CONFIGS["sd15"]), f"model.path={models['sd15']}", cache, "data.crop=random",
            cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "a cache holds one view of each image (center crop, no flip)" in r.stderr
    (tmp_path / "empty").mkdir()
    r = hsd("train", str(ROOT / CONFIGS["sd15"]), f"model.path={models['sd15']}", f"data.cache={tmp_path / 'empty'}",
            "data.crop=center", cwd=tmp_path)
    assert r.returncode == 2 and "no manifest.json there" in r.stderr and r.stderr.count("\n") == 1
    r = hsd("train", str(ROOT / CONFIGS["sd15"]), f"model.path={models['sd15']}", cache, shards, "data.crop=center",
            cwd=tmp_path)
    assert r.returncode == 2 and "set exactly one of data.shards" in r.stderr
