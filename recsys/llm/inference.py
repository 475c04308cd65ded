"""Batched model calls shared by the LLM rankers: padding, micro-batching, generation, scoring.

Sequences are token-id lists. They are padded on the left, so that every row ends at the
last column (where next-token logits are read and generation continues), with position ids
taken from the attention mask so padding never shifts a row's positions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from recsys.llm.loading import LoadedModel
from recsys.llm.parsing import ends_in_a_loop

DEFAULT_TOKENS_PER_FORWARD = 12_288
CPU_TOKENS_PER_FORWARD = 2_048
DEFAULT_ROWS_PER_FORWARD = 96
LOGITS_ELEMENTS_PER_CHUNK = 64 * 1024 * 1024


def encode_prompt(loaded: LoadedModel, body: str, answer_prefix: str = "", *, chat: bool) -> list[int]:
    """Token ids of a prompt, as a chat turn (answer prefix opening the model's turn) or plain text."""
    tokenizer = loaded.tokenizer
    if chat and loaded.has_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]
    separator = "\n" if answer_prefix and body and not body.endswith("\n") else ""
    return tokenizer(body + separator + answer_prefix)["input_ids"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """input_ids, attention_mask and position_ids for a left-padded batch."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def tokens_per_forward(loaded: LoadedModel, max_tokens: int | None) -> int:
    """The padded-token budget of one forward pass: `max_tokens`, else a default for the device.

    On a GPU, big passes keep the device busy. On a CPU one request's prompt already runs the
    matrix products at full speed, and passes much beyond 2k tokens only push activations out
    of cache: measured with Gemma 3 270M, a batch of 8 verbalizer requests took 986 ms each
    with a 12k budget and 813 ms with 2k (828 ms alone).
    """
    if max_tokens is not None:
        return max_tokens
    return CPU_TOKENS_PER_FORWARD if loaded.device.type == "cpu" else DEFAULT_TOKENS_PER_FORWARD


def plan_micro_batches(
    lengths: Sequence[int], *, max_tokens: int = DEFAULT_TOKENS_PER_FORWARD, max_rows: int = DEFAULT_ROWS_PER_FORWARD
) -> list[list[int]]:
    """Group row indices by similar length so each padded forward pass stays within budget."""
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in by_length:
        width = max([lengths[index]] + [lengths[i] for i in current])
        if current and (width * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def next_token_logprobs(
    loaded: LoadedModel,
    sequences: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    *,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Log-probabilities (over the full vocabulary) of `token_ids` as each sequence's next token.

    Returns a float32 CPU tensor [len(sequences), len(token_ids)]. Only the last position's
    logits are computed, so memory stays small even with a 256k vocabulary.
    """
    max_tokens = tokens_per_forward(loaded, max_tokens)
    result = torch.empty((len(sequences), len(token_ids)), dtype=torch.float32)
    wanted = torch.tensor(list(token_ids), dtype=torch.long, device=loaded.device)
    for rows in plan_micro_batches([len(s) for s in sequences], max_tokens=max_tokens):
        input_ids, attention_mask, position_ids = left_pad(
            [sequences[i] for i in rows], loaded.pad_token_id, loaded.device
        )
        output = loaded.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=1,
            use_cache=False,
        )
        logprobs = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
        result[rows] = logprobs.index_select(1, wanted).cpu()
    return result


@torch.inference_mode()
def continuation_logprobs(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    max_tokens: int | None = None,
) -> list[float]:
    """Mean token log-probability of each continuation after its prompt (one entry per pair)."""
    max_tokens = tokens_per_forward(loaded, max_tokens)
    sequences = [list(prompt) + list(tail) for prompt, tail in zip(prompts, continuations, strict=True)]
    tail_lengths = [len(tail) for tail in continuations]
    scores = [float("-inf")] * len(sequences)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    for rows in plan_micro_batches([len(s) for s in sequences], max_tokens=max_tokens):
        keep = max(tail_lengths[i] for i in rows) + 1
        rows_per_chunk = max(1, LOGITS_ELEMENTS_PER_CHUNK // (keep * vocab))
        for start in range(0, len(rows), rows_per_chunk):
            chunk = rows[start:start + rows_per_chunk]
            input_ids, attention_mask, position_ids = left_pad(
                [sequences[i] for i in chunk], loaded.pad_token_id, loaded.device
            )
            output = loaded.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=keep,
                use_cache=False,
            )
            logprobs = torch.log_softmax(output.logits[:, :-1, :], dim=-1, dtype=torch.float32)
            targets = input_ids[:, -(keep - 1):]
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
            for row, index in enumerate(chunk):
                length = tail_lengths[index]
                if length:
                    scores[index] = float(picked[row, -length:].mean())
    return scores


def _cache_rows(cache, rows: torch.Tensor):
    """A view of `cache` holding the given batch rows (repeats allowed); `cache` stays intact."""
    selected = copy.copy(cache)
    selected.layers = []
    for layer in cache.layers:
        clone = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            clone.keys = layer.keys.index_select(0, rows)
            clone.values = layer.values.index_select(0, rows)
        selected.layers.append(clone)
    return selected


@torch.inference_mode()
def shared_prompt_logprobs(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    max_tokens: int | None = None,
) -> list[list[float]]:
    """Mean token log-probability of each of `continuations[i]` after `prompts[i]`.

    Each prompt runs once; its key/value cache is then shared by all its continuations, so
    twenty candidates after a 150-token prompt cost about 350 tokens of work, not 3,000.
    """
    max_tokens = tokens_per_forward(loaded, max_tokens)
    scores = [[float("-inf")] * len(tails) for tails in continuations]
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    for group in plan_micro_batches([len(p) for p in prompts], max_tokens=max_tokens):
        input_ids, attention_mask, position_ids = left_pad(
            [prompts[i] for i in group], loaded.pad_token_id, loaded.device
        )
        output = loaded.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=1,
            use_cache=True,
        )
        first_logprobs = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
        cache = output.past_key_values
        prompt_lengths = attention_mask.sum(dim=1)
        pairs = [(row, j) for row, i in enumerate(group) for j in range(len(continuations[i])) if continuations[i][j]]
        if not pairs:
            continue
        longest = max(len(continuations[group[row]][j]) for row, j in pairs)
        rows_per_chunk = max(1, LOGITS_ELEMENTS_PER_CHUNK // (longest * vocab))
        for start in range(0, len(pairs), rows_per_chunk):
            chunk = pairs[start:start + rows_per_chunk]
            tails = [list(continuations[group[row]][j]) for row, j in chunk]
            width = max(len(tail) for tail in tails)
            tail_ids = torch.full((len(chunk), width), loaded.pad_token_id, dtype=torch.long)
            tail_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for index, tail in enumerate(tails):
                tail_ids[index, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                tail_mask[index, : len(tail)] = 1
            rows = torch.tensor([row for row, _ in chunk], dtype=torch.long, device=loaded.device)
            tail_ids, tail_mask = tail_ids.to(loaded.device), tail_mask.to(loaded.device)
            output = loaded.model(
                input_ids=tail_ids,
                attention_mask=torch.cat([attention_mask.index_select(0, rows), tail_mask], dim=1),
                position_ids=prompt_lengths.index_select(0, rows)[:, None]
                + torch.arange(width, device=loaded.device)[None, :],
                past_key_values=_cache_rows(cache, rows),
                use_cache=True,
            )
            logprobs = torch.log_softmax(output.logits[:, :-1, :], dim=-1, dtype=torch.float32)
            following = logprobs.gather(-1, tail_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            opening = first_logprobs.index_select(0, rows).gather(1, tail_ids[:, :1]).squeeze(1)
            totals = (opening + (following * tail_mask[:, 1:]).sum(dim=1)).cpu()
            for index, (row, j) in enumerate(chunk):
                scores[group[row]][j] = float(totals[index]) / len(tails[index])
    return scores


@torch.inference_mode()
def shared_prompt_next_token_logprobs(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    endings: Sequence[Sequence[Sequence[int]]],
    token_ids: Sequence[int],
    *,
    max_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Like `next_token_logprobs` for every `prompts[i] + endings[i][j]`, running each shared
    prompt once. Returns one float32 tensor [len(endings[i]), len(token_ids)] per prompt.

    Endings are padded on the left, between prompt and ending, so every row ends in the last
    column; the attention mask hides the gap and position ids skip it.
    """
    max_tokens = tokens_per_forward(loaded, max_tokens)
    wanted = torch.tensor(list(token_ids), dtype=torch.long, device=loaded.device)
    results = [torch.empty((len(tails), len(token_ids)), dtype=torch.float32) for tails in endings]
    for group in plan_micro_batches([len(p) for p in prompts], max_tokens=max_tokens):
        input_ids, attention_mask, position_ids = left_pad(
            [prompts[i] for i in group], loaded.pad_token_id, loaded.device
        )
        cache = loaded.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=1,
            use_cache=True,
        ).past_key_values
        prompt_lengths = attention_mask.sum(dim=1)
        pairs = [(row, j) for row, i in enumerate(group) for j in range(len(endings[i]))]
        if not pairs:
            continue
        longest = max(len(endings[group[row]][j]) for row, j in pairs) + input_ids.shape[1]
        rows_per_chunk = max(1, max_tokens // longest)
        for start in range(0, len(pairs), rows_per_chunk):
            chunk = pairs[start:start + rows_per_chunk]
            tail_ids, tail_mask, tail_positions = left_pad(
                [endings[group[row]][j] for row, j in chunk], loaded.pad_token_id, loaded.device
            )
            rows = torch.tensor([row for row, _ in chunk], dtype=torch.long, device=loaded.device)
            output = loaded.model(
                input_ids=tail_ids,
                attention_mask=torch.cat([attention_mask.index_select(0, rows), tail_mask], dim=1),
                position_ids=prompt_lengths.index_select(0, rows)[:, None] + tail_positions,
                past_key_values=_cache_rows(cache, rows),
                logits_to_keep=1,
                use_cache=True,
            )
            picked = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1).index_select(1, wanted).cpu()
            for index, (row, j) in enumerate(chunk):
                results[group[row]][j] = picked[index]
    return results


def supports_shared_prompts(loaded: LoadedModel) -> bool:
    """Whether the model's cache is the layered kind `shared_prompt_logprobs` knows how to split."""
    try:
        from transformers import DynamicCache

        return hasattr(DynamicCache(config=loaded.model.config), "layers")
    except Exception:
        return False


class _StopAtLines(StoppingCriteria):
    """Stops each row once its text (leading blank space aside) holds `lines[row]` line breaks,
    a blank line, or (optionally) has begun to loop. Decodes a row only when it has just
    produced a token with a line break.
    """

    def __init__(self, loaded: LoadedModel, prompt_width: int, lines: Sequence[int], stop_loops: bool) -> None:
        super().__init__()
        self.loaded = loaded
        self.prompt_width = prompt_width
        self.lines = list(lines)
        self.stop_loops = stop_loops
        self.newline_ids = loaded.newline_token_ids
        self.done = [False] * len(self.lines)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for row, token in enumerate(last):
            if self.done[row] or token not in self.newline_ids:
                continue
            text = self.loaded.tokenizer.decode(input_ids[row, self.prompt_width:], skip_special_tokens=True)
            text = text.lstrip()
            if "\n\n" in text or text.count("\n") >= self.lines[row]:
                self.done[row] = True
            elif self.stop_loops and ends_in_a_loop(text):
                self.done[row] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


@dataclass
class Generation:
    text: str
    new_tokens: int


@torch.inference_mode()
def generate_greedy(
    loaded: LoadedModel,
    sequences: Sequence[Sequence[int]],
    *,
    max_new_tokens: Sequence[int] | int,
    stop_after_lines: Sequence[int] | int | None = None,
    stop_loops: bool = False,
    min_new_tokens: int = 0,
    max_tokens: int | None = None,
    max_rows: int = 64,
    no_repeat_ngram_size: int = 0,
) -> list[Generation]:
    """Greedy continuations of each sequence, generated in left-padded micro-batches.

    `stop_after_lines` ends a row after that many lines or a blank line; `stop_loops` also
    ends it once it keeps repeating earlier lines; `no_repeat_ngram_size` n forbids any n tokens
    in a row that already occur in the row (prompt included), which keeps a small model from
    writing one list item again and again in other words' company.
    """
    max_tokens = max_tokens or DEFAULT_TOKENS_PER_FORWARD  # decoding reads every weight per step: wide batches pay
    count = len(sequences)
    budgets = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if stop_after_lines is None:
        line_limits = None
    elif isinstance(stop_after_lines, int):
        line_limits = [stop_after_lines] * count
    else:
        line_limits = list(stop_after_lines)
    results: list[Generation | None] = [None] * count
    lengths = [len(s) + budgets[i] for i, s in enumerate(sequences)]
    for rows in plan_micro_batches(lengths, max_tokens=max_tokens, max_rows=max_rows):
        input_ids, attention_mask, _ = left_pad([sequences[i] for i in rows], loaded.pad_token_id, loaded.device)
        width = input_ids.shape[1]
        new_tokens = max(budgets[i] for i in rows)
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=min(min_new_tokens, new_tokens) or None,
            do_sample=False,
            num_beams=1,
            no_repeat_ngram_size=no_repeat_ngram_size or None,
            pad_token_id=loaded.pad_token_id,
            eos_token_id=loaded.stop_token_ids,
        )
        criteria = StoppingCriteriaList()
        if line_limits is not None:
            criteria.append(_StopAtLines(loaded, width, [line_limits[i] for i in rows], stop_loops))
        output = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=criteria,
        )
        generated = output[:, width:].cpu()
        stop_ids = set(loaded.stop_token_ids) | {loaded.pad_token_id}
        for row, index in enumerate(rows):
            tokens = generated[row, : budgets[index]].tolist()
            produced = next((n for n, token in enumerate(tokens) if token in stop_ids), len(tokens))
            results[index] = Generation(
                text=loaded.tokenizer.decode(tokens[:produced], skip_special_tokens=True),
                new_tokens=produced,
            )
    return results
