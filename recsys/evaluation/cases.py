"""The two evaluation tasks, sampled from the held-out window, and their candidates.

- `query` (the notebook's scenario): a customer bought a product after the cutoff; they
  search for its type words ("BAG CHARM"); where does the ranker put that product?
- `next` (the course's scenario): no query text; the products the customer bought after the
  cutoff are the answers, and retrieval starts from the mean embedding of their recent
  purchases before it.

Customers are sampled by a seeded generator, stratified into terciles by how many purchase
lines they had before the cutoff (light, medium, heavy), and the strata are interleaved so
that any prefix of the cases (a per-ranker cap) is still balanced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recsys.evaluation.queries import type_query
from recsys.evaluation.split import TemporalSplit
from recsys.rankers import HistoryItem

log = logging.getLogger(__name__)

TASKS = ("query", "next")
TASK_TITLES = {
    "query": "Query personalization (type words of a product bought after the cutoff)",
    "next": "Next purchase (history only, products bought after the cutoff)",
}
STRATA = ("light", "medium", "heavy")
HISTORY_ITEMS = 10  # what the pipeline gives a ranker, and what its history vector averages


@dataclass
class Case:
    """One question put to every ranker. `answers` are stock codes; `repeats` those bought before too."""

    task: str
    number: int
    customer_id: int
    stratum: str
    query: str | None
    answers: tuple[str, ...]
    repeats: frozenset[str]
    history: tuple[HistoryItem, ...]
    candidates: tuple[str, ...] = field(default=(), repr=False)  # the pipeline's merged candidates, best first
    window: int = 0  # how many of them a ranker orders

    @property
    def reachable(self) -> bool:
        """Some answer is among the candidates a ranker orders (no ranker can do better otherwise)."""
        shown = set(self.candidates[: self.window])
        return any(code in shown for code in self.answers)

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "number": self.number,
            "customer_id": self.customer_id,
            "stratum": self.stratum,
            "query": self.query,
            "answers": list(self.answers),
            "repeats": sorted(self.repeats),
            "reachable": self.reachable,
            "candidates": list(self.candidates[: self.window]),
        }


def strata(split: TemporalSplit, customers: Sequence[int]) -> dict[int, str]:
    """Terciles of pre-cutoff purchase lines (ties broken by customer id, so sizes are equal)."""
    ordered = sorted(customers, key=lambda c: (split.purchase_counts.get(c, 0), c))
    labels = {}
    for name, group in zip(STRATA, np.array_split(np.asarray(ordered, dtype=np.int64), len(STRATA)), strict=True):
        labels.update({int(c): name for c in group})
    return labels


def _sample(customers: Sequence[int], labels: dict[int, str], n: int, rng: np.random.Generator) -> list[int]:
    """n customers, a third from each stratum where possible, interleaved light, medium, heavy, …"""
    groups = {name: sorted(c for c in customers if labels[c] == name) for name in STRATA}
    quotas = {name: n // len(STRATA) + (1 if i < n % len(STRATA) else 0) for i, name in enumerate(STRATA)}
    picked = {}
    for name in STRATA:
        group = groups[name]
        size = min(quotas[name], len(group))
        picked[name] = [int(c) for c in rng.choice(group, size=size, replace=False)] if size else []
    interleaved = []
    for position in range(max((len(v) for v in picked.values()), default=0)):
        interleaved += [picked[name][position] for name in STRATA if position < len(picked[name])]
    return interleaved


def _history(split: TemporalSplit, customer: int) -> tuple[HistoryItem, ...]:
    codes = split.histories.get(customer, [])[:HISTORY_ITEMS]
    return tuple(HistoryItem(code, split.log.description(code)) for code in codes)


def history_vector(split: TemporalSplit, customer: int) -> np.ndarray | None:
    """The normalized mean embedding of the recent pre-cutoff purchases (as `retrieval.history_vector`)."""
    vectors = [
        split.log.embeddings[code]
        for code in split.histories.get(customer, [])[:HISTORY_ITEMS]
        if code in split.log.embeddings and code not in split.log.non_products
    ]
    if not vectors:
        return None
    mean = np.mean(vectors, axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm else None


def sample_cases(split: TemporalSplit, task: str, n: int, seed: int) -> list[Case]:
    """Up to n cases of `task`, the same for the same split, n and seed."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    embedded = split.log.embeddings
    if task == "query":
        options = {
            customer: [code for code in codes if code in embedded and type_query(split.log.description(code))]
            for customer, codes in split.future.items()
            if customer in split.histories
        }
    else:
        options = {
            customer: codes
            for customer, codes in split.future.items()
            if customer in split.histories and history_vector(split, customer) is not None
        }
    eligible = sorted(c for c, codes in options.items() if codes)
    labels = strata(split, eligible)
    cases = []
    for number, customer in enumerate(_sample(eligible, labels, n, rng)):
        bought_before = set(split.histories[customer])
        if task == "query":
            codes = sorted(options[customer])
            answer = codes[int(rng.integers(len(codes)))]
            answers, query = (answer,), type_query(split.log.description(answer))
        else:
            answers, query = tuple(options[customer]), None
        cases.append(
            Case(
                task=task,
                number=number,
                customer_id=customer,
                stratum=labels[customer],
                query=query,
                answers=answers,
                repeats=frozenset(a for a in answers if a in bought_before),
                history=_history(split, customer),
            )
        )
    log.info("%s: %d cases from %d eligible customers", task, len(cases), len(eligible))
    return cases
