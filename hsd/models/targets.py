"""The UNet modules a LoRA trains by default: a constant of its own, so configs load without torch."""

# The released Hyper-SD LoRAs' module set, which is diffusers' LCM-LoRA target list (PCM trains the same): every
# attention and feed-forward linear, every resnet conv with its shortcut and time projection, and the down/up-sampler
# convs. 278 modules on SD1.5, 788 on SDXL: the released files' layout (tests/test_lora_formats.py, test_recipes.py).
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
