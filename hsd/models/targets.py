"""The UNet modules a LoRA trains by default: a constant of its own, so configs load without torch."""

# Every linear/conv of SD's attention, feed-forward and resnet blocks, as PCM and LCM-LoRA train them.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2"]
