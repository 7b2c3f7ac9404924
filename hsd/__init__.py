"""hsd: Hyper-SD training (work in progress)."""
import logging as _logging


class _Drop(_logging.Filter):
    """Drops one known, harmless log line (which text, and why, where it is installed)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: _logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# diffusers imports torchao (the quantized frozen base, hsd.models.quantize) whenever it is installed, and with
# torchao 0.18 on torch 2.14 that prints three lines of no consequence to hsd on every command: torch.compile's
# deprecation of two torchao enums' registration, and diffusers' notice that it cannot allow-list torchao tensor
# classes that moved in 0.18 (only torchao-serialized checkpoints need them; hsd quantizes after loading).
_logging.getLogger("torch.utils._pytree").addFilter(_Drop("is an Enum subclass"))
_logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    _Drop("Unable to import `torchao` Tensor objects"))
