import pytest
import torch

from hsd.config import load_config
from hsd.diffusion.schedule import NoiseSchedule
from hsd.lab.teacher import load_teacher, teacher_path
from hsd.lab.world import blocks_world


@pytest.fixture(scope="session")
def world():
    """The blocks (smoke) world: its teacher is the fast one the training tests use."""
    return blocks_world()


@pytest.fixture
def teacher():
    return load_teacher(teacher_path("blocks"))


@pytest.fixture
def lab_parts(world, teacher):
    """(teacher with LoRA attached, schedule, prompt embeddings, empty-prompt embedding)."""
    from hsd.models.lora import attach_lora
    cfg = load_config()
    attach_lora(teacher.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    emb = teacher.encode(world.prompts + [""])
    return teacher, NoiseSchedule.from_scheduler(teacher.scheduler), emb[:-1], emb[-1:]


@pytest.fixture(scope="module")
def quiet_and_single_threaded():
    """For tests of what a command prints: tiny models gain nothing from threads (see test_generate), and
    transformers' "Loading weights" bars are progress, not errors: off, so stderr holds only what hsd prints."""
    from transformers.utils import logging as hf_logging
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)
    if bars:
        hf_logging.enable_progress_bar()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
