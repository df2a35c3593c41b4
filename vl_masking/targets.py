"""What each generation step is read against, and the LM head that reads it.

Every measure records, per step, its target token (--target: the model's greedy prediction, or the first
token of a text as it follows the prompt), the target's probability in the unblocked model, the prediction
and whether they match (step_targets). The flow measure reads the target's probability after each
knockout through the same float32 LM head (head_logits), so a probability of one file equals the other's.
"""

import torch


def step_targets(loaded, capture, generated: list, spec: str, prompt_ids) -> list:
    """Per generation step: the target token (--target), its probability in the unblocked model, the model's
    greedy prediction and whether they match; recorded by every measure."""
    tok = loaded.tokenizer
    named = target_token(tok, spec, prompt_ids)
    decode = lambda i: tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    out = []
    for step in range(len(capture.final_hidden)):
        logits = step_logits(loaded, capture, step)
        predicted = generated[step] if step < len(generated) else int(logits.argmax())
        target = predicted if named is None else named
        out.append({"step": step, "target_token_id": int(target), "target_token": decode(target),
                    "base_prob": base_prob(logits, target), "predicted_token": decode(predicted),
                    "correct": predicted == target})
    return out


def target_token(tokenizer, spec: str, prompt_ids=None):
    """The token id a --target names: None for the predicted token, else the first token of its text as the text
    would follow the prompt (prompt_ids), with a space between them where neither the prompt's end nor the text
    has one: "Paris" after "... the city of" is read as " Paris", after a chat prompt's "assistant\n" as "Paris".

    The prompt's last tokens are decoded, joined with the text and tokenized again; the token after them is the
    target. Where they do not come back as themselves (a tokenizer that merges across the join), the text is
    tokenized alone, as written.
    """
    from .units import parse_target

    text = parse_target(spec)
    if text is None:
        return None
    alone = tokenizer.encode(text, add_special_tokens=False)
    if alone and alone[0] in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
        return alone[0]  # "<|im_end|>": a special token is itself, with no space before it
    prompt_ids = [] if prompt_ids is None else [int(i) for i in prompt_ids]
    count = len(prompt_ids)
    sizes = range(min(4, count), min(12, count) + 1) if count else ()
    for size in sizes:  # a tail that starts at a word comes back whole; a short prompt is its own tail
        tail_ids = prompt_ids[-size:]
        tail = tokenizer.decode(tail_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        joined = text if not tail or tail[-1].isspace() or text[0].isspace() else " " + text
        ids = tokenizer.encode(tail + joined, add_special_tokens=False)
        if ids[:size] == tail_ids and len(ids) > size:
            lone_space = not tokenizer.decode(ids[size:size + 1]).strip() and len(ids) > size + 1
            return ids[size + 1] if lone_space and not text[0].isspace() else ids[size]
    return alone[0]


def step_logits(loaded, capture, step: int) -> torch.Tensor:
    """The unblocked model's float32 next-token logits (V,) at `step`: the LM head's own output where generate
    computed it in float32; for a low-precision head, the head applied in float32 to every step's captured
    final hidden state, once, on the first call."""
    if not capture.head_logits:
        capture.head_logits = list(linear_logits(loaded, torch.stack(capture.final_hidden)))
    return softcap(loaded, capture.head_logits[step])


def softcap(loaded, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft-capping (Gemma 2): cap * tanh(logits / cap); the logits unchanged without."""
    cap = getattr(loaded.text_config, "final_logit_softcapping", None) or getattr(
        loaded.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_logits(loaded, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits in float32 from final hidden states (n, D), whatever the model dtype."""
    return softcap(loaded, linear_logits(loaded, hidden))


def linear_logits(loaded, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's output in float32 for final hidden states (n, D), before any soft-capping.

    A float32 copy of a low-precision LM head is made once and kept on the loaded model (LoadedModel.head_float32)
    while it fits (a quarter of the free GPU memory, or 4 GB on a CPU); otherwise the head is upcast a slice at
    a time.
    """
    head = loaded.model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.to(weight.device).float()
    if weight.dtype != torch.float32:
        cached = getattr(loaded, "head_float32", None)
        if cached is None and _fits(weight):
            cached = loaded.head_float32 = (weight.float(), None if bias is None else bias.float())
        if cached is not None:
            weight, bias = cached
    if weight.dtype == torch.float32:
        logits = torch.nn.functional.linear(hidden, weight, bias)
    else:
        step = 16384
        logits = torch.cat([torch.nn.functional.linear(hidden, weight[i: i + step].float(),
                                                       None if bias is None else bias[i: i + step].float())
                            for i in range(0, weight.shape[0], step)], dim=-1)
    return logits


def _fits(weight: torch.Tensor) -> bool:
    size = weight.numel() * 4
    if weight.device.type == "cuda":
        return size < torch.cuda.mem_get_info(weight.device)[0] // 4
    return size < 4 << 30


def base_prob(base_logits: torch.Tensor, target: int) -> float:
    base = base_logits.double()
    return float((base[target] - torch.logsumexp(base, dim=-1)).exp())
