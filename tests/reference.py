"""transformers' own greedy generation: the tokens every engine must reproduce."""

from __future__ import annotations

from typing import Any

import torch


def greedy(model: Any, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` greedy tokens from ``model`` (a transformers causal LM, with its KV cache) and
    the logits of the first one, in float32."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        first_logits = out.logits[:, -1].float()
        nxt = out.logits[:, -1].argmax(-1)
        tokens = [nxt]
        for _ in range(steps - 1):
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values,
                        use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
    return torch.stack(tokens, dim=1), first_logits
