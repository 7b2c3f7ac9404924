"""Inference on stock diffusers pipelines: `hsd generate` and its Python API."""
from .generate import GenerateError, ImageGenerator, add_generate_command, load_generator, save_png

__all__ = ["GenerateError", "ImageGenerator", "add_generate_command", "load_generator", "save_png"]
