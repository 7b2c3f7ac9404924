import pytest
import torch

from hsd.config import load_config
from hsd.diffusion.schedule import NoiseSchedule
from hsd.lab.teacher import load_teacher
from hsd.lab.world import LabWorld


@pytest.fixture(scope="session")
def world():
    return LabWorld()


@pytest.fixture
def teacher():
    return load_teacher()


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
