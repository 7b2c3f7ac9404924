"""`hsd generate` on tiny random-weight SD1.5 / SDXL folders: recipes, LoRA layouts, seeds, metadata, errors."""
import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from hsd.models.components import ARCHS, ModelError, build_components
from hsd.pipelines import GenerateError, add_generate_command, load_generator
from hsd.pipelines.generate import parse_lora

FAMILIES = ["tiny-sd15", "tiny-sdxl"]
ETA = {"tcd": 1.0, "lcm": None}        # recorded eta per recipe; the others (DDIM) default to 0.0
ONE_STEP = {"ddim": [999], "lcm": [800]}  # DDIM "trailing" starts at the last training timestep; LCM as told
RECIPES = [("ddim", [1, 2, 4, 8]), ("tcd", [1, 4]), ("lcm", [1]), ("default", [2])]


def _make_model(name, root):
    """A pipeline folder, its LoRA in the diffusers and kohya layouts, and a replacement UNet (folder + file)."""
    comps = build_components(name)
    # "leading", as in the released SD1.5 / SDXL folders, so the ddim recipe's "trailing" override is tested.
    comps.scheduler = DDIMScheduler.from_config(comps.scheduler.config, timestep_spacing="leading")
    folder = comps.save_pretrained(root / "model")
    comps.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    state = {"unet." + k: v.contiguous() for k, v in get_peft_model_state_dict(comps.unet).items()}
    save_file(state, root / "lora.safetensors")
    kohya = {}
    for key, value in state.items():
        module = "lora_unet_" + key[len("unet."):].rsplit(".lora_", 1)[0].replace(".", "_")
        kohya[module + (".lora_down.weight" if ".lora_A." in key else ".lora_up.weight")] = value
        kohya[module + ".alpha"] = torch.tensor(4.0)
    save_file(kohya, root / "kohya.safetensors")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**ARCHS[name].unet)
    unet.save_pretrained(root / "unet")
    save_file(unet.state_dict(), root / "unet.safetensors")
    return SimpleNamespace(name=name, folder=folder, lora=root / "lora.safetensors", kohya=root / "kohya.safetensors",
                           unet_dir=root / "unet", unet_file=root / "unet.safetensors")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """Overrides conftest's 2 threads: tiny models gain nothing from more, and on a shared CPU the extra
    threads spin-wait (measured: 10 s at 1 thread, over 140 s at 2, with other jobs running)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: _make_model(name, tmp_path_factory.mktemp(name)) for name in FAMILIES}


@pytest.fixture(params=FAMILIES)
def model(request, models):
    return models[request.param]


def _unet_timesteps(gen):
    """Every timestep the UNet is called at (the pipeline passes it positionally after the latents)."""
    seen = []
    gen.pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    return seen


def _pixels(images):
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.mark.parametrize("scheduler,steps_list", RECIPES)
def test_recipes_run_the_unet_at_their_timesteps(model, scheduler, steps_list):
    unet = model.unet_dir if scheduler == "lcm" else None
    lora = [] if scheduler == "lcm" else [(model.lora, 1.0)]
    gen = load_generator(model.folder, lora=lora, unet=unet, scheduler=scheduler)
    seen, calls = _unet_timesteps(gen), {}
    for steps in steps_list:
        seen.clear()
        images = gen.generate(["a red cube", "a blue ball"], steps, [0, 1])
        assert [im.size for im in images] == [(16, 16)] * 2                   # native: sample_size 8 x vae 2
        meta = images[0].info["hsd"]
        assert seen == meta["timesteps"] and len(seen) == steps             # one batched UNet call per step
        assert (meta["scheduler"], meta["steps"], meta["eta"]) == (scheduler, steps, ETA.get(scheduler, 0.0))
        calls[steps] = list(seen)
    if scheduler in ONE_STEP:
        assert calls[1] == ONE_STEP[scheduler]
    if scheduler == "lcm":
        from_file = load_generator(model.folder, unet=model.unet_file, scheduler="lcm").generate(["a red cube"], 1, [0])
        base = load_generator(model.folder, scheduler="lcm").generate(["a red cube"], 1, [0])
        assert np.array_equal(_pixels(from_file), _pixels(images[:1]))     # folder and bare state dict agree
        assert not np.array_equal(_pixels(base), _pixels(images[:1]))      # the UNet really was replaced


@pytest.mark.parametrize("scheduler,steps_list", RECIPES)
def test_cli_writes_pngs_with_metadata(model, scheduler, steps_list, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n  café ☕ \n", encoding="utf-8")
    extra = ["--unet", str(model.unet_dir)] if scheduler == "lcm" else ["--lora", f"{model.lora}:0.8"]
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers())
    args = parser.parse_args(["generate", "--model", str(model.folder), "--scheduler", scheduler, *extra,
                              "--steps", *map(str, steps_list), "--prompts", str(prompts), "--seed", "5",
                              "--n-per-prompt", "2", "--batch-size", "3", "--out", str(tmp_path / "out")])
    args.fn(args)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())             # no temp files left behind
    assert names == sorted(f"p{i:04d}_seed{s}_steps{n}.png" for i in (0, 1) for s in (5, 6) for n in steps_list)
    image = Image.open(tmp_path / "out" / f"p0001_seed6_steps{steps_list[-1]}.png")
    assert image.size == (16, 16)
    meta = json.loads(image.text["hsd"])
    assert meta["prompt"] == image.text["prompt"] == "café ☕"
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["dtype"]) == (6, steps_list[-1], 0.0, "float32")
    assert image.text["model"] == str(model.folder) and image.text["hsd_version"] == meta["hsd_version"]
    assert json.loads(image.text["timesteps"]) == meta["timesteps"]
    if scheduler == "lcm":
        assert (meta["unet"], meta["lora"], meta["timesteps"], meta["eta"]) == (str(model.unet_dir), [], [800], None)
    else:
        assert meta["lora"] == [{"path": str(model.lora), "weight": 0.8}] and meta["unet"] is None
        assert json.loads(image.text["lora"]) == meta["lora"]


def test_lora_layouts_and_weights(model):
    def image(lora):
        return _pixels(load_generator(model.folder, lora=lora, scheduler="tcd").generate(["a red cube"], 1, [3]))
    plain = image([])
    assert not np.array_equal(image([(model.lora, 1.0)]), plain)
    assert np.array_equal(image([(model.lora, 0.0)]), plain)                  # weight 0 fuses nothing
    assert np.abs(image([(model.kohya, 1.0)]) - image([(model.lora, 1.0)])).max() <= 1   # same LoRA, kohya keys


def test_seeds_do_not_depend_on_the_batch(model):
    gen = load_generator(model.folder, lora=[(model.lora, 1.0)], scheduler="tcd", eta=0.5)
    decoded = []      # the VAE decoder's float output, before 8-bit rounding
    gen.pipe.vae.decoder.register_forward_hook(lambda m, args, out: decoded.append(out))
    prompts, seeds = ["a", "b", "c"], [7, 8, 9]
    one_by_one = gen.generate(prompts, 4, seeds, batch_size=1)
    together = gen.generate(prompts, 4, seeds, batch_size=3)
    torch.testing.assert_close(torch.cat(decoded[:3]), decoded[3], atol=1e-5, rtol=0)
    assert np.abs(_pixels(one_by_one) - _pixels(together)).max() <= 1
    assert not np.array_equal(_pixels(together[:1]), _pixels(gen.generate(["a"], 4, [10])))


def test_negative_prompt_acts_with_cfg(model, tmp_path):
    gen = load_generator(model.folder, lora=[(model.lora, 1.0)], scheduler="tcd")

    def image(guidance, negative=None):
        return gen.generate(["a red cube", "a blue ball"], 2, [3, 4], guidance, negative_prompt=negative)
    with_cfg, negative = image(5.0), image(5.0, "blurry, low quality")
    assert not np.array_equal(_pixels(with_cfg), _pixels(negative))
    assert [im.info["hsd"]["negative_prompt"] for im in negative + with_cfg] == ["blurry, low quality"] * 2 + [None] * 2
    assert np.array_equal(_pixels(image(0.0)), _pixels(image(0.0, "blurry, low quality")))    # no CFG, no effect

    from hsd.cli import main
    main(["generate", "--model", str(model.folder), "--lora", str(model.lora), "--scheduler", "tcd", "--steps", "2",
          "--prompt", "a red cube", "a blue ball", "--seed", "3", "--guidance", "5", "--negative-prompt",
          "blurry, low quality", "--out", str(tmp_path)])
    written = Image.open(tmp_path / "p0000_seed3_steps2.png")
    meta = json.loads(written.text["hsd"])
    assert written.text["negative_prompt"] == meta["negative_prompt"] == "blurry, low quality"
    assert np.array_equal(np.asarray(written, dtype=np.float64), _pixels(negative[:1])[0])


def test_errors_name_their_cause(models, tmp_path):
    sd15, sdxl = models["tiny-sd15"], models["tiny-sdxl"]
    with pytest.raises(ModelError, match="nowhere"):
        load_generator(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="LoRA file not found: .*missing.safetensors"):
        load_generator(sd15.folder, lora=[(tmp_path / "missing.safetensors", 1.0)])
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    save_file({"unet.nothing.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "stray.safetensors")
    for bad in ("foreign", "stray"):
        with pytest.raises(ModelError, match=f"{bad}.safetensors.*kohya layout"):
            load_generator(sd15.folder, lora=[(tmp_path / f"{bad}.safetensors", 1.0)])
    with pytest.raises(ModelError, match="is SDXL but the model is SD15"):
        load_generator(sd15.folder, unet=sdxl.unet_dir)
    with pytest.raises(GenerateError, match="one seed per image"):
        load_generator(sd15.folder).generate(["a", "b"], 1, [0])

    from hsd.cli import main  # the one handler of user errors: one line, exit status 2
    (tmp_path / "empty.txt").write_text("\n  \n")
    for model_dir, prompt, message in [(sd15.folder, ["--prompts", str(tmp_path / "empty.txt")], "holds no prompts"),
                                       (tmp_path / "nowhere", ["--prompt", "a"], "model not found: .*nowhere")]:
        with pytest.raises(SystemExit, match=message):
            main(["generate", "--model", str(model_dir), *prompt, "--steps", "1", "--out", "o"])


def test_parse_lora():
    assert parse_lora("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
