"""Offline evaluation: does the LLM help?

A temporal split of the purchases (`split`), two tasks sampled from after the cutoff
(`cases`), the same cases ranked by every ranker (`runner`), ranking metrics (`metrics`),
and a report folder that the CLI and the admin page read (`report`).
"""
