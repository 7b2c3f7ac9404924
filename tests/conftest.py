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


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
