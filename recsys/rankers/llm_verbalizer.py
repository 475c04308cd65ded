"""`llm-verbalizer` (LlamaRec style): one forward pass, the next token read as a choice.

Candidates are labelled A, B, C... in a completion-style prompt ending in "Answer:". The
model's next-token distribution over the label tokens scores every candidate at once, with
no generation. Small models favour early labels, so each request is asked in several
shuffled orders (seeded by the request, so answers repeat) and the probabilities averaged.
The customer part of the prompt is the same in every order: it runs once per request and its
key/value cache is shared by the orders (where the model's cache allows).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence

import torch

from recsys.config import Settings
from recsys.llm.inference import (
    encode_prompt,
    next_token_logprobs,
    shared_prompt_next_token_logprobs,
    supports_shared_prompts,
)
from recsys.llm.loading import LoadedModel
from recsys.llm.prompts import (
    VERBALIZER_ANSWER_PREFIX,
    VERBALIZER_LABELS,
    CustomerCase,
    verbalizer_prompt_parts,
)
from recsys.rankers.base import RankResult
from recsys.rankers.common import score_dump
from recsys.rankers.llm_common import LLMRanker, PreparedRequest


class VerbalizerLabelError(ValueError):
    """The tokenizer cannot express each candidate label as one token."""


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The single token that follows "Answer:" for each label; raises if any label needs more."""
    prefix = tokenizer(VERBALIZER_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    ids = []
    for label in labels:
        full = tokenizer(f"{VERBALIZER_ANSWER_PREFIX} {label}", add_special_tokens=False)["input_ids"]
        extra = full[len(prefix):]
        if full[: len(prefix)] != prefix or len(extra) != 1:
            raise VerbalizerLabelError(
                f"label {label!r} is not a single token after {VERBALIZER_ANSWER_PREFIX!r} for this "
                f"tokenizer (got {len(extra)} tokens); llm-verbalizer cannot use this model"
            )
        ids.append(extra[0])
    if len(set(ids)) != len(ids):
        raise VerbalizerLabelError("candidate labels share a token for this tokenizer")
    return ids


def request_seed(item: PreparedRequest) -> int:
    """A seed fixed by what the request contains, so the same request gets the same orders."""
    request = item.request
    key = json.dumps(
        [request.query or "", [h.stock_code for h in request.history], item.shown_codes],
        separators=(",", ":"),
    )
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def candidate_orders(count: int, permutations: int, seed: int) -> list[list[int]]:
    """The retrieval order first, then seeded shuffles of it."""
    rng = random.Random(seed)
    orders = [list(range(count))]
    for _ in range(max(1, permutations) - 1):
        shuffled = list(range(count))
        rng.shuffle(shuffled)
        orders.append(shuffled)
    return orders


class VerbalizerRanker(LLMRanker):
    name = "llm-verbalizer"

    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        super().__init__(model, settings)
        if self.max_candidates > len(VERBALIZER_LABELS):
            raise ValueError(
                f"llm-verbalizer labels at most {len(VERBALIZER_LABELS)} candidates; "
                f"max_candidates is {self.max_candidates}"
            )
        self.permutations = max(1, int(self.settings.verbalizer_permutations))
        self.labels = VERBALIZER_LABELS[: self.max_candidates]
        self.label_ids = label_token_ids(model.tokenizer, self.labels)
        self.share_prompts = supports_shared_prompts(model)

    def _label_logprobs(self, prompts: list[list[int]], endings: list[list[list[int]]]) -> list[torch.Tensor]:
        if self.share_prompts:
            return shared_prompt_next_token_logprobs(self.model, prompts, endings, self.label_ids)
        sequences = [prompt + ending for prompt, tails in zip(prompts, endings, strict=True) for ending in tails]
        flat = next_token_logprobs(self.model, sequences, self.label_ids) if sequences else None
        split, row = [], 0
        for tails in endings:
            split.append(flat[row:row + len(tails)] if tails else torch.empty((0, len(self.label_ids))))
            row += len(tails)
        return split

    def _rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[RankResult]:
        tokenizer = self.model.tokenizer
        prompts: list[list[int]] = []
        endings: list[list[list[int]]] = []
        plans: list[list[list[int]]] = []
        for item in prepared:
            count = len(item.shown)
            orders = candidate_orders(count, self.permutations, request_seed(item)) if count > 1 else []
            plans.append(orders)
            customer_part = ""
            option_parts = []
            for order in orders:
                case = CustomerCase(
                    history=item.case.history,
                    query=item.case.query,
                    candidates=[item.case.candidates[i] for i in order],
                )
                customer_part, options = verbalizer_prompt_parts(case)
                option_parts.append(options)
            prompts.append(encode_prompt(self.model, customer_part, chat=False))
            endings.append(
                tokenizer(option_parts, add_special_tokens=False)["input_ids"] if option_parts else []
            )
        label_logprobs = self._label_logprobs(prompts, endings)
        results = []
        for item, orders, prompt, tails, logprobs in zip(
            prepared, plans, prompts, endings, label_logprobs, strict=True
        ):
            count = len(item.shown)
            codes = item.shown_codes
            totals = [0.0] * count
            label_mass = []
            for order, row in zip(orders, logprobs, strict=True):
                label_row = row[:count]
                label_mass.append(math.exp(float(torch.logsumexp(label_row, dim=0))))
                for position, probability in enumerate(torch.softmax(label_row, dim=0).tolist()):
                    totals[order[position]] += probability
            if self.share_prompts:
                tokens = len(prompt) + sum(len(tail) for tail in tails)
            else:
                tokens = sum(len(prompt) + len(tail) for tail in tails)
            if orders:
                scores = {code: totals[i] / len(orders) for i, code in enumerate(codes)}
            else:
                scores = {code: 1.0 for code in codes}
            order_codes = sorted(codes, key=lambda code: -scores[code])
            results.append(
                self.complete(
                    item,
                    order_codes,
                    scores,
                    raw_output=score_dump(scores, order_codes),
                    info={
                        "permutations": len(orders),
                        "prompt_tokens": tokens,
                        "shared_prompt": self.share_prompts,
                        "label_mass": round(sum(label_mass) / len(label_mass), 4) if label_mass else None,
                    },
                )
            )
        return results
