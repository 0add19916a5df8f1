"""Weight precisions: the names ``--quantization`` takes, their bytes, and where they run.

``none`` keeps the weights in the compute dtype (``--dtype``: 16-bit on a GPU). ``int8`` and
``fp8`` are weight-only formats: each linear projection's matrix (q, k, v, o, gate, up, down
and the LM head) is stored as 8-bit values with one scale per output channel (row), in the
compute dtype, and is widened back to the compute dtype on the device just before its matmul;
activations, the KV cache, the norms and the embedding stay in the compute dtype. ``int8`` is
symmetric (``q = round(w / s)``, ``s = max|w| / 127``); ``fp8`` is ``torch.float8_e4m3fn``
(``s = max|w| / 448``), offered where the GPU has it (compute capability 8.9 or more) or, on
CPU, where torch has the dtype (for tests).

The quantizing arithmetic is :mod:`autotune.streaming.quant`'s; this module imports no torch.
"""

from __future__ import annotations

from autotune.errors import UserInputError

PRECISIONS = ("none", "int8", "fp8")
# Bytes of one stored weight of a quantized matrix (its scales come on top: one per row).
QUANTIZED_BYTES = {"int8": 1, "fp8": 1}
# The GPUs whose tensor cores have e4m3 (Ada, Hopper and later): below, refused.
FP8_MIN_CAPABILITY = (8, 9)


def parse_precisions(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``none``, ``int8``, ``fp8`` or a comma list of them (``none,int8,fp8``): each once, in
    the order given. Anything else is refused by name."""
    if text is None:
        return ("none",)
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name not in PRECISIONS:
            raise UserInputError(
                f"--quantization: expected {', '.join(PRECISIONS)} or a comma list of them "
                f"(none,int8,fp8); got {str(item).strip()!r}")
        if name in out:
            raise UserInputError(f"--quantization: {name} is given twice")
        out.append(name)
    if not out:
        raise UserInputError("--quantization: expected at least one of "
                             f"{', '.join(PRECISIONS)}")
    return tuple(out)


def is_quantized(precision: str) -> bool:
    return precision != "none"


def label(precision: str, dtype: str) -> str:
    """How a precision reads in tables: ``float16`` for none, else its own name."""
    return dtype if precision == "none" else precision
